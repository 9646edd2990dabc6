"""A whole model's time to first token, dense against sparse, with the sparse prefill split
into gate scoring + block selection, attention, and everything else; the prompt prefilled in
one pass or in chunks (``--ubatch-size``), with the peak memory of each."""

import contextlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import torch
from seer_gates import GateConfig, MaskPolicy, build_gates

from ..engine.attention import ATTENTION_NAME, SparsePrefill, SparsityStats
from ..engine.context import ContextSettings, ModelContext
from ..engine.errors import SeerError
from ..engine.fused_layers import fuse_layers
from ..engine.generation import default_ubatch_size, prefill
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

    def record(self, layer: int, kept, total: int, diagonals: bool = False) -> None:
        super().record(layer, kept, total, diagonals)
        self.on_record(layer)


class TimedSparsePrefill(SparsePrefill):
    """SparsePrefill, sparse at every prompt length (the profile finds where that pays), that
    while ``timeline`` is set marks three points of each layer's attention as
    ``(layer, call, point)``: ``start``, ``mask`` (the kept blocks are selected) and ``end``;
    ``call`` counts the layer's calls since the timeline was set (one per prefill chunk), and
    ``calls[layer]`` holds their number.

    ``SparsePrefill.attend`` records the kept block counts in ``stats`` after selecting the
    blocks and before running the kernel: that call makes the ``mask`` mark. Each layer's
    points are marked on the device that layer runs on.
    """

    def __init__(self, model, policy: MaskPolicy, gates: torch.nn.ModuleList | None):
        super().__init__(model, policy, gates, min_tokens=0)
        self.stats = _NotifyingStats(lambda layer: self._mark(layer, "mask"))
        self.timeline: Timeline | None = None
        self.calls: Counter = Counter()
        self._layer_device: torch.device | None = None

    def _mark(self, layer_idx: int, point: str) -> None:
        if self.timeline is not None:
            call = self.calls[layer_idx] - 1
            self.timeline.mark((layer_idx, call, point), self._layer_device)

    def attend(self, layer_idx: int, q, k, v, scaling, prompt_end=None) -> torch.Tensor:
        self._layer_device = q.device
        self.calls[layer_idx] += 1
        self._mark(layer_idx, "start")
        out = super().attend(layer_idx, q, k, v, scaling, prompt_end)
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


def instrumented_prefill(
    sparse: TimedSparsePrefill, input_ids: torch.Tensor, ubatch_size: int = 0
) -> Breakdown:
    """Run one prefill (in chunks of ``ubatch_size``, 0: one pass) with every layer's attention
    marked, and split its time; a chunked prefill sums each layer's time over the chunks."""
    timeline = Timeline(input_ids.device)
    gpus = model_gpus(sparse.model)
    sparse.timeline, sparse.calls = timeline, Counter()
    try:
        synchronize(input_ids.device)
        timeline.mark("start")
        prefill(sparse.model, input_ids, ubatch_size=ubatch_size)
        timeline.mark("end")
        for gpu in gpus:
            synchronize(gpu)
    finally:
        sparse.timeline = None
    calls = [(layer, call) for layer, count in sparse.calls.items() for call in range(count)]
    return Breakdown(
        total_ms=timeline.ms("start", "end"),
        gates_ms=sum(timeline.ms((*c, "start"), (*c, "mask")) for c in calls),
        attention_ms=sum(timeline.ms((*c, "mask"), (*c, "end")) for c in calls),
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
    """A model of ``config`` with random weights, created directly on ``device`` (in ``--dtype
    auto``'s dtype) or spread as ``placement`` says, and random-weight gates of the
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
    fuse_layers(model)  # as a loaded model has them
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
    Column("ubatch", "ubatch"),
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
    ubatch_sizes: tuple[int | None, ...] = (None,),
) -> Report:
    """Time to first token of the subject's model on random prompts of each length, dense and
    at each sparsity, prefilled in chunks of each of ``ubatch_sizes`` tokens (0: one pass;
    None: as ``seer generate`` does, see ``generation.default_ubatch_size``).

    Sparse rows also split one extra, instrumented prefill into gates + mask selection,
    attention and everything else; the timed prefills run without the instrumentation. A test
    that runs out of GPU memory gets a row without times and a note.
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
            "dense rows: transformers' SDPA attention (a chunk's causal mask aligned to its last "
            "key); breakdown of sparse rows: one extra prefill with every layer's attention "
            "timed, other = the rest of that prefill; ubatch 0: the prompt in one pass"
        ]
        + [f"prompts past the native {context.native} tokens: RoPE {scaling}"] * bool(scaling),
    )
    tests = [
        (length, ubatch, sparsity)
        for length in lengths
        for ubatch in ubatch_sizes
        for sparsity in (None, *sparsities)
    ]
    generator = torch.Generator().manual_seed(0)
    ids, dense_ttft = None, None
    for done, (length, asked_ubatch, sparsity) in enumerate(tests):
        ubatch = asked_ubatch
        if ubatch is None:
            ubatch = default_ubatch_size(length, sparsity is not None)
        if ids is None or ids.shape[1] != length:
            ids = torch.randint(model.config.vocab_size, (1, length), generator=generator)
            ids = ids.to(device)
            context.apply(length)
        on_test(done, len(tests), f"{row_name(length, sparsity)} ub{ubatch}")
        if sparsity is None:
            # Dense through seer's attention function without a sparse prefill: transformers'
            # SDPA for one pass, no [chunk, cache] mask for chunks.
            model.set_attn_implementation(ATTENTION_NAME)
            row = _prefill_row(length, None, ubatch, *_ttft(model, ids, repeats, gpus, ubatch))
            dense_ttft = row["ttft_ms"]
            row["speedup"] = Stat(1.0, 0.0) if dense_ttft is not None else None
        else:
            sparse = TimedSparsePrefill(model, MaskPolicy(sparsity=sparsity), subject.gates)
            try:
                row = _prefill_row(
                    length, sparsity, ubatch, *_ttft(model, ids, repeats, gpus, ubatch)
                )
                if row["ttft_ms"] is not None:
                    sparse.stats.clear()
                    breakdown = instrumented_prefill(sparse, ids, ubatch)
                    row.update(
                        achieved_sparsity=sparse.stats.overall(),
                        gates_ms=breakdown.gates_ms,
                        attention_ms=breakdown.attention_ms,
                        other_ms=breakdown.other_ms,
                    )
            finally:
                sparse.detach()
        if row["ttft_ms"] is None:
            report.notes.append(f"{row['test']} ubatch {ubatch}: out of GPU memory")
        elif sparsity is not None and dense_ttft is not None:
            row["speedup"] = ratio(dense_ttft, row["ttft_ms"])
        report.rows.append(row)
    return report


def _ttft(
    model, input_ids: torch.Tensor, repeats: int, gpus: list[torch.device], ubatch_size: int = 0
) -> tuple[Stat | None, float | None, dict[str, float]]:
    """Prefill time of warm calls (``Stat``, ms), of the first call (ms, see ``first_call_ms``)
    and the peak memory of each GPU in GB (none on the CPU); times None when the GPU ran out of
    memory. The prompt goes in chunks of ``ubatch_size`` tokens (0: one pass).

    The clock's events go on the inputs' device, where the outputs come back to at the end.
    """
    device = input_ids.device
    for gpu in gpus:
        torch.cuda.reset_peak_memory_stats(gpu)
    on_device = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()

    def run():
        return prefill(model, input_ids, ubatch_size=ubatch_size)

    try:
        with on_device:
            first = first_call_ms(run, device)
            ttft = Stat.of(times_ms(run, repeats, device))
    except torch.OutOfMemoryError:
        # The failed prefill's tensors are gone with its frames: hand their memory back.
        torch.cuda.empty_cache()
        return None, None, {}
    return ttft, first, {str(gpu): torch.cuda.max_memory_allocated(gpu) / 1e9 for gpu in gpus}


def _prefill_row(
    length: int,
    sparsity: float | None,
    ubatch: int,
    ttft: Stat | None,
    first_ms: float | None,
    peaks: dict[str, float],
) -> dict:
    """A row without speedup (the caller sets it against the dense row) or breakdown."""
    return {
        "test": row_name(length, sparsity),
        "n_prompt": length,
        "sparsity": sparsity,
        "ubatch": ubatch,
        "first_ms": first_ms,
        "ttft_ms": ttft,
        "speedup": None,
        "peak_memory_gb": sum(peaks.values()) if peaks else None,
        "peak_memory_gb_per_device": peaks or None,
    }
