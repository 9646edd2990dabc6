"""Loading a model with its gates once, then generating: the core of the engine's API."""

from dataclasses import dataclass, field, replace
from pathlib import Path

from .context import ContextSettings, ModelContext
from .errors import SeerError
from .generation import GenerationResult, SamplingOptions, default_ubatch_size, generate
from .identity import describe, find_shipped_gates, model_identity, trained_rope_scaling
from .models import load_model, resolve_model
from .placement import Placement
from .prompt import PromptTokens, build_prompt
from .prompt_cache import PromptCache

DTYPES = ("auto", "float32", "float16", "bfloat16")
DEVICES = ("auto", "cpu", "cuda")


@dataclass
class EngineOptions:
    """``gates``: a gate file or published folder, ``auto`` (the gates shipped for the model) or
    ``pooled`` (training-free). With neither sparsity nor threshold, or ``dense``, attention is
    the unmodified model's. ``device_map`` (``auto``, ``balanced``, ``sequential``, a device or
    a ``{module name: device}`` map, as JSON text or a dict) and ``max_memory``
    (``"0=70GiB,1=70GiB,cpu=100GiB"`` or a dict) spread the model over several devices.
    ``context``: the context size and RoPE scaling of prompts past the native context.
    ``ubatch_size``: prompts are prefilled in chunks of this many tokens (a multiple of 64; 0:
    in one pass; None: ``generation.default_ubatch_size``, chunks of 16384 for sparse prompts
    past 32768 tokens, else one pass), which bounds the activations' memory.
    ``local_blocks``: key blocks before each diagonal that sparse prefill always keeps
    (``MaskPolicy.local_blocks``); None: the window the gate file names (0 where it names
    none, and for the pooled estimator). ``budget``: how a sparsity is spent
    (``MaskPolicy.budget``); None: as the gate file names (row where it names none)."""

    model: str | None = None
    gates: str = "auto"
    sparsity: float | None = None
    threshold: float | None = None
    local_blocks: int | None = None
    budget: str | None = None  # None: the gate file's (row without one)
    dense: bool = False
    device: str = "auto"
    dtype: str = "auto"
    sparse_min_tokens: int | None = None  # None: the device's measured crossover
    device_map: str | dict | None = None
    max_memory: str | dict | None = None
    context: ContextSettings = field(default_factory=ContextSettings)
    ubatch_size: int | None = None

    @property
    def sparse(self) -> bool:
        return not self.dense and (self.sparsity is not None or self.threshold is not None)


def pick_device(name: str, placement=None):
    """The torch device for ``--device``; with a ``placement.Placement``, its main device,
    which an explicit ``--device`` must agree with."""
    import torch

    if placement is not None:
        main = placement.main_device()
        if name != "auto" and pick_device(name).type != main.type:
            raise SeerError(f"--device {name} contradicts --device-map, which runs on {main}.")
        return main
    if name not in DEVICES:
        raise SeerError(f"unknown device {name!r} (choose from {', '.join(DEVICES)}).")
    if name == "cuda" and not torch.cuda.is_available():
        raise SeerError("--device cuda was asked for, but no CUDA GPU is available.")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def pick_dtype(name: str, device):
    """``--dtype``'s torch dtype; ``auto``: bfloat16 on a GPU and on a CPU that multiplies it in
    hardware (:func:`cpu_multiplies_bfloat16`), else float32."""
    import torch

    if name not in DTYPES:
        raise SeerError(f"unknown dtype {name!r} (choose from {', '.join(DTYPES)}).")
    if name == "auto":
        native = device.type == "cuda" or cpu_multiplies_bfloat16(device)
        return torch.bfloat16 if native else torch.float32
    return getattr(torch, name)


def cpu_multiplies_bfloat16(device) -> bool:
    """Whether ``device`` is a CPU with AMX tiles, which multiply bfloat16 matrices in hardware:
    on the 2-core Xeon of BENCHMARKS.md 10× float32's rate (5.6 against 55.7 ms for 8192×576 by
    576×1536), which made the default model's 32k prefill 1.5× faster. Not under the Triton
    interpreter, whose kernels take float32 or float16 only."""
    import torch
    from seer_kernels import interpreting

    if device.type != "cpu" or interpreting():
        return False
    has_amx = getattr(torch.cpu, "_is_amx_tile_supported", None)  # torch has no public query
    return bool(has_amx and has_amx())


def model_shape(config) -> dict:
    heads = config.num_attention_heads
    return {
        "num_layers": config.num_hidden_layers,
        "num_q_heads": heads,
        "num_kv_heads": getattr(config, "num_key_value_heads", None) or heads,
        "head_dim": getattr(config, "head_dim", None) or config.hidden_size // heads,
    }


class Engine:
    def __init__(self, model, tokenizer, name: str, sparse_prefill=None, context=None):
        self.ubatch_size: int | None = None  # None: by prompt length, default_ubatch_size
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.sparse_prefill = sparse_prefill
        self.context = context or ModelContext(model, name, ContextSettings())
        self.prompt_cache = PromptCache()
        # Sparse prefill's (gates, policy) for prompts within the native context and past it.
        self.scorings: dict[bool, tuple] = {}
        if sparse_prefill is not None:
            native = (sparse_prefill.gates, sparse_prefill.policy)
            self.scorings = {False: native, True: native}

    @classmethod
    def load(cls, options: EngineOptions) -> "Engine":
        from seer_gates import MaskPolicy

        policy = None
        if options.sparse:
            try:
                policy = MaskPolicy(
                    sparsity=options.sparsity, threshold=options.threshold,
                    local_blocks=options.local_blocks or 0,  # None: the gate file's, below
                    budget=options.budget or "row",  # None: the gate file's, below
                )  # fmt: skip
            except ValueError as error:
                raise SeerError(str(error)) from error
        options.context.check()
        if options.ubatch_size is not None:
            check_ubatch_size(options.ubatch_size)
        placement = Placement.parse(options.device_map, options.max_memory)
        device = pick_device(options.device, placement)
        dtype = pick_dtype(options.dtype, device)
        if device.type == "cuda":
            from .gpu_warmup import start_gpu_warmup

            start_gpu_warmup(device, dtype)
        source = resolve_model(options.model)
        if policy is not None:
            check_gate_option(options.gates)
        model, tokenizer = load_model(source, device, dtype, placement)
        context = ModelContext(model, source.name, options.context)
        gate_path = resolve_gate_path(options.gates, model, source.name) if policy else None
        sparse_prefill = None
        if policy is not None:
            from .attention import SparsePrefill, default_min_sparse_tokens

            gates = None
            if gate_path:
                config, gates = load_model_gates(gate_path, model, source.name, device)
                policy = _with_gate_settings(policy, config, options)
            min_tokens = options.sparse_min_tokens
            if min_tokens is None:
                min_tokens = default_min_sparse_tokens(device, options.sparsity, dtype)
            sparse_prefill = SparsePrefill(model, policy, gates, min_tokens)
        else:
            from .attention import ATTENTION_NAME

            # Dense, as the model's own SDPA; but chunks attend to the cache without a
            # [chunk, cache] mask.
            model.set_attn_implementation(ATTENTION_NAME)
        engine = cls(model, tokenizer, source.name, sparse_prefill, context)
        engine.ubatch_size = options.ubatch_size
        if sparse_prefill is not None and options.gates == "auto":
            extended = _shipped_extended_scoring(options, context, source.name, device, policy)
            engine.scorings[True] = extended or engine.scorings[True]
        return engine

    @property
    def context_length(self) -> int:
        """The longest prompt plus answer: ``--ctx-size``, or its default for the model."""
        return self.context.size

    def prompt(
        self,
        *,
        document: str | None = None,
        instruction: str | None = None,
        system: str | None = None,
        max_tokens: int = 256,
        truncate: str | None = None,
    ) -> PromptTokens:
        return build_prompt(
            self.tokenizer,
            document=document,
            instruction=instruction,
            system=system,
            max_prompt_tokens=self.context_length - max_tokens,
            truncate=truncate,
        )

    def generate(
        self, prompt_ids: list[int], options: SamplingOptions, **callbacks
    ) -> GenerationResult:
        """Generate from ``prompt_ids``. The RoPE is the model's own when the prompt and up to
        ``options.max_tokens`` answer tokens fit the native context, else the scaled one.

        The prompt's cache is kept until the next call: when that call's prompt begins with the
        same tokens (``stats.cache_n``), only the rest is prefilled. ``prompt_cache.clear()``
        hands its memory back.
        """
        scaling = self.context.apply(len(prompt_ids) + options.max_tokens)
        if self.sparse_prefill is not None:
            self.sparse_prefill.use(*self.scorings[scaling is not None])
            self.sparse_prefill.stats.clear()
        ubatch_size = self.ubatch_size
        if ubatch_size is None:
            ubatch_size = default_ubatch_size(len(prompt_ids), self.sparse_prefill is not None)
        result = generate(
            self.model, self.tokenizer, prompt_ids, options, ubatch_size=ubatch_size,
            cache=self.prompt_cache.take(prompt_ids, scaling), **callbacks,
        )  # fmt: skip
        self.prompt_cache.keep(prompt_ids, result.cache, scaling)
        # Held by the prompt cache alone, which lets it go before a prompt that shares nothing.
        result.cache = None
        result.stats.set_context(self.context.size, self.context.native, scaling)
        if self.sparse_prefill is not None:
            result.stats.sparsity = self.sparse_prefill.stats.overall()
            result.stats.sparsity_per_layer = self.sparse_prefill.stats.per_layer()
            if result.stats.sparsity is not None:
                policy = self.sparse_prefill.policy
                result.stats.local_blocks = policy.local_blocks
                result.stats.scoring = self.sparse_prefill.scoring
                result.stats.budget = policy.budget if policy.sparsity is not None else None
        return result


def _shipped_extended_scoring(
    options: EngineOptions, context: ModelContext, model_name: str, device, policy
):
    """``(gates, policy)`` for prompts past the native context under ``--gates auto``: the
    shipped gates distilled under the context's RoPE extension with the window they name, or,
    where the model ships none for it, the training-free estimator without a window (past the
    native context it beats gates distilled within it at sparsity 0.95 and 0.97: EVAL.md);
    ``--local-blocks`` given overrides either window. None where the context is not extended."""
    model, scaling = context.model, context.plan.scaling
    if scaling is None:
        return None
    path = resolve_gate_path("auto", model, model_name, rope_scaling=scaling.kind)
    if trained_rope_scaling(Path(path)) != scaling.kind:
        return None, replace(
            policy, local_blocks=options.local_blocks or 0, budget=options.budget or "row",
            rank_power=1.0,
        )  # fmt: skip
    config, gates = load_model_gates(path, model, model_name, device)
    return gates, _with_gate_settings(policy, config, options)


def _with_gate_settings(policy, config, options: EngineOptions):
    """``policy`` with what the gate file names where the options leave it open: the local
    window the gates are meant to run with, the budget a sparsity is spent with, and the rank
    power of a layer budget."""
    policy = replace(policy, rank_power=config.layer_rank_power)
    if options.local_blocks is None:
        policy = replace(policy, local_blocks=config.local_blocks)
    if options.budget is None and policy.sparsity is not None:
        policy = replace(policy, budget=config.budget)
    return policy


def check_ubatch_size(ubatch_size: int) -> None:
    if ubatch_size < 0 or ubatch_size % 64:
        raise SeerError(
            f"--ubatch-size must be 0 (one pass) or a multiple of 64 (the attention block), "
            f"got {ubatch_size}."
        )


def check_gate_option(gates: str) -> None:
    """Refuse a --gates file that does not exist before any model is loaded."""
    if gates not in ("auto", "pooled") and not Path(gates).exists():
        raise SeerError(f"gate file {gates} does not exist.")


def resolve_gate_path(gates: str, model, model_name: str, rope_scaling: str = "none") -> str | None:
    """The gate file for ``--gates`` on a loaded model; None means the training-free pooled
    estimator. ``auto`` picks the shipped file whose recorded model identity is this model's,
    distilled under ``rope_scaling`` where it has several (``find_shipped_gates``)."""
    if gates == "pooled":
        return None
    if gates != "auto":
        check_gate_option(gates)
        return gates
    path, shipped = find_shipped_gates(model, rope_scaling)
    if path is None:
        ours = describe(model_identity(model))
        theirs = "; ".join(shipped) or "none"
        raise SeerError(
            f"no gates are shipped for {model_name} ({ours}); shipped gates are for: {theirs}. "
            "Train them with `seer distill`, pass --gates FILE, or use --gates pooled."
        )
    return str(path)


def load_model_gates(path: str, model, model_name: str, device):
    """``(config, gates)`` of ``path``, checked against ``model``; gates on ``device``."""
    from seer_gates import GateFileError, GateMismatchError, check_fits, load_gates

    try:
        config, gates = load_gates(path)
        check_fits(config, model_name=model_name, **model_shape(model.config))
    except (GateFileError, GateMismatchError) as error:
        raise SeerError(str(error)) from error
    return config, gates.to(device).eval()
