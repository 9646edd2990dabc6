"""``seer profile``: dense against sparse prefill, timed on a GPU.

``seer profile kernel`` times attention alone at a model's shapes; ``seer profile prefill`` a
whole model's time to first token. The table (one row per test, as llama-bench prints them)
goes to stdout; progress, notes and where sparsity starts to pay go to stderr.
"""

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated

import typer
from rich.markup import escape

from .. import options as opt
from ..console import handle_user_errors, stderr, write_product
from ..engine.errors import SeerError

DEFAULT_CONFIG = "llama-3.1-8b"

profile_app = typer.Typer(
    name="profile",
    help="Time dense against sparse prefill on a GPU: attention alone, or a whole model.",
    no_args_is_help=True,
)

Config = Annotated[
    str | None,
    typer.Option(
        "--config",
        envvar="SEER_PROFILE_CONFIG",
        help="Model shapes, random weights: llama-3.1-8b, llama-3.1-8b-256k (262144 positions), "
        f"llama-3.1-70b, qwen2.5-7b or a config.json path (default {DEFAULT_CONFIG}).",
    ),
]
Lengths = Annotated[
    str | None,
    typer.Option(
        "--lengths",
        "-l",
        envvar="SEER_PROFILE_LENGTHS",
        help="Prompt lengths, comma-separated (default 8192,32768,131072; 256,512 on the CPU).",
    ),
]
Sparsities = Annotated[
    str,
    typer.Option(
        "--sparsities",
        "-s",
        envvar="SEER_PROFILE_SPARSITIES",
        help="Sparsities to compare with dense, comma-separated, each in [0, 1).",
    ),
]
Repeats = Annotated[
    int,
    typer.Option("--repeats", "-r", envvar="SEER_PROFILE_REPEATS", help="Timed repeats per test."),
]
Output = Annotated[
    str,
    typer.Option(
        "--output", "-o", envvar="SEER_PROFILE_OUTPUT", help="Table format: md, json or csv."
    ),
]


@profile_app.command("kernel")
@handle_user_errors
def kernel(
    config: Config = None,
    model: opt.Model = None,
    lengths: Lengths = None,
    sparsities: Sparsities = "0.5,0.9",
    repeats: Repeats = 5,
    output: Output = "md",
    device: opt.Device = "auto",
    quiet: opt.Quiet = False,
) -> None:
    """Attention alone at a model's shapes: dense SDPA against gates + block-sparse kernel."""
    _check_source(config, model)
    from ..measure import profiling
    from ..progress import quiet_libraries

    quiet_libraries()

    torch_device, length_list, sparsity_list = _settings(
        device, lengths, sparsities, repeats, output
    )
    if model is not None:
        name, model_config = profiling.model_config(model)
    else:
        name, model_config = profiling.load_config(config or DEFAULT_CONFIG)
    with _progress(quiet) as on_test:
        report = profiling.profile_kernel(
            name, model_config, length_list, sparsity_list, repeats, torch_device, on_test
        )
    _finish(report, output, quiet)


@profile_app.command("prefill")
@handle_user_errors
def prefill(
    config: Config = None,
    model: opt.Model = None,
    gates: opt.Gates = "auto",
    lengths: Lengths = None,
    sparsities: Sparsities = "0.5,0.9",
    repeats: Repeats = 5,
    output: Output = "md",
    ubatch_sizes: Annotated[
        str,
        typer.Option(
            "--ubatch-size",
            "-ub",
            envvar="SEER_PROFILE_UBATCH_SIZE",
            help="Prefill chunk sizes to profile, comma-separated: multiples of 64, 0 for one "
            "pass, auto as seer generate (dense in one pass, sparse in chunks of 16384).",
        ),
    ] = "auto",
    device: opt.Device = "auto",
    device_map: opt.DeviceMap = None,
    max_memory: opt.MaxMemory = None,
    ctx_size: opt.CtxSize = None,
    rope_scaling: opt.RopeScaling = None,
    rope_scale: opt.RopeScale = None,
    yarn_orig_ctx: opt.YarnOrigCtx = None,
    yarn_attn_factor: opt.YarnAttnFactor = None,
    yarn_beta_fast: opt.YarnBetaFast = None,
    yarn_beta_slow: opt.YarnBetaSlow = None,
    quiet: opt.Quiet = False,
) -> None:
    """Time to first token of a whole model, dense against sparse prefill.

    --config: random weights and gates. Without --config or --model, the CPU runs the default model.
    --device-map spreads the model over several GPUs; the table then adds each GPU's peak memory.
    --ubatch-size 0,8192 compares one pass with chunks of 8192 tokens, peak memory per row.
    Prompts past a loaded model's native context run with its context extension (--ctx-size …).
    """
    _check_source(config, model)
    context = opt.context_settings(
        ctx_size, rope_scaling, rope_scale, yarn_orig_ctx, yarn_attn_factor, yarn_beta_fast,
        yarn_beta_slow,
    )  # fmt: skip
    from ..engine.placement import Placement
    from ..engine.runtime import pick_device
    from ..measure import profiling
    from ..progress import quiet_libraries

    quiet_libraries()
    placement = Placement.parse(device_map, max_memory)
    torch_device, length_list, sparsity_list = _settings(
        device, lengths, sparsities, repeats, output
    )
    ubatch_list = profiling.parse_ubatch_sizes(ubatch_sizes)
    if placement is not None:
        torch_device = pick_device(device, placement)
    if torch_device.type == "cuda":
        from ..engine.gpu_warmup import start_gpu_warmup
        from ..engine.runtime import pick_dtype

        start_gpu_warmup(torch_device, pick_dtype("auto", torch_device))
    if model is not None or (config is None and torch_device.type == "cpu"):
        subject = profiling.loaded_subject(
            model, gates, torch_device, device_map, max_memory, context
        )
    else:
        name, model_config = profiling.load_config(config or DEFAULT_CONFIG)
        profiling.check_context(length_list, name, model_config)
        subject = profiling.random_subject(name, model_config, gates, torch_device, placement)
    with _progress(quiet) as on_test:
        report = profiling.profile_prefill(
            subject, length_list, sparsity_list, repeats, on_test, ubatch_list
        )
    _finish(report, output, quiet)


def _check_source(config: str | None, model: str | None) -> None:
    if config is not None and model is not None:
        raise SeerError("give either --config or --model, not both.")


def _settings(device: str, lengths: str | None, sparsities: str, repeats: int, output: str):
    """The torch device, lengths and sparsities to profile, every flag checked."""
    from ..measure import profiling

    profiling.check_settings(repeats, output)
    sparsity_list = profiling.parse_sparsities(sparsities)
    torch_device = profiling.profile_device(device)
    return torch_device, profiling.parse_lengths(lengths, torch_device), sparsity_list


@contextmanager
def _progress(quiet: bool) -> Iterator:
    """A transient bar over the tests on stderr; yields the ``on_test`` callback."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    progress = Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=stderr, transient=True, disable=quiet,
    )  # fmt: skip
    task = progress.add_task("profile", total=None)

    def on_test(done: int, total: int, test: str) -> None:
        progress.update(task, description=test, completed=done, total=total)

    with progress:
        yield on_test


def _finish(report, output: str, quiet: bool) -> None:
    """What was profiled and the notes on stderr, around the table on stdout."""
    from ..measure.report import describe, render

    if not quiet:
        stderr.print(escape(describe(report)), soft_wrap=True)
    write_product(render(report, output))
    if not quiet:
        for note in report.notes:
            stderr.print(escape(note), soft_wrap=True)
