"""Attention of one layer alone: dense SDPA per backend against seer's sparse path (gate
scoring, block selection, the block-sparse kernel), and where sparse starts to pay."""

import warnings
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from seer_gates import (
    AttnGate,
    MaskPolicy,
    achieved_sparsity,
    block_count,
    block_rope_tables,
    default_rotary,
    gate_block_lists,
    select_blocks,
)
from seer_kernels import (
    block_sparse_attention_cpu,
    block_sparse_attention_from_lists,
    block_sparse_attention_reference,
)

from ..engine.attention import attention_kernel, kept_lists
from ..engine.runtime import model_shape, pick_dtype
from .report import Column, Report, Stat, ratio
from .settings import ProgressCallback, row_name, run_info, sparsity_label
from .timing import times_ms

# A repeat of a short call makes enough calls to last this long, so timer resolution is no issue.
MIN_REPEAT_MS = 25.0
BACKEND_LABELS = {"flash": "flash", "cudnn": "cuDNN", "math": "math"}


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
        run_info(name, config, device, dtype, repeats, gates="random"),
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

    The path is ``SparsePrefill.attend``'s for a prompt in one pass: on a GPU the fused gate
    kernels pool the raw keys and write the kernel's per-row block lists (``gates``), and the
    Triton kernel runs on them (``attention``); on the CPU the gate's scores
    go through the PyTorch selection to the same lists, and the CPU kernel takes them (or, with
    ``SEER_ATTENTION_KERNEL=reference``, to a mask that the reference takes).
    """
    q, k, v = inputs.q, inputs.k, inputs.v

    def scores() -> torch.Tensor:
        return gate(inputs.gate_q, inputs.gate_k, inputs.cos, inputs.sin)

    def fused_lists():
        return gate_block_lists(gate, inputs.gate_q, inputs.gate_k, inputs.cos, inputs.sin,
                                policy)  # fmt: skip

    kernel = attention_kernel(device)
    if kernel in ("triton", "cpu"):
        nb = block_count(q.shape[2])
        if kernel == "triton":
            gates, sparse_attention = fused_lists, block_sparse_attention_from_lists
        else:
            gates = lambda: kept_lists(scores(), policy, nb)
            sparse_attention = block_sparse_attention_cpu
        indices, counts = gates()
        attention = partial(sparse_attention, q, k, v, indices, counts)
        total = lambda: sparse_attention(q, k, v, *gates())
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
