"""A whole model's time to first token, dense against sparse, with the sparse prefill split
into gate scoring + block selection, attention, and everything else."""

import contextlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import torch
from seer_gates import GateConfig, MaskPolicy, build_gates

from ..engine.attention import SparsePrefill, SparsityStats
from ..engine.context import ContextSettings, ModelContext
from ..engine.errors import SeerError
from ..engine.generation import prefill
from ..engine.placement import Placement, input_device, layer_devices, model_gpus, random_model
from ..engine.runtime import model_shape, pick_dtype
from .report import Column, Report, Stat, ratio
from .settings import ProgressCallback, row_name, run_info
from .timing import Timeline, first_call_ms, synchronize, times_ms

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
    blocks and before running the kernel: that call makes the ``mask`` mark. Each layer's
    points are marked on the device that layer runs on.
    """

    def __init__(self, model, policy: MaskPolicy, gates: torch.nn.ModuleList | None):
        super().__init__(model, policy, gates, min_tokens=0)
        self.stats = _NotifyingStats(lambda layer: self._mark(layer, "mask"))
        self.timeline: Timeline | None = None
        self._layer_device: torch.device | None = None

    def _mark(self, layer_idx: int, point: str) -> None:
        if self.timeline is not None:
            self.timeline.mark((layer_idx, point), self._layer_device)

    def attend(self, layer_idx: int, q, k, v, scaling: float | None) -> torch.Tensor:
        self._layer_device = q.device
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
    timeline = Timeline(input_ids.device)
    gpus = model_gpus(sparse.model)
    sparse.timeline = timeline
    try:
        synchronize(input_ids.device)
        timeline.mark("start")
        prefill(sparse.model, input_ids)
        timeline.mark("end")
        for gpu in gpus:
            synchronize(gpu)
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
    context: ModelContext | None = None  # RoPE by prompt length; None: the native context


def random_subject(
    name: str, config, gates: str, device: torch.device, placement: Placement | None = None
) -> PrefillSubject:
    """A model of ``config`` with random weights, created directly on ``device`` (bfloat16 on a
    GPU, float32 on the CPU) or spread as ``placement`` says, and random-weight gates of the
    published shape, or the pooled estimator for ``gates="pooled"``. Speed does not depend on
    the weights' values."""
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
    dtype = pick_dtype("auto", device)
    if placement is not None:
        model = random_model(config, dtype, placement)
    else:
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(
                config, dtype=dtype, attn_implementation="sdpa"
            )
    if gates == "pooled":
        return PrefillSubject(name, model.eval(), None, "random", "pooled")
    shape = model_shape(config)
    random_gates = build_gates(GateConfig(base_model=name, **shape)).to(device).eval()
    return PrefillSubject(name, model.eval(), random_gates, "random", "random")


def loaded_subject(
    model: str | None,
    gates: str,
    device: torch.device,
    device_map: str | None = None,
    max_memory: str | None = None,
    context: ContextSettings | None = None,
) -> PrefillSubject:
    """A model loaded from ``--model`` (None: the default model) with its gates as ``seer
    generate`` would load them (``auto``, ``pooled`` or a gate file), spread over devices by
    ``device_map`` and ``max_memory`` and with its context extended by ``context`` as there."""
    from ..engine.runtime import Engine, EngineOptions

    # Any sparsity loads the gates; each profiled sparsity then gets its own SparsePrefill.
    options = EngineOptions(
        model=model, gates=gates, sparsity=0.5, device=device.type,
        device_map=device_map, max_memory=max_memory, context=context or ContextSettings(),
    )  # fmt: skip
    engine = Engine.load(options)
    engine.sparse_prefill.detach()
    label = {"auto": "shipped"}.get(gates, gates)
    return PrefillSubject(
        engine.name, engine.model, engine.sparse_prefill.gates, "pretrained", label, engine.context
    )


PREFILL_COLUMNS = [
    Column("test", "test"),
    Column("n_prompt", "n_prompt", markdown=False),
    Column("sparsity", "sparsity", markdown=False),
    Column("first_ms", "1st call ms"),
    Column("ttft_ms", "TTFT ms"),
    Column("speedup", "speedup vs dense"),
    Column("peak_memory_gb", "peak memory GB"),
    Column("achieved_sparsity", "achieved sparsity", digits=3),
    Column("gates_ms", "gates+mask ms"),
    Column("attention_ms", "attention ms"),
    Column("other_ms", "other ms"),
]
# Added to the table when the model runs on several GPUs; peak_memory_gb is then their sum.
PER_GPU_COLUMN = Column("peak_memory_gb_per_device", "peak memory GB per GPU")


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
    context = subject.context or ModelContext(model, subject.name, ContextSettings())
    scaling = context.scaling_for(lengths[-1])  # refuses lengths past the context
    device, gpus = input_device(model), model_gpus(model)
    layers_per_device = Counter(str(layer_device) for layer_device in layer_devices(model))
    spread = {"layers_per_device": dict(layers_per_device)} if len(layers_per_device) > 1 else {}
    info = run_info(
        subject.name, model.config, device, model.dtype, repeats,
        weights=subject.weights, gates=subject.gates_label, **spread,
    )  # fmt: skip
    if len(gpus) > 1:
        info["device"] = f"{len(gpus)} × {info['device']}"
    columns = PREFILL_COLUMNS + [PER_GPU_COLUMN] * (len(gpus) > 1)
    report = Report(
        "prefill",
        info,
        columns,
        notes=[
            "dense rows: transformers' SDPA attention; breakdown of sparse rows: one extra "
            "prefill with every layer's attention timed, other = the rest of that prefill"
        ]
        + [f"prompts past the native {context.native} tokens: RoPE {scaling}"] * bool(scaling),
    )
    total = len(lengths) * (1 + len(sparsities))
    generator = torch.Generator().manual_seed(0)
    for index, length in enumerate(lengths):
        done = index * (1 + len(sparsities))
        ids = torch.randint(model.config.vocab_size, (1, length), generator=generator).to(device)
        context.apply(length)
        on_test(done, total, row_name(length, None))
        dense_ttft, first, peaks = _ttft(model, ids, repeats, gpus)
        report.rows.append(_prefill_row(length, None, dense_ttft, first, Stat(1.0, 0.0), peaks))
        for offset, sparsity in enumerate(sparsities, start=1):
            on_test(done + offset, total, row_name(length, sparsity))
            sparse = TimedSparsePrefill(model, MaskPolicy(sparsity=sparsity), subject.gates)
            try:
                ttft, first, peaks = _ttft(model, ids, repeats, gpus)
                sparse.stats.clear()
                breakdown = instrumented_prefill(sparse, ids)
                speedup = ratio(dense_ttft, ttft)
                row = _prefill_row(length, sparsity, ttft, first, speedup, peaks)
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


def _ttft(
    model, input_ids: torch.Tensor, repeats: int, gpus: list[torch.device]
) -> tuple[Stat, float, dict[str, float]]:
    """Prefill time of warm calls (``Stat``, ms), of the first call (ms, see ``first_call_ms``)
    and the peak memory of each GPU in GB (none on the CPU).

    The clock's events go on the inputs' device, where the outputs come back to at the end.
    """
    device = input_ids.device
    for gpu in gpus:
        torch.cuda.reset_peak_memory_stats(gpu)
    on_device = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
    with on_device:
        first = first_call_ms(lambda: prefill(model, input_ids), device)
        ttft = Stat.of(times_ms(lambda: prefill(model, input_ids), repeats, device))
    return ttft, first, {str(gpu): torch.cuda.max_memory_allocated(gpu) / 1e9 for gpu in gpus}


def _prefill_row(
    length: int,
    sparsity: float | None,
    ttft: Stat,
    first_ms: float,
    speedup: Stat,
    peaks: dict[str, float],
) -> dict:
    return {
        "test": row_name(length, sparsity),
        "n_prompt": length,
        "sparsity": sparsity,
        "first_ms": first_ms,
        "ttft_ms": ttft,
        "speedup": speedup,
        "peak_memory_gb": sum(peaks.values()) if peaks else None,
        "peak_memory_gb_per_device": peaks or None,
    }
