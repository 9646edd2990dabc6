"""Progress and stats on stderr, in words people already read from mlx-lm and llama.cpp."""

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from .console import stderr
from .engine.context import RopeScaling
from .engine.generation import GenerationStats


def quiet_libraries() -> None:
    """The libraries' own progress bars and warnings would mix with ours on stderr."""
    import logging

    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    logging.getLogger("accelerate").setLevel(logging.ERROR)  # notes on offloaded weights


class PrefillProgress:
    """A transient bar over the decoder layers while the prompt is prefilled."""

    def __init__(self, enabled: bool):
        self._progress = Progress(
            TextColumn("{task.description}"), BarColumn(),
            TextColumn("layer {task.completed}/{task.total}"),
            TimeElapsedColumn(), console=stderr, transient=True,
            disable=not (enabled and stderr.is_terminal),
        )  # fmt: skip
        self._task = None

    def __enter__(self):
        from seer_kernels.tuning import set_tuning_notifier

        set_tuning_notifier(self.note)  # a first run on a new GPU tunes kernels: say so
        self._progress.start()
        return self

    def __exit__(self, *exc):
        from seer_kernels.tuning import set_tuning_notifier

        set_tuning_notifier(None)
        self.stop()

    def layer_started(self, done: int, total: int) -> None:
        if self._task is None:
            self._task = self._progress.add_task("prefill", total=total)
        self._progress.update(self._task, completed=done, total=total, description="prefill")

    def note(self, message: str) -> None:
        """Show ``message`` in place of the bar's label until the next layer starts."""
        if self._task is None:
            self._task = self._progress.add_task(message, total=None)
        self._progress.update(self._task, description=message)

    def stop(self) -> None:
        if self._progress.live.is_started:
            self._progress.stop()


_SCORES = {"gates": "gate scores", "pooled": "pooled scores (training-free)"}


def print_stats(console: Console, stats: GenerationStats, requested_sparsity: float | None) -> None:
    cached = f" (+{stats.cache_n} from the previous prompt's cache)" if stats.cache_n else ""
    console.print(
        f"Prompt: {stats.prompt_n} tokens{cached}, {stats.prompt_per_second:.1f} tokens-per-sec, "
        f"TTFT {stats.ttft_ms / 1000:.3f} s"
    )
    console.print(
        f"Generation: {stats.predicted_n} tokens, {stats.predicted_per_second:.1f} tokens-per-sec"
    )
    if stats.n_ctx is not None:
        console.print(f"Context: {stats.n_ctx} tokens, {_rope(stats)}", soft_wrap=True)
    if stats.sparsity is not None:
        asked = f" (requested {requested_sparsity:.2f})" if requested_sparsity is not None else ""
        budget = f", budget per {stats.budget}" if stats.budget else ""
        console.print(
            f"Sparsity: {stats.sparsity:.3f} of causal blocks skipped{asked}, "
            f"{_SCORES[stats.scoring]}, local window {stats.local_blocks} blocks{budget}",
            soft_wrap=True,
        )
    per_device = stats.peak_memory_gb_per_device
    split = ", ".join(f"{device} {gb:.2f} GB" for device, gb in per_device.items())
    detail = f" ({split})" if len(per_device) > 1 else ""
    console.print(f"Peak memory: {stats.peak_memory_gb:.2f} GB{detail}")


def _rope(stats: GenerationStats) -> str:
    """How the prompt's positions were read, against the model's native context."""
    if stats.rope_scaling == "none":
        return f"RoPE unscaled (prompt and answer fit the native {stats.n_ctx_train})"
    scaling = RopeScaling(
        stats.rope_scaling, stats.rope_scale, stats.yarn_orig_ctx, stats.yarn_attn_factor,
        stats.yarn_beta_fast, stats.yarn_beta_slow,
    )  # fmt: skip
    return f"RoPE {scaling} (past the native {stats.n_ctx_train})"
