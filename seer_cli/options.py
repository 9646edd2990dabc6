"""Options shared by the commands that load a model and generate, each also read from an
environment variable (flags > environment > defaults)."""

import math
from typing import Annotated

import typer

from .engine.context import ContextSettings
from .engine.errors import SeerError

Model = Annotated[
    str | None,
    typer.Option(
        "--model",
        "-m",
        envvar="SEER_MODEL",
        help="Model: a folder, a GGUF file, or a cached hub id (default: SmolLM2-135M-Instruct).",
    ),
]
Gates = Annotated[
    str,
    typer.Option(
        "--gates",
        envvar="SEER_GATES",
        help="Gate file or published gates folder, 'auto' (shipped for the model) "
        "or 'pooled' (training-free).",
    ),
]
Sparsity = Annotated[
    float | None,
    typer.Option(
        "--sparsity",
        envvar="SEER_SPARSITY",
        help="Share of causal blocks to skip per row during prefill (top-k), in [0, 1).",
    ),
]
Threshold = Annotated[
    float | None,
    typer.Option(
        "--threshold",
        envvar="SEER_THRESHOLD",
        help="Keep blocks whose gate score exceeds this multiple of their row's average (1 keeps "
        "the blocks above average); adapts per head and row, means the same at any length.",
    ),
]
LocalBlocks = Annotated[
    int | None,
    typer.Option(
        "--local-blocks",
        envvar="SEER_LOCAL_BLOCKS",
        help="Always keep the N key blocks before each row's own block (a local window), inside "
        "--sparsity's budget; the scores choose the rest (default: the window the gate file "
        "names, 0 without one).",
    ),
]
Budget = Annotated[
    str | None,
    typer.Option(
        "--budget",
        envvar="SEER_BUDGET",
        help="How --sparsity is spent: row (each query row keeps its share; fused GPU kernels) "
        "or layer (each layer keeps as many blocks in all, given where the scores stand out "
        "most against their row's average; reads long prompts better, selects in PyTorch). "
        "Default: the gate file's (layer for the default model's 32k gates), else row.",
    ),
]
Dense = Annotated[
    bool,
    typer.Option("--dense", envvar="SEER_DENSE", help="Dense attention: the unmodified model."),
]
SparseMinTokens = Annotated[
    int | None,
    typer.Option(
        "--sparse-min-tokens",
        envvar="SEER_SPARSE_MIN_TOKENS",
        help="Prompts shorter than this are prefilled densely (default on a GPU: the measured "
        "crossover, 16384 tokens, or 32768 below sparsity 0.8; on the CPU 0).",
    ),
]
UbatchSize = Annotated[
    int | None,
    typer.Option(
        "--ubatch-size",
        "-ub",
        envvar="SEER_UBATCH_SIZE",
        help="Prefill long prompts in chunks of this many tokens against the growing cache, "
        "which bounds the memory of activations (a multiple of 64; 0: in one pass; "
        "default: 16384 for sparse prefill, one pass for dense).",
    ),
]
Device = Annotated[str, typer.Option("--device", envvar="SEER_DEVICE", help="auto, cpu or cuda.")]
DeviceMap = Annotated[
    str | None,
    typer.Option(
        "--device-map",
        envvar="SEER_DEVICE_MAP",
        help="Spread the model over several GPUs (accelerate): auto, balanced or sequential, "
        "a device (0, cpu), or a JSON object (or .json file) of module names and devices.",
    ),
]
MaxMemory = Annotated[
    str | None,
    typer.Option(
        "--max-memory",
        envvar="SEER_MAX_MEMORY",
        help="Memory each device may hold with --device-map, like 0=70GiB,1=70GiB,cpu=100GiB "
        "(alone it implies --device-map auto).",
    ),
]
Dtype = Annotated[
    str,
    typer.Option(
        "--dtype",
        envvar="SEER_DTYPE",
        help="auto, float32, float16 or bfloat16. auto: bfloat16 on a GPU and on a CPU with AMX "
        "(which multiplies it in hardware), else float32.",
    ),
]
MaxTokens = Annotated[
    int,
    typer.Option(
        "--max-tokens", "-n", envvar="SEER_MAX_TOKENS", help="Tokens to generate at most."
    ),
]
Temperature = Annotated[
    float, typer.Option("--temp", envvar="SEER_TEMP", help="Sampling temperature; 0 is greedy.")
]
TopP = Annotated[
    float, typer.Option("--top-p", envvar="SEER_TOP_P", help="Nucleus sampling; 1 is off.")
]
TopK = Annotated[
    int, typer.Option("--top-k", envvar="SEER_TOP_K", help="Top-k sampling; 0 is off.")
]
Seed = Annotated[
    int | None, typer.Option("--seed", envvar="SEER_SEED", help="Random seed for sampling.")
]
System = Annotated[
    str | None,
    typer.Option("--system", envvar="SEER_SYSTEM", help="System message for the chat template."),
]
Truncate = Annotated[
    str | None,
    typer.Option(
        "--truncate",
        envvar="SEER_TRUNCATE",
        help="If the prompt is longer than the context, cut the document's start, middle or end.",
    ),
]
CtxSize = Annotated[
    int | None,
    typer.Option(
        "--ctx-size",
        "-c",
        envvar="SEER_CTX_SIZE",
        help="Longest prompt plus answer, in tokens; past the model's native context RoPE is "
        "scaled (default: 32768 for the default model, else the native context).",
    ),
]
RopeScaling = Annotated[
    str | None,
    typer.Option(
        "--rope-scaling",
        envvar="SEER_ROPE_SCALING",
        help="RoPE scaling past the native context: none, linear, yarn, or longrope (factors "
        "seer measured for the model; the default where it has them, else yarn).",
    ),
]
RopeScale = Annotated[
    float | None,
    typer.Option(
        "--rope-scale",
        envvar="SEER_ROPE_SCALE",
        help="RoPE context scaling factor (default: --ctx-size / --yarn-orig-ctx).",
    ),
]
YarnOrigCtx = Annotated[
    int | None,
    typer.Option(
        "--yarn-orig-ctx",
        envvar="SEER_YARN_ORIG_CTX",
        help="Original context that YaRN stretches (default: the model's native context).",
    ),
]
YarnAttnFactor = Annotated[
    float | None,
    typer.Option(
        "--yarn-attn-factor",
        envvar="SEER_YARN_ATTN_FACTOR",
        help="Multiplier on YaRN's attention scaling, 0.1·ln(scale) + 1 (default 1).",
    ),
]
YarnBetaFast = Annotated[
    float | None,
    typer.Option(
        "--yarn-beta-fast",
        envvar="SEER_YARN_BETA_FAST",
        help="YaRN keeps the frequencies that turn more than this many times over the original "
        "context (default 32; the default model, when neither beta is given, 128).",
    ),
]
YarnBetaSlow = Annotated[
    float | None,
    typer.Option(
        "--yarn-beta-slow",
        envvar="SEER_YARN_BETA_SLOW",
        help="YaRN interpolates the frequencies that turn fewer than this many times over the "
        "original context (default 1; the default model, when neither beta is given, 2); a ramp "
        "lies between the two.",
    ),
]
Quiet = Annotated[
    bool, typer.Option("--quiet", "-q", envvar="SEER_QUIET", help="No stats or progress on stderr.")
]


def check_generation_flags(
    *, sparsity, threshold, local_blocks, dense, max_tokens, temperature, top_p, top_k, truncate,
    budget=None,
) -> None:  # fmt: skip
    """Refuse nonsense values before any model is loaded, one sentence each."""
    from seer_gates.policy import BUDGETS

    from .engine.prompt import TRUNCATE_MODES

    if budget is not None and budget not in BUDGETS:
        raise SeerError(f"--budget must be one of {', '.join(BUDGETS)}, got {budget!r}.")
    if budget == "layer" and threshold is not None:
        raise SeerError("--budget spends --sparsity; --threshold has no budget.")

    if sparsity is not None and threshold is not None:
        raise SeerError("give either --sparsity or --threshold, not both.")
    if dense and (sparsity is not None or threshold is not None):
        raise SeerError("--dense cannot be combined with --sparsity or --threshold.")
    if sparsity is not None and not (0 <= sparsity < 1):
        raise SeerError(f"--sparsity must be in [0, 1), got {sparsity}.")
    if threshold is not None and not (0 <= threshold < math.inf):
        raise SeerError(f"--threshold must be a finite number, 0 or more, got {threshold}.")
    if local_blocks is not None and local_blocks < 0:
        raise SeerError(f"--local-blocks must be 0 or more, got {local_blocks}.")
    if max_tokens < 1:
        raise SeerError(f"--max-tokens must be at least 1, got {max_tokens}.")
    if not (temperature >= 0 and math.isfinite(temperature)):
        raise SeerError(f"--temp must be 0 or more, got {temperature}.")
    if not (0 < top_p <= 1):
        raise SeerError(f"--top-p must be in (0, 1], got {top_p}.")
    if top_k < 0:
        raise SeerError(f"--top-k must be 0 or more, got {top_k}.")
    if truncate is not None and truncate not in TRUNCATE_MODES:
        raise SeerError(f"--truncate must be one of {', '.join(TRUNCATE_MODES)}, got {truncate!r}.")


def context_settings(*flags) -> ContextSettings:
    """The context flags in ContextSettings' order (--ctx-size, --rope-scaling, --rope-scale,
    --yarn-orig-ctx, --yarn-attn-factor, --yarn-beta-fast, --yarn-beta-slow), checked before
    any model is loaded."""
    settings = ContextSettings(*flags)
    settings.check()
    return settings
