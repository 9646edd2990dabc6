"""Context extension: prompts longer than the model's native context, read through RoPE scaling.

The settings follow llama.cpp (``--ctx-size``, ``--rope-scaling none|linear|yarn``,
``--rope-scale``, ``--yarn-orig-ctx`` and YaRN's knobs ``--yarn-attn-factor``,
``--yarn-beta-fast``, ``--yarn-beta-slow``), plus ``--rope-scaling longrope``: per-frequency
factors measured for a model (``rope_factors/<model>.json``, LongRoPE's form), the default
where they serve the model and context and no YaRN setting is given (else YaRN): on the default
model they continue a held-out novel better than any YaRN setting tried (README, Long context).
The scaling itself is transformers' own rope types
(``rope_parameters`` with ``rope_type`` linear, yarn or longrope), built into a second rotary
module of the model's own class. A sequence that fits the native context runs with the model's
RoPE, unscaled; a longer one, up to the context size, with the scaled module, which stays in
place for the decode steps after its prefill. The gates' block RoPE reads the rotary module in place
(``attention.block_rope``), so it follows the switch.

    context = ModelContext(model, "SmolLM2-135M-Instruct", ContextSettings())
    scaling = context.apply(len(prompt_ids) + max_new_tokens)  # None: native RoPE
"""

import copy
import functools
import json
import math
from dataclasses import dataclass, replace
from importlib import resources

from .errors import SeerError

ROPE_SCALINGS = ("none", "linear", "yarn", "longrope")
# Models whose default context is longer than their native one: the bundled SmolLM2 reads 8192
# tokens natively and 32768 under YaRN ×4 (README, Long context).
EXTENDED_CONTEXT = {"SmolLM2-135M-Instruct": 32768}
# YaRN's knobs when not given: llama.cpp's defaults, which are transformers' too (attention
# factor 1 keeps transformers' own attention scaling).
YARN_ATTN_FACTOR = 1.0
YARN_BETA_FAST = 32.0
YARN_BETA_SLOW = 1.0
# YaRN's (beta_fast, beta_slow) measured best for a model at its extended context, used when
# neither is given: SmolLM2 at 32768 tokens, +13.6 % tail perplexity over native 8k against
# +20.2 % with the defaults (EVAL.md, Long context).
MEASURED_YARN_BETAS = {"SmolLM2-135M-Instruct": (128.0, 2.0)}


@dataclass(frozen=True)
class MeasuredFactors:
    """Per-frequency RoPE factors measured for one model (``rope_factors/<model>.json``): the
    frequency of rotary pair i is divided by ``long_factor[i]`` and cos/sin are multiplied by
    ``attention_factor`` (transformers' longrope), for sequences up to ``ctx_size`` tokens of a
    model whose native context is ``original_ctx``; ``measured`` says how they were fitted."""

    model: str
    original_ctx: int
    ctx_size: int
    long_factor: tuple[float, ...]
    attention_factor: float
    measured: str

    def fit(self, config, size: int) -> bool:
        """Whether these factors serve ``config``'s model at ``size`` tokens."""
        head_dim = getattr(config, "head_dim", None) or (
            config.hidden_size // config.num_attention_heads
        )
        return (
            config.max_position_embeddings == self.original_ctx
            and size <= self.ctx_size
            and 2 * len(self.long_factor) == head_dim
        )


@functools.cache
def measured_factors(model_name: str) -> MeasuredFactors | None:
    """The factors seer ships for ``model_name``, or None."""
    file = resources.files(__package__) / "rope_factors" / f"{model_name}.json"
    if not file.is_file():
        return None
    fields = json.loads(file.read_text())
    return MeasuredFactors(**{**fields, "long_factor": tuple(fields["long_factor"])})


@dataclass(frozen=True)
class ContextSettings:
    """What the user asked for (llama.cpp's flags); None takes the default."""

    ctx_size: int | None = None
    rope_scaling: str | None = None
    rope_scale: float | None = None
    yarn_orig_ctx: int | None = None
    yarn_attn_factor: float | None = None
    yarn_beta_fast: float | None = None
    yarn_beta_slow: float | None = None

    def check(self) -> None:
        """Refuse nonsense values before a model is loaded, one sentence each."""
        if self.ctx_size is not None and self.ctx_size < 1:
            raise SeerError(f"--ctx-size must be at least 1 token, got {self.ctx_size}.")
        if self.rope_scaling is not None and self.rope_scaling not in ROPE_SCALINGS:
            raise SeerError(
                f"--rope-scaling must be one of {', '.join(ROPE_SCALINGS)}, "
                f"got {self.rope_scaling!r}."
            )
        scale = self.rope_scale
        if scale is not None and not (math.isfinite(scale) and scale >= 1):
            raise SeerError(f"--rope-scale must be a factor of at least 1, got {scale}.")
        if self.yarn_orig_ctx is not None and self.yarn_orig_ctx < 1:
            raise SeerError(f"--yarn-orig-ctx must be at least 1 token, got {self.yarn_orig_ctx}.")
        if self.rope_scaling in ("none", "longrope") and (
            scale is not None or self.yarn_orig_ctx is not None
        ):
            raise SeerError("--rope-scale and --yarn-orig-ctx need --rope-scaling linear or yarn.")
        if self.rope_scaling == "linear" and self.yarn_orig_ctx is not None:
            raise SeerError("--yarn-orig-ctx applies to --rope-scaling yarn only.")
        knobs = {
            "--yarn-attn-factor": self.yarn_attn_factor,
            "--yarn-beta-fast": self.yarn_beta_fast,
            "--yarn-beta-slow": self.yarn_beta_slow,
        }
        for flag, value in knobs.items():
            if value is not None and not (math.isfinite(value) and value > 0):
                raise SeerError(f"{flag} must be a positive number, got {value}.")
        fast = self.yarn_beta_fast or YARN_BETA_FAST
        slow = self.yarn_beta_slow or YARN_BETA_SLOW
        if slow >= fast:
            raise SeerError(f"--yarn-beta-slow {slow:g} must be below --yarn-beta-fast {fast:g}.")
        given = [flag for flag, value in knobs.items() if value is not None]
        if self.rope_scaling in ("none", "linear", "longrope") and given:
            raise SeerError(f"{given[0]} applies to --rope-scaling yarn only.")


@dataclass(frozen=True)
class RopeScaling:
    """One scaling in transformers' terms: ``kind`` linear, yarn or longrope, position
    ``factor``, and the ``original`` context it stretches (YaRN's
    original_max_position_embeddings); for YaRN also llama.cpp's knobs: ``attn_factor``
    multiplies YaRN's attention scaling, and frequencies turning more than ``beta_fast`` times
    over the original context are kept, fewer than ``beta_slow`` times interpolated, with a ramp
    between; for longrope the model's measured ``factors``."""

    kind: str
    factor: float
    original: int | None
    attn_factor: float = YARN_ATTN_FACTOR
    beta_fast: float = YARN_BETA_FAST
    beta_slow: float = YARN_BETA_SLOW
    factors: MeasuredFactors | None = None

    def rope_parameters(self, base: dict) -> dict:
        """transformers' ``rope_parameters`` for this scaling, on top of the model's ``base``
        (its rope_theta and any other keys); YaRN's knobs only when off their defaults."""
        params = {**base, "rope_type": self.kind, "factor": float(self.factor)}
        if self.kind == "longrope":
            # Short factors equal to the long ones: transformers would switch to the short ones
            # for positions within the original context; seer switches whole modules by length.
            factors = list(self.factors.long_factor)
            return {
                **params,
                "long_factor": factors,
                "short_factor": factors,
                "original_max_position_embeddings": self.original,
                "attention_factor": self.factors.attention_factor,
            }
        if self.kind != "yarn":
            return params
        params["original_max_position_embeddings"] = self.original
        knobs = self.changed_knobs()
        if "attn_factor" in knobs:
            # transformers' default attention_factor, for a RoPE without mscale keys (seer
            # extends plain RoPE only), is 0.1·ln(factor) + 1; llama.cpp's factor multiplies it.
            params["attention_factor"] = knobs["attn_factor"] * (0.1 * math.log(self.factor) + 1)
        for name in ("beta_fast", "beta_slow"):
            if name in knobs:
                params[name] = float(knobs[name])
        return params

    def changed_knobs(self) -> dict:
        """YaRN's knobs off their defaults: ``attn_factor``, ``beta_fast``, ``beta_slow``."""
        defaults = {
            "attn_factor": YARN_ATTN_FACTOR,
            "beta_fast": YARN_BETA_FAST,
            "beta_slow": YARN_BETA_SLOW,
        }
        return {
            name: getattr(self, name)
            for name, default in defaults.items()
            if getattr(self, name) != default
        }

    def __str__(self) -> str:
        if self.kind == "longrope":
            return f"LongRoPE ×{self.factor:g}, factors measured for the model"
        if self.kind != "yarn":
            return f"linear ×{self.factor:g}"
        knobs = self.changed_knobs().items()
        words = [f"{name.replace('_', ' ')} {value:g}" for name, value in knobs]
        return ", ".join([f"YaRN ×{self.factor:g} from {self.original}", *words])


def scaling_fields(scaling: RopeScaling | None) -> dict:
    """The RoPE a sequence ran with, in fields named after llama.cpp's flags (JSON output, gate
    metadata): ``rope_scaling`` none, linear, yarn or longrope; ``rope_scale``; ``yarn_orig_ctx``,
    ``yarn_attn_factor``, ``yarn_beta_fast`` and ``yarn_beta_slow`` (None unless YaRN)."""
    yarn = scaling is not None and scaling.kind == "yarn"
    return {
        "rope_scaling": scaling.kind if scaling else "none",
        "rope_scale": scaling.factor if scaling else None,
        "yarn_orig_ctx": scaling.original if yarn else None,
        "yarn_attn_factor": scaling.attn_factor if yarn else None,
        "yarn_beta_fast": scaling.beta_fast if yarn else None,
        "yarn_beta_slow": scaling.beta_slow if yarn else None,
    }


def rope_parameters_at_width(params: dict, width: int, new_width: int) -> dict:
    """``params`` of a rotary table ``width`` channels wide, for one ``new_width`` wide (the
    gates' block RoPE): longrope's per-frequency factors are resampled so that each frequency
    keeps its factor (interpolated between the model's frequencies, log-linearly); the other
    rope types do not depend on the width."""
    if params.get("rope_type") != "longrope" or width == new_width:
        return params
    import numpy

    # Pair j of the new table turns at base^(-2j / new_width): pair j · width / new_width's rate.
    pairs = numpy.arange(new_width // 2) * width / new_width

    def resample(factors):
        return numpy.interp(pairs, numpy.arange(len(factors)), factors).tolist()

    return {
        **params,
        "long_factor": resample(params["long_factor"]),
        "short_factor": resample(params["short_factor"]),
    }


@dataclass(frozen=True)
class ContextPlan:
    """``native``: the model's own context; ``size``: the longest sequence allowed; ``scaling``:
    the RoPE scaling of sequences longer than ``native`` (None when ``size`` ≤ ``native``)."""

    native: int
    size: int
    scaling: RopeScaling | None


def plan_context(config, model_name: str, settings: ContextSettings) -> ContextPlan:
    """The context of a loaded model's ``config`` under ``settings``, or SeerError saying why
    the settings cannot work for this model."""
    settings.check()
    native = config.max_position_embeddings
    if settings.ctx_size is not None:
        size = settings.ctx_size
    elif settings.rope_scaling == "none":
        size = native
    else:
        size = EXTENDED_CONTEXT.get(model_name, native)
    if size <= native:
        return ContextPlan(native, size, None)
    factors = measured_factors(model_name)
    kind = settings.rope_scaling or _default_scaling(settings, factors, config, size)
    if kind == "none":
        raise SeerError(
            f"--ctx-size {size} is longer than the native context of {model_name} ({native} "
            "tokens), and --rope-scaling none does not extend it."
        )
    own = (getattr(config, "rope_parameters", None) or {}).get("rope_type", "default")
    if own != "default":
        raise SeerError(
            f"{model_name} already scales its RoPE ({own}); seer extends only models with plain "
            f"RoPE, so --ctx-size can be at most {native}."
        )
    if kind == "longrope":
        return ContextPlan(native, size, _longrope(factors, config, model_name, size))
    original = settings.yarn_orig_ctx or native
    if original > native:
        raise SeerError(
            f"--yarn-orig-ctx {original} is longer than the native context of {model_name} "
            f"({native} tokens)."
        )
    factor = settings.rope_scale or size / original
    if factor * original < size:
        raise SeerError(
            f"--rope-scale {factor:g} stretches {original} tokens to {factor * original:g}, "
            f"short of --ctx-size {size}."
        )
    beta_fast, beta_slow = settings.yarn_beta_fast, settings.yarn_beta_slow
    if beta_fast is None and beta_slow is None:
        beta_fast, beta_slow = MEASURED_YARN_BETAS.get(model_name, (None, None))
    scaling = RopeScaling(
        kind, factor, original,
        attn_factor=settings.yarn_attn_factor or YARN_ATTN_FACTOR,
        beta_fast=beta_fast or YARN_BETA_FAST,
        beta_slow=beta_slow or YARN_BETA_SLOW,
    )  # fmt: skip
    return ContextPlan(native, size, scaling)


def _default_scaling(settings: ContextSettings, factors, config, size: int) -> str:
    """longrope where seer measured factors that serve this model and size and no YaRN
    setting is given, else yarn."""
    stretched = settings.rope_scale is not None or settings.yarn_orig_ctx is not None
    knobs = (settings.yarn_attn_factor, settings.yarn_beta_fast, settings.yarn_beta_slow)
    if factors is None or stretched or any(knob is not None for knob in knobs):
        return "yarn"
    return "longrope" if factors.fit(config, size) else "yarn"


def _longrope(factors, config, model_name: str, size: int) -> RopeScaling:
    """The measured factors' scaling for ``size`` tokens, or SeerError saying why they do not
    serve this model."""
    if factors is None:
        raise SeerError(
            f"seer has no measured LongRoPE factors for {model_name}; use --rope-scaling yarn."
        )
    if not factors.fit(config, size):
        raise SeerError(
            f"the LongRoPE factors of {model_name} serve {factors.original_ctx}-token models up "
            f"to {factors.ctx_size} tokens, not --ctx-size {size} on this one; use "
            "--rope-scaling yarn."
        )
    original = factors.original_ctx
    return RopeScaling("longrope", factors.ctx_size / original, original, factors=factors)


class ModelContext:
    """The rotary module of a loaded model, switched by sequence length (see the module doc)."""

    def __init__(self, model, model_name: str, settings: ContextSettings):
        self.model = model
        self.name = model_name
        self.known_name = _known_name(model, model_name)
        self.plan = plan_context(model.config, self.known_name, settings)
        self._native = _float32_rotary(model)
        self._scaled = None

    @property
    def size(self) -> int:
        return self.plan.size

    @property
    def native(self) -> int:
        return self.plan.native

    def scaling_for(self, length: int) -> RopeScaling | None:
        """The scaling a sequence of ``length`` tokens runs under; SeerError if it is too long."""
        if length > self.size:
            raise SeerError(f"{length} tokens do not fit the context of {self.size} (--ctx-size).")
        return self.plan.scaling if length > self.native else None

    def apply(self, length: int) -> RopeScaling | None:
        """Install the RoPE for a sequence of ``length`` tokens (prompt and generated tokens
        together) and return its scaling, None for the model's own."""
        scaling = self.scaling_for(length)
        self.use(scaling)
        return scaling

    def use(self, scaling: RopeScaling | None) -> None:
        """Install the model's own RoPE (None) or the extension's ``plan.scaling``, whatever
        the length (to compare the two on the same tokens)."""
        if scaling not in (None, self.plan.scaling):
            raise ValueError(f"{scaling} is not this context's scaling ({self.plan.scaling}).")
        self.model.model.rotary_emb = self._native if scaling is None else self._scaled_rotary()

    def rescale(self, scaling: RopeScaling) -> None:
        """Make ``scaling`` the extension of longer sequences (to compare variants of it on one
        loaded model); installed by the next ``apply`` or ``use``."""
        self.plan = replace(self.plan, scaling=scaling)
        self._scaled = None

    def _scaled_rotary(self):
        if self._scaled is None:
            native, scaling = self._native, self.plan.scaling
            config = copy.deepcopy(native.config)
            config.rope_parameters = scaling.rope_parameters(config.rope_parameters)
            # transformers checks YaRN's factor against this ratio: state it exactly.
            config.max_position_embeddings = round(scaling.factor * scaling.original)
            # Built in float32 like the model's own; never cast to the model's dtype (positions
            # up to the context size need float32 frequencies). Placed where its inputs are.
            self._scaled = rotary_module(type(native), config, _rotary_input_device(self.model))
        return self._scaled


def rotary_module(rotary_class, config, device):
    """``rotary_class(config=config)`` on ``device``. A LongRoPE module whose short and long
    factors are one list (seer's extension, at any width) has fixed frequencies: transformers
    picks between the two again on every call, from the positions (a wait for the GPU; with
    transformers 5.17 the whole computation again: ~130 ms of the default model's first 32k
    prefill under a profiler on the H100 machine, for its two such modules), and that step is
    left out."""
    rotary = rotary_class(config=config).to(device)
    params = config.rope_parameters
    if rotary.rope_type == "longrope" and params["short_factor"] == params["long_factor"]:
        rotary.rope_type = "longrope, fixed"  # not "longrope": no per-call choice
    return rotary


def _known_name(model, model_name: str) -> str:
    """The name the defaults know a model by: a model given by another path (the bundled GGUF
    file, its converted copy) is recognised by the identity its shipped gates record."""
    if model_name in EXTENDED_CONTEXT:
        return model_name
    from .identity import find_shipped_gates, recorded_base_model

    path, _ = find_shipped_gates(model)
    return recorded_base_model(path) if path is not None else model_name


def _float32_rotary(model):
    """The model's rotary module, rebuilt in float32 if loading cast its frequencies to a
    narrower dtype (``model.to(bfloat16)`` does; transformers' own loading keeps them float32,
    and the scaled module is float32 too, so that native and scaled compare fairly)."""
    import torch

    rotary = model.model.rotary_emb
    if rotary.inv_freq.dtype != torch.float32:
        rotary = type(rotary)(config=rotary.config).to(_rotary_input_device(model))
        model.model.rotary_emb = rotary
    return rotary


def _rotary_input_device(model):
    """Where the rotary module's inputs (the embeddings and positions) are. On a model spread
    over devices the module it replaces may sit elsewhere, with an accelerate hook moving them;
    the replacement has no hook, so it goes to them."""
    from .placement import input_device

    return input_device(model)
