"""Prefill, token-by-token decode, streaming and timing stats.

``prefill`` and ``decode_one_token`` are separate so each can be timed; the clock is read only
after the device has finished its work.
"""

import functools
import inspect
import itertools
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TextStreamer,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from .kv_cache import new_cache
from .placement import input_device, model_gpus

ATTENTION_BLOCK = 64  # tokens per attention block: chunk boundaries fall on block edges
# Prompt tokens per chunk of a sparse prefill. On an H100 (8B config, 128k tokens, sparsity
# 0.9) chunks of 16384 cut the peak memory by 14 GB for +3.1 % time (BENCHMARKS.md). Dense
# prefill runs in one pass unless told otherwise: its chunks lose the cuDNN kernel (+48 %).
DEFAULT_UBATCH_SIZE = 16384
# Sparse prompts up to this long run in one pass: chunks save little memory there and cost
# time (H100, SmolLM2 shapes, 32768 tokens, sparsity 0.9: 85 ms in one pass, 118 ms in chunks).
ONE_PASS_MAX_TOKENS = 32768
# Attention backends of a decode step. Not cuDNN: it builds an execution graph per key length,
# so every step, one key longer than the last, paid a new graph (2.4 ms of host time per layer
# on an H100, ~90 ms per token for the default model; BENCHMARKS.md).
DECODE_ATTENTION = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def default_ubatch_size(prompt_tokens: int, sparse: bool) -> int:
    """The chunk size of a prompt when none is asked for (0: one pass)."""
    return DEFAULT_UBATCH_SIZE if sparse and prompt_tokens > ONE_PASS_MAX_TOKENS else 0


@dataclass
class SamplingOptions:
    """temperature 0 means greedy; top_k 0 and top_p 1 switch those filters off."""

    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None


@dataclass
class GenerationStats:
    """Field names follow llama.cpp's server, with ttft_ms, sparsity, the local window, the
    block scoring and the budget of sparse prefill (``local_blocks``, ``scoring``, ``budget``;
    None where the prompt was prefilled densely) and peak memory added.

    On GPUs ``peak_memory_gb`` sums the peaks of every GPU the model runs on, and
    ``peak_memory_gb_per_device`` holds each (``{"cuda:0": …}``); on the CPU it is the
    process's peak resident memory and the per-device map is empty.
    """

    prompt_n: int = 0  # prompt tokens prefilled
    cache_n: int = 0  # prompt tokens taken from the cache of an earlier prompt instead
    prompt_ms: float = 0.0
    predicted_n: int = 0
    predicted_ms: float = 0.0
    ttft_ms: float = 0.0
    sparsity: float | None = None
    sparsity_per_layer: list[float] = field(default_factory=list)
    local_blocks: int | None = None
    scoring: str | None = None  # "gates" or "pooled" (the training-free estimator)
    budget: str | None = None  # how a sparsity was spent: "row" or "layer"; None for a threshold
    peak_memory_gb: float = 0.0
    peak_memory_gb_per_device: dict[str, float] = field(default_factory=dict)
    truncated_tokens: int = 0
    interrupted: bool = False
    # The context (--ctx-size), the model's native one, and the RoPE this prompt ran with:
    # rope_scaling "none" is the model's own; "linear", "yarn" or "longrope" stretch positions by
    # rope_scale (YaRN from yarn_orig_ctx, with its knobs yarn_attn_factor, yarn_beta_fast,
    # yarn_beta_slow; longrope by the factors measured for the model).
    n_ctx: int | None = None
    n_ctx_train: int | None = None
    rope_scaling: str = "none"
    rope_scale: float | None = None
    yarn_orig_ctx: int | None = None
    yarn_attn_factor: float | None = None
    yarn_beta_fast: float | None = None
    yarn_beta_slow: float | None = None

    def set_context(self, n_ctx: int, n_ctx_train: int, scaling) -> None:
        """Record the context sizes and the ``context.RopeScaling`` in use (None: unscaled)."""
        from .context import scaling_fields

        self.n_ctx, self.n_ctx_train = n_ctx, n_ctx_train
        for name, value in scaling_fields(scaling).items():
            setattr(self, name, value)

    @property
    def prompt_per_second(self) -> float:
        return self.prompt_n / (self.prompt_ms / 1000) if self.prompt_ms else 0.0

    @property
    def predicted_per_second(self) -> float:
        return self.predicted_n / (self.predicted_ms / 1000) if self.predicted_ms else 0.0

    def to_dict(self) -> dict:
        data = asdict(self)
        data["prompt_per_second"] = self.prompt_per_second
        data["predicted_per_second"] = self.predicted_per_second
        return data


@dataclass
class GenerationResult:
    """The text, its stats, and the cache: the prompt and the answer's tokens, which a later
    prompt with the same beginning can continue."""

    text: str
    stats: GenerationStats
    cache: object = None


def _synchronize(gpus: list[torch.device]) -> None:
    for gpu in gpus:
        torch.cuda.synchronize(gpu)


def _gpu_peaks_gb(gpus: list[torch.device]) -> dict[str, float]:
    return {str(gpu): torch.cuda.max_memory_allocated(gpu) / 1e9 for gpu in gpus}


def _cpu_peak_gb() -> float:
    # ru_maxrss is in KiB on Linux, bytes on macOS.
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 1e9


def chunk_bounds(past: int, length: int, ubatch_size: int) -> list[tuple[int, int]]:
    """``(start, end)`` of the chunks of a prompt of ``length`` tokens that continues ``past``
    cached ones: at most ``ubatch_size`` tokens each (0: one chunk), a multiple of 64.

    Chunks end on multiples of 64 positions of the cache (the first is shorter when ``past`` is
    not one), so each later chunk starts an attention block: its blocks, scores and kept tiles
    are those of the whole prompt in one pass. A chunk of one token joins its neighbour: alone it
    would be taken for a decode step.
    """
    if ubatch_size < 0 or ubatch_size % ATTENTION_BLOCK:
        raise ValueError(f"ubatch_size must be 0 or a multiple of 64, got {ubatch_size}.")
    first_end = ubatch_size - past % ATTENTION_BLOCK
    first_end += ubatch_size if first_end == 1 else 0
    if ubatch_size == 0 or length <= first_end + 1:
        return [(0, length)]
    ends = [*range(first_end, length - 1, ubatch_size), length]
    return list(zip([0, *ends[:-1]], ends, strict=True))


@torch.inference_mode()
def prefill(
    model,
    input_ids: torch.Tensor,
    on_layer: Callable[[int, int], None] | None = None,
    *,
    cache=None,
    ubatch_size: int = 0,
):
    """Run the prompt through the model, in chunks of at most ``ubatch_size`` tokens against the
    growing cache (0: one pass; see ``chunk_bounds``). Returns (logits of the last position
    [b, vocab], cache).

    ``cache``: a cache the prompt continues (a second question over the same document), or None
    for a new one. ``on_layer(done, total)`` is called as each decoder layer starts, for
    progress display (total: layers × chunks).
    """
    cache = new_cache(model) if cache is None else cache
    past, length = cache.get_seq_length(), input_ids.shape[1]
    bounds = chunk_bounds(past, length, ubatch_size)
    layers = model.model.layers
    hooks = []
    if on_layer is not None:
        starts, total = itertools.count(), len(layers) * len(bounds)
        for layer in layers:
            hooks.append(layer.register_forward_pre_hook(lambda *_: on_layer(next(starts), total)))
    # Chunks tell seer's attention where the prompt ends (its budgets and dense last row).
    extra = {"seer_prompt_end": past + length} if len(bounds) > 1 else {}
    try:
        for start, end in bounds:
            out = model(
                input_ids=input_ids[:, start:end], **{cache_argument(model): cache},
                use_cache=True, logits_to_keep=1, **extra,
            )  # fmt: skip
    finally:
        for hook in hooks:
            hook.remove()
    return out.logits[:, -1], cache


@torch.inference_mode()
def decode_one_token(model, token: torch.Tensor, cache) -> torch.Tensor:
    """One decode step: token [b, 1] → logits [b, vocab]."""
    with sdpa_kernel(DECODE_ATTENTION):
        out = model(input_ids=token, **{cache_argument(model): cache}, use_cache=True)
    return out.logits[:, -1]


def cache_argument(model) -> str:
    """The name a model's forward takes its cache under: ``cache`` since transformers 5.25
    (which warns about the older ``past_key_values``), ``past_key_values`` before."""
    return _cache_argument_of(type(model))


@functools.cache
def _cache_argument_of(model_class) -> str:
    # Read once per class: decode asks on every token.
    parameters = inspect.signature(model_class.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


class _Sampler:
    def __init__(self, options: SamplingOptions, device: torch.device):
        self.greedy = options.temperature == 0
        warpers = [TemperatureLogitsWarper(options.temperature)] if not self.greedy else []
        if options.top_k > 0:
            warpers.append(TopKLogitsWarper(options.top_k))
        if options.top_p < 1:
            warpers.append(TopPLogitsWarper(options.top_p))
        self.warpers = LogitsProcessorList(warpers)
        self.generator = torch.Generator(device=device)
        if options.seed is not None:
            self.generator.manual_seed(options.seed)
        else:
            self.generator.seed()

    def __call__(self, input_ids: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """Next token [b, 1]; the warpers in use only look at the logits, not at input_ids."""
        if self.greedy:
            return logits.argmax(dim=-1, keepdim=True)
        probs = torch.softmax(self.warpers(input_ids, logits.float()), dim=-1)
        return torch.multinomial(probs, 1, generator=self.generator)


class _CallbackStreamer(TextStreamer):
    """transformers' streamer (whole words, no broken UTF-8), writing through a callback."""

    def __init__(self, tokenizer, on_text: Callable[[str], None]):
        super().__init__(tokenizer, skip_prompt=False, skip_special_tokens=True)
        self.on_text = on_text

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        if text:
            self.on_text(text)


def _stop_ids(model, tokenizer) -> set[int]:
    ids = model.generation_config.eos_token_id
    ids = set(ids if isinstance(ids, list) else [ids] if ids is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def generate(
    model,
    tokenizer,
    prompt_ids: list[int],
    options: SamplingOptions,
    *,
    on_text: Callable[[str], None] = lambda text: None,
    on_prefill_layer: Callable[[int, int], None] | None = None,
    on_first_token: Callable[[], None] = lambda: None,
    ubatch_size: int = 0,
    cache=None,
) -> GenerationResult:
    """Prefill ``prompt_ids`` (in chunks of ``ubatch_size`` tokens, 0: one pass), then sample up
    to ``options.max_tokens`` tokens, streaming text.

    ``cache``: holds the first tokens of ``prompt_ids`` already (an earlier prompt's, cropped to
    what the two share); only the rest is prefilled.

    Ctrl-C during decoding stops early and returns what was generated, marked interrupted.
    """
    device, gpus = input_device(model), model_gpus(model)
    for gpu in gpus:
        torch.cuda.reset_peak_memory_stats(gpu)
    sampler = _Sampler(options, device)
    stop_ids = _stop_ids(model, tokenizer)
    streamer = _CallbackStreamer(tokenizer, on_text)
    past = cache.get_seq_length() if cache is not None else 0
    stats = GenerationStats(prompt_n=len(prompt_ids) - past, cache_n=past)
    input_ids = torch.tensor([prompt_ids], device=device)
    generated: list[int] = []

    _synchronize(gpus)
    start = time.perf_counter()
    logits, cache = prefill(
        model, input_ids[:, past:], on_prefill_layer, cache=cache, ubatch_size=ubatch_size
    )
    token = sampler(input_ids, logits)
    _synchronize(gpus)
    stats.prompt_ms = stats.ttft_ms = (time.perf_counter() - start) * 1000
    on_first_token()

    decode_start = time.perf_counter()
    try:
        while True:
            token_id = int(token)
            if token_id in stop_ids:
                break
            generated.append(token_id)
            streamer.put(torch.tensor([token_id]))
            if len(generated) >= options.max_tokens:
                break
            token = sampler(input_ids, decode_one_token(model, token, cache))
    except KeyboardInterrupt:
        stats.interrupted = True
    streamer.end()
    _synchronize(gpus)
    stats.predicted_ms = (time.perf_counter() - decode_start) * 1000
    stats.predicted_n = len(generated)
    peaks = stats.peak_memory_gb_per_device = _gpu_peaks_gb(gpus)
    stats.peak_memory_gb = sum(peaks.values()) if gpus else _cpu_peak_gb()
    text = tokenizer.decode(generated, skip_special_tokens=True)
    return GenerationResult(text, stats, cache)
