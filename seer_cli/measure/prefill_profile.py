"""A whole model's time to first token, dense against sparse, with the sparse prefill split
into gate scoring + block selection, attention, and everything else."""

from collections.abc import Callable
from dataclasses import dataclass

import torch
from seer_gates import GateConfig, MaskPolicy, build_gates

from ..engine.attention import SparsePrefill, SparsityStats
from ..engine.errors import SeerError
from ..engine.generation import prefill
from ..engine.runtime import model_shape, pick_dtype
from .report import Column, Report, Stat, ratio
from .settings import ProgressCallback, check_context, row_name, run_info
from .timing import Timeline, synchronize, times_ms

# Random models larger than this are refused on the CPU (float32: 4 bytes a parameter).
CPU_MAX_PARAMETERS = 2_000_000_000


class _NotifyingStats(SparsityStats):
    """SparsityStats that calls ``on_record(layer)`` after recording a layer's block counts."""

    def __init__(self, on_record: Callable[[int], None]):
        super().__init__()
        self.on_record = on_record

    def record(self, layer: int, kept, total: int) -> None:
        super().record(layer, kept, total)
        self.on_record(layer)


class TimedSparsePrefill(SparsePrefill):
    """SparsePrefill, sparse at every prompt length (the profile finds where that pays), that
    while ``timeline`` is set marks three points of each layer's attention as
    ``(layer, point)``: ``start``, ``mask`` (the kept blocks are selected) and ``end``.

    ``SparsePrefill.attend`` records the kept block counts in ``stats`` after selecting the
    blocks and before running the kernel: that call makes the ``mask`` mark.
    """

    def __init__(self, model, policy: MaskPolicy, gates: torch.nn.ModuleList | None):
        super().__init__(model, policy, gates, min_tokens=0)
        self.stats = _NotifyingStats(lambda layer: self._mark(layer, "mask"))
        self.timeline: Timeline | None = None

    def _mark(self, layer_idx: int, point: str) -> None:
        if self.timeline is not None:
            self.timeline.mark((layer_idx, point))

    def attend(self, layer_idx: int, q, k, v, scaling: float | None) -> torch.Tensor:
        self._mark(layer_idx, "start")
        out = super().attend(layer_idx, q, k, v, scaling)
        self._mark(layer_idx, "end")
        return out


@dataclass(frozen=True)
class Breakdown:
    """One prefill's time split, summed over layers: gate scoring + block selection, attention
    (the sparse kernel, or the reference on the CPU), and everything else."""

    total_ms: float
    gates_ms: float
    attention_ms: float

    @property
    def other_ms(self) -> float:
        return self.total_ms - self.gates_ms - self.attention_ms


def instrumented_prefill(sparse: TimedSparsePrefill, input_ids: torch.Tensor) -> Breakdown:
    """Run one prefill with every layer's attention marked, and split its time."""
    device = input_ids.device
    timeline = Timeline(device)
    sparse.timeline = timeline
    try:
        synchronize(device)
        timeline.mark("start")
        prefill(sparse.model, input_ids)
        timeline.mark("end")
        synchronize(device)
    finally:
        sparse.timeline = None
    layers = range(len(sparse.model.model.layers))
    return Breakdown(
        total_ms=timeline.ms("start", "end"),
        gates_ms=sum(timeline.ms((layer, "start"), (layer, "mask")) for layer in layers),
        attention_ms=sum(timeline.ms((layer, "mask"), (layer, "end")) for layer in layers),
    )


@dataclass
class PrefillSubject:
    """A model to profile and the gates it runs with (None: the pooled estimator); the labels
    say where the weights and gates came from."""

    name: str
    model: object
    gates: torch.nn.ModuleList | None
    weights: str
    gates_label: str


def random_subject(name: str, config, gates: str, device: torch.device) -> PrefillSubject:
    """A model of ``config`` with random weights, created directly on ``device`` (bfloat16 on a
    GPU, float32 on the CPU), and random-weight gates of the published shape, or the pooled
    estimator for ``gates="pooled"``. Speed does not depend on the weights' values."""
    from transformers import AutoModelForCausalLM

    if gates not in ("auto", "pooled"):
        raise SeerError("--gates FILE needs --model: with --config, weights and gates are random.")
    if device.type == "cpu":
        with torch.device("meta"):
            count = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
        if count > CPU_MAX_PARAMETERS:
            raise SeerError(
                f"{name} has {count / 1e9:.1f}B parameters, too many for a CPU run; "
                "use a small --config or --model."
            )
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(
            config, dtype=pick_dtype("auto", device), attn_implementation="sdpa"
        )
    if gates == "pooled":
        return PrefillSubject(name, model.eval(), None, "random", "pooled")
    shape = model_shape(config)
    random_gates = build_gates(GateConfig(base_model=name, **shape)).to(device).eval()
    return PrefillSubject(name, model.eval(), random_gates, "random", "random")


def loaded_subject(model: str | None, gates: str, device: torch.device) -> PrefillSubject:
    """A model loaded from ``--model`` (None: the default model) with its gates as ``seer
    generate`` would load them (``auto``, ``pooled`` or a gate file)."""
    from ..engine.runtime import Engine, EngineOptions

    # Any sparsity loads the gates; each profiled sparsity then gets its own SparsePrefill.
    options = EngineOptions(model=model, gates=gates, sparsity=0.5, device=device.type)
    engine = Engine.load(options)
    engine.sparse_prefill.detach()
    label = {"auto": "shipped"}.get(gates, gates)
    return PrefillSubject(
        engine.name, engine.model, engine.sparse_prefill.gates, "pretrained", label
    )


PREFILL_COLUMNS = [
    Column("test", "test"),
    Column("n_prompt", "n_prompt", markdown=False),
    Column("sparsity", "sparsity", markdown=False),
    Column("ttft_ms", "TTFT ms"),
    Column("speedup", "speedup vs dense"),
    Column("peak_memory_gb", "peak memory GB"),
    Column("achieved_sparsity", "achieved sparsity", digits=3),
    Column("gates_ms", "gates+mask ms"),
    Column("attention_ms", "attention ms"),
    Column("other_ms", "other ms"),
]


def profile_prefill(
    subject: PrefillSubject,
    lengths: list[int],
    sparsities: list[float],
    repeats: int,
    on_test: ProgressCallback = lambda done, total, test: None,
) -> Report:
    """Time to first token of the subject's model on random prompts of each length, dense and
    at each sparsity.

    Sparse rows also split one extra, instrumented prefill into gates + mask selection,
    attention and everything else; the timed prefills run without the instrumentation.
    """
    model = subject.model
    check_context(lengths, subject.name, model.config)
    device = model.device
    info = run_info(
        subject.name, model.config, device, model.dtype, repeats,
        weights=subject.weights, gates=subject.gates_label,
    )  # fmt: skip
    report = Report(
        "prefill",
        info,
        PREFILL_COLUMNS,
        notes=[
            "dense rows: transformers' SDPA attention; breakdown of sparse rows: one extra "
            "prefill with every layer's attention timed, other = the rest of that prefill"
        ],
    )
    total = len(lengths) * (1 + len(sparsities))
    generator = torch.Generator().manual_seed(0)
    for index, length in enumerate(lengths):
        done = index * (1 + len(sparsities))
        ids = torch.randint(model.config.vocab_size, (1, length), generator=generator).to(device)
        on_test(done, total, row_name(length, None))
        dense_ttft, peak = _ttft(model, ids, repeats)
        report.rows.append(_prefill_row(length, None, dense_ttft, Stat(1.0, 0.0), peak))
        for offset, sparsity in enumerate(sparsities, start=1):
            on_test(done + offset, total, row_name(length, sparsity))
            sparse = TimedSparsePrefill(model, MaskPolicy(sparsity=sparsity), subject.gates)
            try:
                ttft, peak = _ttft(model, ids, repeats)
                sparse.stats.clear()
                breakdown = instrumented_prefill(sparse, ids)
                row = _prefill_row(length, sparsity, ttft, ratio(dense_ttft, ttft), peak)
                row.update(
                    achieved_sparsity=sparse.stats.overall(),
                    gates_ms=breakdown.gates_ms,
                    attention_ms=breakdown.attention_ms,
                    other_ms=breakdown.other_ms,
                )
            finally:
                sparse.detach()
            report.rows.append(row)
    return report


def _ttft(model, input_ids: torch.Tensor, repeats: int) -> tuple[Stat, float | None]:
    """Prefill time (``Stat``, ms) and peak GPU memory in GB (None on the CPU)."""
    device = input_ids.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    ttft = Stat.of(times_ms(lambda: prefill(model, input_ids), repeats, device))
    peak = torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None
    return ttft, peak


def _prefill_row(
    length: int, sparsity: float | None, ttft: Stat, speedup: Stat, peak: float | None
) -> dict:
    return {
        "test": row_name(length, sparsity),
        "n_prompt": length,
        "sparsity": sparsity,
        "ttft_ms": ttft,
        "speedup": speedup,
        "peak_memory_gb": peak,
    }
