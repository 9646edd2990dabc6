"""Dense against sparse prefill, measured: attention alone (``profile_kernel``) and a whole
model's time to first token (``profile_prefill``).

Results are ``seer_cli.measure.report`` tables: one row per test (``pp32768 @ s0.90``), each time the
mean ± std over repeats after a warm-up. GPU times come from CUDA events; the attention-alone
timings clear the L2 cache before every call, as ``triton.testing.do_bench`` does. CPU times
come from the wall clock.

report = profile_kernel("llama-3.1-8b", load_config("llama-3.1-8b")[1], [8192], [0.9], 5, cuda)
print(seer_cli.measure.report.render(report, "md"))
"""

import importlib.resources
import json
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache, partial
from pathlib import Path

import torch
import torch.nn.functional as F
from seer_gates import (
    AttnGate,
    GateConfig,
    MaskPolicy,
    achieved_sparsity,
    block_count,
    block_rope_tables,
    build_gates,
    default_rotary,
    select_block_lists,
    select_blocks,
)
from seer_kernels import block_sparse_attention_from_lists, block_sparse_attention_reference
from transformers import AutoConfig

from ..engine.attention import SparsePrefill, SparsityStats, attention_kernel
from ..engine.runtime import model_shape, pick_device, pick_dtype
from ..engine.errors import SeerError
from ..engine.generation import prefill
from ..engine.models import SUPPORTED_MODEL_TYPES, resolve_model
from .report import Column, Report, Stat, ratio

OUTPUT_FORMATS = ("md", "json", "csv")
GPU_LENGTHS = (8192, 32768, 131072)
CPU_LENGTHS = (256, 512)
# A repeat of a short call makes enough calls to last this long, so timer resolution is no issue.
MIN_REPEAT_MS = 25.0
# Larger than any GPU's L2 cache (triton.testing.do_bench clears the same amount).
L2_FLUSH_BYTES = 256 * 1024 * 1024
# Random models larger than this are refused on the CPU (float32: 4 bytes a parameter).
CPU_MAX_PARAMETERS = 2_000_000_000
BACKEND_LABELS = {"flash": "flash", "cudnn": "cuDNN", "math": "math"}

ProgressCallback = Callable[[int, int, str], None]


# ---------------------------------------------------------------- what to profile


def profile_device(name: str) -> torch.device:
    """The device to profile on; without a CUDA GPU only an explicit ``cpu`` is accepted."""
    device = pick_device(name)
    if device.type != "cuda" and name != "cpu":
        raise SeerError(
            "seer profile measures GPU speed and no CUDA GPU is available; "
            "pass --device cpu for a small CPU run."
        )
    return device


def parse_lengths(text: str | None, device: torch.device) -> list[int]:
    """Prompt lengths from ``"8192,32768"``, ascending and without repeats; None gives the
    defaults for the device (long on a GPU, short on the CPU)."""
    if text is None:
        return list(GPU_LENGTHS if device.type == "cuda" else CPU_LENGTHS)
    lengths = set()
    for item in text.split(","):
        item = item.strip()
        if not item.isdecimal() or int(item) < 1:
            raise SeerError(
                f"--lengths takes positive whole numbers separated by commas, got {item!r}."
            )
        lengths.add(int(item))
    return sorted(lengths)


def parse_sparsities(text: str) -> list[float]:
    """Sparsities from ``"0.5,0.9"``, each in [0, 1), ascending and without repeats."""
    sparsities = set()
    for item in text.split(","):
        try:
            value = float(item)
        except ValueError:
            raise SeerError(
                f"--sparsities takes numbers in [0, 1) separated by commas, got {item.strip()!r}."
            ) from None
        if not 0 <= value < 1:
            raise SeerError(f"--sparsities must each be in [0, 1), got {value}.")
        sparsities.add(value)
    return sorted(sparsities)


def check_settings(repeats: int, output: str) -> None:
    """Refuse a repeat count below 1 and an unknown output format, one sentence each."""
    if repeats < 1:
        raise SeerError(f"--repeats must be at least 1, got {repeats}.")
    if output not in OUTPUT_FORMATS:
        raise SeerError(f"--output must be one of {', '.join(OUTPUT_FORMATS)}, got {output!r}.")


def shipped_configs() -> list[str]:
    """Names of the model configs shipped in ``seer_cli/measure/configs``."""
    folder = importlib.resources.files("seer_cli.measure.configs")
    return sorted(
        item.name[: -len(".json")] for item in folder.iterdir() if item.name.endswith(".json")
    )


def load_config(name: str):
    """``(name, transformers config)`` from a shipped config name or a config.json path."""
    shipped = importlib.resources.files("seer_cli.measure.configs") / f"{name}.json"
    if shipped.is_file():
        text = shipped.read_text(encoding="utf-8")
    elif Path(name).is_file():
        text = Path(name).read_text(encoding="utf-8")
    else:
        raise SeerError(
            f"unknown config {name!r}: use {' or '.join(shipped_configs())}, "
            "or the path of a config.json file."
        )
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise SeerError(f"{name} is not valid JSON ({error}).") from error
    model_type = data.get("model_type") if isinstance(data, dict) else None
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise SeerError(
            f"{name} has model_type {model_type!r}; seer supports "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}."
        )
    try:
        return name, AutoConfig.for_model(**data)
    except (TypeError, ValueError) as error:
        raise SeerError(f"{name} is not a usable {model_type} config ({error}).") from error


def model_config(model: str):
    """``(name, transformers config)`` of a ``--model``, read without loading its weights."""
    source = resolve_model(model)
    kwargs = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    try:
        return source.name, AutoConfig.from_pretrained(source.folder, **kwargs)
    except (OSError, ValueError) as error:
        message = f"could not read the config of {source.name}: {error}".splitlines()[0]
        raise SeerError(message) from error


def check_context(lengths: list[int], name: str, config) -> None:
    """A whole model cannot take prompts longer than its context."""
    context = config.max_position_embeddings
    if lengths[-1] > context:
        raise SeerError(
            f"{lengths[-1]} tokens do not fit {name}, whose context is {context} tokens "
            "(max_position_embeddings)."
        )


def sparsity_label(sparsity: float) -> str:
    """``s0.90``: two decimals, more only where the value has them."""
    return f"s{sparsity:.2f}" if round(sparsity, 2) == sparsity else f"s{sparsity}"


def row_name(length: int, sparsity: float | None) -> str:
    """``pp8192 @ s0.90``, or ``pp8192 @ dense`` without a sparsity."""
    return f"pp{length} @ {'dense' if sparsity is None else sparsity_label(sparsity)}"


# ---------------------------------------------------------------- clocks


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@cache
def _l2_flush_buffer(device: torch.device) -> torch.Tensor:
    return torch.empty(L2_FLUSH_BYTES, dtype=torch.int8, device=device)


def times_ms(
    fn: Callable[[], object],
    repeats: int,
    device: torch.device,
    *,
    min_repeat_ms: float = 0.0,
    flush_l2: bool = False,
) -> list[float]:
    """Per repeat, the mean time in ms of one call of ``fn``, after one warm-up call.

    A repeat makes as many calls as last ``min_repeat_ms`` (at least one). ``flush_l2`` clears
    the GPU's L2 cache before every call, outside the timed span, so that no call finds its
    inputs left in the cache by the previous one.
    """
    flush = _l2_flush_buffer(device) if flush_l2 and device.type == "cuda" else None
    fn()  # warm-up: compilation, autotuning, allocator growth
    calls = 1
    if min_repeat_ms > 0:
        calls = max(1, math.ceil(min_repeat_ms / _mean_call_ms(fn, device, 1, flush)))
    return [_mean_call_ms(fn, device, calls, flush) for _ in range(repeats)]


def _mean_call_ms(fn, device: torch.device, calls: int, flush: torch.Tensor | None) -> float:
    if device.type != "cuda":
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        return (time.perf_counter() - start) * 1000 / calls
    spans = []
    for _ in range(calls):
        if flush is not None:
            flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        spans.append((start, end))
    torch.cuda.synchronize(device)
    return sum(start.elapsed_time(end) for start, end in spans) / calls


class Timeline:
    """Named points in time on one device: CUDA events on a GPU (recorded without waiting for
    the GPU), the wall clock on the CPU. Synchronize the device before reading spans."""

    def __init__(self, device: torch.device):
        self.device = device
        self._points = {}

    def mark(self, name) -> None:
        if self.device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self._points[name] = event
        else:
            self._points[name] = time.perf_counter()

    def ms(self, start, end) -> float:
        first, last = self._points[start], self._points[end]
        if self.device.type == "cuda":
            return first.elapsed_time(last)
        return (last - first) * 1000


def _info(name: str, config, device: torch.device, dtype, repeats: int, **extra) -> dict:
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    return {
        "model": name,
        **model_shape(config),
        "device": device_name,
        "dtype": str(dtype).removeprefix("torch."),
        "attention_kernel": attention_kernel(device),
        "repeats": repeats,
        "torch": torch.__version__,
        **extra,
    }


# ---------------------------------------------------------------- attention alone


def dense_backends(device: torch.device) -> dict:
    """The SDPA backends dense attention is timed with: flash and cuDNN on a GPU, math on the
    CPU."""
    from torch.nn.attention import SDPBackend

    if device.type == "cuda":
        return {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}
    return {"math": SDPBackend.MATH}


def kernel_columns(backends: list[str]) -> list[Column]:
    labels = [(name, BACKEND_LABELS[name]) for name in backends]
    return [
        Column("test", "test"),
        Column("n_prompt", "n_prompt", markdown=False),
        Column("sparsity", "sparsity", markdown=False),
        Column("achieved_sparsity", "achieved sparsity", digits=3),
        *(Column(f"dense_{name}_ms", f"dense {label} ms") for name, label in labels),
        Column("gates_ms", "gates+mask ms"),
        Column("attention_ms", "sparse attention ms"),
        Column("sparse_ms", "sparse total ms"),
        *(Column(f"speedup_{name}", f"speedup vs {label}") for name, label in labels),
    ]


@dataclass
class _AttentionInputs:
    """Random inputs of one length: q [1, Hq, s, d] and k/v [1, Hkv, s, d] for the kernels,
    the same queries and keys as [1, s, H, d] for the gate, and the gate's block RoPE tables
    [1, nb, h]."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    gate_q: torch.Tensor
    gate_k: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor

    @classmethod
    def random(cls, shape: dict, length: int, gate_hidden: int, device, dtype):
        head_dim = shape["head_dim"]
        q = torch.randn(1, shape["num_q_heads"], length, head_dim, device=device, dtype=dtype)
        k = torch.randn(1, shape["num_kv_heads"], length, head_dim, device=device, dtype=dtype)
        v = torch.randn_like(k)
        rotary = default_rotary(gate_hidden)
        cos, sin = block_rope_tables(rotary, block_count(length), 64, 1, device)
        gate_q, gate_k = q.transpose(1, 2).contiguous(), k.transpose(1, 2).contiguous()
        return cls(q, k, v, gate_q, gate_k, cos, sin)


@torch.inference_mode()
def profile_kernel(
    name: str,
    config,
    lengths: list[int],
    sparsities: list[float],
    repeats: int,
    device: torch.device,
    on_test: ProgressCallback = lambda done, total, test: None,
) -> Report:
    """Attention of one layer of ``config``'s shape at each length: dense SDPA per backend
    against the sparse path (a random-weight gate scoring the blocks, top-k block selection,
    the block-sparse kernel) at each sparsity. ``on_test(done, total, test)`` reports progress.
    """
    shape = model_shape(config)
    dtype = pick_dtype("auto", device)
    backends = dense_backends(device)
    torch.manual_seed(0)
    gate = AttnGate(shape["num_q_heads"], shape["num_kv_heads"], shape["head_dim"]).to(device)
    report = Report(
        "kernel",
        _info(name, config, device, dtype, repeats, gates="random"),
        kernel_columns(list(backends)),
    )
    total = len(lengths) * (1 + len(sparsities))
    for index, length in enumerate(lengths):
        done = index * (1 + len(sparsities))
        inputs = _AttentionInputs.random(shape, length, gate.hidden_size, device, dtype)
        on_test(done, total, row_name(length, None))
        dense = _dense_stats(inputs, backends, repeats, device, report.notes)
        for offset, sparsity in enumerate(sparsities, start=1):
            on_test(done + offset, total, row_name(length, sparsity))
            sparse = _sparse_stats(gate, inputs, MaskPolicy(sparsity=sparsity), repeats, device)
            report.rows.append(_kernel_row(length, sparsity, dense, sparse))
        del inputs
        if device.type == "cuda":
            torch.cuda.empty_cache()
    report.crossover = crossover(report.rows, list(backends))
    report.notes += crossover_notes(report.rows, report.crossover, list(backends))
    return report


def _dense_stats(inputs, backends: dict, repeats: int, device, notes: list[str]) -> dict:
    """Dense causal SDPA time per backend (``Stat``), None for a backend that cannot run here
    (with a note). K/V are repeated to the query heads first, untimed, so every backend can
    take them (as in benchmarks/bench_kernels.py)."""
    from torch.nn.attention import sdpa_kernel

    group = inputs.q.shape[1] // inputs.k.shape[1]
    k, v = inputs.k.repeat_interleave(group, dim=1), inputs.v.repeat_interleave(group, dim=1)
    call = partial(F.scaled_dot_product_attention, inputs.q, k, v, is_causal=True)
    stats = {}
    for name, backend in backends.items():
        try:
            with warnings.catch_warnings(), sdpa_kernel(backend):
                warnings.simplefilter("ignore")  # SDPA explains at length why it cannot run
                samples = times_ms(
                    call, repeats, device, min_repeat_ms=MIN_REPEAT_MS, flush_l2=True
                )
            stats[name] = Stat.of(samples)
        except torch.cuda.OutOfMemoryError:
            raise
        except RuntimeError as error:
            stats[name] = None
            note = f"dense {BACKEND_LABELS[name]} cannot run here: {str(error).splitlines()[0]}"
            if note not in notes:
                notes.append(note)
    return stats


def _sparse_stats(gate, inputs, policy: MaskPolicy, repeats: int, device) -> dict:
    """Times (``Stat``) of the sparse path's pieces and whole, and the achieved sparsity.

    The path is ``SparsePrefill.attend``'s: on a GPU the gate scores the blocks, top-k selection
    writes the kernel's per-row block lists (``gates``), and the Triton kernel runs on them
    (``attention``); on the CPU the selection builds a mask and the reference takes it.
    """
    q, k, v = inputs.q, inputs.k, inputs.v

    def scores() -> torch.Tensor:
        return gate(inputs.gate_q, inputs.gate_k, inputs.cos, inputs.sin)

    if attention_kernel(device) == "triton":
        gates = lambda: select_block_lists(scores(), policy)
        indices, counts = gates()
        attention = partial(block_sparse_attention_from_lists, q, k, v, indices, counts)
        total = lambda: block_sparse_attention_from_lists(q, k, v, *gates())
        nb = block_count(q.shape[2])
        kept = int(counts.sum()) + counts.numel()  # the diagonal blocks are not in the lists
        achieved = 1 - kept / (counts.numel() * (nb + 1) / 2)
    else:
        gates = lambda: select_blocks(scores(), policy)
        attention = partial(block_sparse_attention_reference, q, k, v, gates())
        total = lambda: block_sparse_attention_reference(q, k, v, gates())
        achieved = achieved_sparsity(gates())
    timed = {
        name: Stat.of(times_ms(fn, repeats, device, min_repeat_ms=MIN_REPEAT_MS, flush_l2=True))
        for name, fn in (("gates", gates), ("attention", attention), ("total", total))
    }
    return {**timed, "achieved": achieved}


def _kernel_row(length: int, sparsity: float, dense: dict, sparse: dict) -> dict:
    row = {
        "test": row_name(length, sparsity),
        "n_prompt": length,
        "sparsity": sparsity,
        "achieved_sparsity": sparse["achieved"],
        "gates_ms": sparse["gates"],
        "attention_ms": sparse["attention"],
        "sparse_ms": sparse["total"],
    }
    for backend, stat in dense.items():
        row[f"dense_{backend}_ms"] = stat
        row[f"speedup_{backend}"] = ratio(stat, sparse["total"]) if stat else None
    return row


def _fastest_dense(row: dict, backends: list[str]) -> tuple[str, Stat] | None:
    timed = [(name, row[f"dense_{name}_ms"]) for name in backends if row[f"dense_{name}_ms"]]
    return min(timed, key=lambda item: item[1].mean) if timed else None


def _pays(row: dict, backends: list[str]) -> bool:
    fastest = _fastest_dense(row, backends)
    return fastest is not None and row["sparse_ms"].mean < fastest[1].mean


def crossover(rows: list[dict], backends: list[str]) -> list[dict]:
    """Per sparsity, the shortest tested length from which the sparse total beats the fastest
    dense backend at that and every longer tested length (``pays_from``; None if it does not
    beat it at the longest)."""
    result = []
    for sparsity in sorted({row["sparsity"] for row in rows}):
        ordered = sorted((r for r in rows if r["sparsity"] == sparsity), key=_length)
        pays_from = None
        for row in reversed(ordered):
            if not _pays(row, backends):
                break
            pays_from = row["n_prompt"]
        result.append({"sparsity": sparsity, "pays_from": pays_from})
    return result


def _length(row: dict) -> int:
    return row["n_prompt"]


def crossover_notes(rows: list[dict], crossovers: list[dict], backends: list[str]) -> list[str]:
    """One sentence per sparsity: from which tested length sparse attention pays, with the
    times at that length and at the longest length below it where it does not."""
    notes = []
    for item in crossovers:
        sparsity, pays_from = item["sparsity"], item["pays_from"]
        ordered = sorted((r for r in rows if r["sparsity"] == sparsity), key=_length)
        label = sparsity_label(sparsity)
        if pays_from is None:
            notes.append(
                f"crossover: {label} does not pay at the tested lengths "
                f"({_versus(ordered[-1], backends)})"
            )
            continue
        paying = [row for row in ordered if row["n_prompt"] >= pays_from]
        below = [row for row in ordered if row["n_prompt"] < pays_from]
        shortest = "" if below else ", the shortest tested"
        losing = f"; {_versus(below[-1], backends)}" if below else ""
        notes.append(
            f"crossover: {label} pays from {pays_from} tokens{shortest} "
            f"({_versus(paying[0], backends)}{losing})"
        )
    return notes


def _versus(row: dict, backends: list[str]) -> str:
    """``at 8192: sparse 1.10 ms vs dense cuDNN 1.00 ms``."""
    fastest = _fastest_dense(row, backends)
    dense = f"dense {BACKEND_LABELS[fastest[0]]} {fastest[1].mean:.2f} ms" if fastest else "-"
    return f"at {row['n_prompt']}: sparse {row['sparse_ms'].mean:.2f} ms vs {dense}"


# ---------------------------------------------------------------- whole-model prefill


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
    info = _info(
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
