"""What the Triton kernels share: input checks, launch conditions and the online-softmax step."""

import contextlib
import contextvars
import math
import os
from concurrent.futures import ThreadPoolExecutor

import torch
import triton
import triton.language as tl

BLOCK = 64  # tokens per block, for the gate and the kernels alike
SUPPORTED_HEAD_DIMS = (64, 128)
LOG2_E = 1.4426950408889634


def interpreting() -> bool:
    """True when Triton runs kernels through its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# Set inside compiling_ahead(): launchers compile without running, and note here what they
# compiled, with the CUDA device each is for.
_compiling_ahead = contextvars.ContextVar("seer_compiling_ahead", default=None)
# Kernels of one prefill compiled at once: features, selection, attention, a spare.
AHEAD_WORKERS = 4


def can_compile_ahead(device: torch.device) -> bool:
    """Whether :func:`compiling_ahead` works here: a GPU and a Triton with an async compile mode."""
    if device.type != "cuda" or interpreting():
        return False
    try:
        from triton.runtime._async_compile import AsyncCompileMode  # noqa: F401
    except ImportError:
        return False
    return True


@contextlib.contextmanager
def compiling_ahead():
    """Within, seer's launchers compile the kernels their arguments need instead of running
    them (what they return stays unwritten), all at once in worker threads; leaving waits for
    every compile, and then loads each kernel into its device with its launcher (a small C
    module Triton builds once per kernel signature), side by side too — work a kernel's first
    launch would otherwise do, one kernel after another. A fresh machine compiles the three
    kernels of a sparse prefill in 8.4 s one after another and 4.9 s at once (H100,
    BENCHMARKS.md). Needs :func:`can_compile_ahead`."""
    from triton.runtime._async_compile import AsyncCompileMode

    compiled = []
    token = _compiling_ahead.set(compiled)
    try:
        with ThreadPoolExecutor(AHEAD_WORKERS) as pool:
            with AsyncCompileMode(pool):
                yield
            list(pool.map(_load_compiled, compiled))
    finally:
        _compiling_ahead.reset(token)


def _load_compiled(entry) -> None:
    from triton.runtime._async_compile import FutureKernel

    kernel, device = entry
    if isinstance(kernel, FutureKernel):
        kernel = kernel.result()
    with torch.cuda.device(device):
        kernel._init_handles()  # what Triton runs on a compiled kernel's first launch


def only_compiling() -> bool:
    """Inside :func:`compiling_ahead`."""
    return _compiling_ahead.get() is not None


def run_kernel(kernel, grid, *args, **kwargs) -> None:
    """``kernel[grid](*args, **kwargs)``; inside :func:`compiling_ahead`, only its compile."""
    compiled = _compiling_ahead.get()
    if compiled is None:
        kernel[grid](*args, **kwargs)
        return
    future = kernel.warmup(*args, grid=grid, **kwargs)
    if future is not None:
        compiled.append((future, torch.cuda.current_device()))


def on_device(device: torch.device):
    """The context a launch on ``device`` runs in: its CUDA device (Triton launches on the
    current one), nothing on the CPU (the interpreter)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` in host code. Triton's own ``cdiv`` and ``next_power_of_2`` are constexpr
    functions, a few microseconds a call, and a sparse layer's launches made a dozen of them."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two that is at least n (n >= 1), in host code (see ``cdiv``)."""
    return 1 << (n - 1).bit_length()


def num_blocks(seq_len: int) -> int:
    return cdiv(seq_len, BLOCK)


def check_attention_inputs(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, last_rows: bool = False
) -> None:
    """Raise ``ValueError`` with one sentence for anything a caller can get wrong.

    With ``last_rows`` q may hold fewer tokens than k/v: the queries of the last positions.
    """
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("q, k and v must be 4-D tensors shaped [batch, heads, seq_len, head_dim].")
    if k.shape != v.shape:
        raise ValueError(
            f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}."
        )
    b, hq, s, d = q.shape
    if k.shape[0] != b or k.shape[3] != d:
        raise ValueError(
            f"k/v shape {tuple(k.shape)} does not match q shape {tuple(q.shape)} "
            "in batch or head_dim."
        )
    if s > k.shape[2] or (not last_rows and s != k.shape[2]):
        rows = "the last positions of k/v" if last_rows else "every position of k/v"
        raise ValueError(
            f"q length {s} does not match k/v length {k.shape[2]}: q must hold {rows}."
        )
    if s == 0 or b == 0:
        raise ValueError("q, k and v must hold at least one token.")
    hkv = k.shape[1]
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(f"{hq} query heads are not a multiple of {hkv} key/value heads.")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k and v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}.")
    if not (q.device == k.device == v.device):
        raise ValueError("q, k and v must be on the same device.")


def query_blocks(q_len: int, kv_len: int) -> tuple[int, int]:
    """``(first, count)``: the block rows of queries that are the last ``q_len`` of ``kv_len``
    positions. Row r is block ``first + r`` of the key grid (its diagonal block); when the
    queries start inside a block, that first row is partial and holds only their tokens."""
    first = (kv_len - q_len) // BLOCK
    return first, num_blocks(kv_len) - first


def check_kernel_launch(q: torch.Tensor) -> None:
    """The Triton kernels need a CUDA tensor, or a CPU tensor under the interpreter."""
    d = q.shape[-1]
    if d not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head_dim {d} is not supported by the Triton kernels (use 64 or 128).")
    if q.is_cuda:
        if q.dtype not in (torch.float16, torch.bfloat16):
            raise ValueError(f"on the GPU the kernels take float16 or bfloat16, got {q.dtype}.")
    elif interpreting():
        if q.dtype not in (torch.float32, torch.float16):
            raise ValueError(
                f"under TRITON_INTERPRET=1 the kernels take float32 or float16, got {q.dtype}."
            )
    else:
        raise ValueError(
            "the Triton kernels need CUDA tensors (or TRITON_INTERPRET=1); "
            "use the *_reference functions on the CPU."
        )


def contiguous_last(x: torch.Tensor) -> torch.Tensor:
    """Kernels index the head dimension with unit stride; copy only when it is not."""
    return x if x.stride(-1) == 1 else x.contiguous()


def softmax_scale(sm_scale: float | None, head_dim: int) -> float:
    """The given scale, default 1 / sqrt(head_dim); it must be positive (the kernels take each
    row's max on the unscaled scores)."""
    if sm_scale is None:
        return 1.0 / math.sqrt(head_dim)
    if not sm_scale > 0:
        raise ValueError(f"sm_scale must be positive, got {sm_scale}.")
    return sm_scale


def seq_bucket(seq_len: int) -> int:
    """Autotune key: lengths bucketed to powers of two so a new prompt length does not re-tune."""
    return next_power_of_2(seq_len)


@triton.jit
def program_coordinates(num_q_heads, kv_group):
    """(query block row, batch, query head, key/value head) of this program, as int64.

    Launch grid: (query block rows, batch · Hq). Programs of one head run together, so the
    key/value blocks they share stay in L2; within a head the last query rows, which attend to
    the most blocks, start first.
    """
    block_m = (tl.num_programs(0) - 1 - tl.program_id(0)).to(tl.int64)
    bh = tl.program_id(1)
    batch = (bh // num_q_heads).to(tl.int64)
    head = (bh % num_q_heads).to(tl.int64)
    return block_m, batch, head, head // kv_group


@triton.jit
def group_major_coordinates(num_q_heads, kv_group, last_splits):
    """:func:`program_coordinates` for a launch grid ((query block rows + last_splits − 1) ·
    kv_group, batch · Hkv), and which share of its row's walk the program takes.

    The kv_group query heads that read one key/value head are neighbouring programs on the same
    query row, so a key/value tile that several of them load comes from memory once and then
    from L2. The last query row, which attends to the most blocks, runs as last_splits programs
    that start first (split 0, 1, …; −1 where the row is one program's), then the other rows
    from the last.
    """
    slot = tl.program_id(0) // kv_group
    rows = tl.num_programs(0) // kv_group - (last_splits - 1)
    block_m = (rows - 1 - tl.maximum(slot - (last_splits - 1), 0)).to(tl.int64)
    split = tl.where((last_splits > 1) & (slot < last_splits), slot, -1)
    num_kv_heads = num_q_heads // kv_group
    batch = (tl.program_id(1) // num_kv_heads).to(tl.int64)
    kv_head = (tl.program_id(1) % num_kv_heads).to(tl.int64)
    return block_m, batch, kv_head * kv_group + tl.program_id(0) % kv_group, kv_head, split


@triton.jit
def start_query_block(
    q_base, block_m, stride_qs, q_start, seq_len, HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr
):
    """Load one query block and the empty online-softmax state for it.

    block_m is the block's index on the key grid; the rows of q are the positions
    [q_start, seq_len), so q row r holds position q_start + r.
    Returns q [BLOCK, HEAD_DIM], offs_m [BLOCK] (token positions), row_valid [BLOCK],
    acc [BLOCK, HEAD_DIM] fp32, l_i and m_i [BLOCK] fp32.
    """
    offs_m = block_m * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, HEAD_DIM)
    row_valid = (offs_m >= q_start) & (offs_m < seq_len)
    q_ptrs = q_base + (offs_m - q_start)[:, None] * stride_qs + offs_d[None, :]
    q = tl.load(q_ptrs, mask=row_valid[:, None], other=0.0)
    acc = tl.zeros([BLOCK, HEAD_DIM], dtype=tl.float32)
    l_i = tl.zeros([BLOCK], dtype=tl.float32)
    m_i = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
    return q, offs_m, row_valid, acc, l_i, m_i


@triton.jit
def store_query_block(o_base, rows, row_valid, acc, l_i, stride_os, HEAD_DIM: tl.constexpr):
    """Normalize the accumulator by the softmax sums and write the block's valid rows
    (``rows``: row indices into the output)."""
    offs_d = tl.arange(0, HEAD_DIM)
    out = acc / l_i[:, None]
    o_ptrs = o_base + rows[:, None] * stride_os + offs_d[None, :]
    tl.store(o_ptrs, out.to(o_base.dtype.element_ty), mask=row_valid[:, None])


@triton.jit
def load_kv_tile(k_base, v_base, cols, offs_d, stride_ks, stride_vs):
    """A full key/value tile: k [HEAD_DIM, BLOCK_N] (transposed), v [BLOCK_N, HEAD_DIM]."""
    k = tl.load(k_base + cols[None, :] * stride_ks + offs_d[:, None])
    v = tl.load(v_base + cols[:, None] * stride_vs + offs_d[None, :])
    return k, v


@triton.jit
def load_kv_tile_in_range(k_base, v_base, cols, offs_d, stride_ks, stride_vs, seq_len):
    """:func:`load_kv_tile` for a tile that may run past the last key: those columns read 0."""
    col_valid = cols < seq_len
    k = tl.load(
        k_base + cols[None, :] * stride_ks + offs_d[:, None], mask=col_valid[None, :], other=0.0
    )
    v = tl.load(
        v_base + cols[:, None] * stride_vs + offs_d[None, :], mask=col_valid[:, None], other=0.0
    )
    return k, v


@triton.jit
def causal_keep(offs_m, cols, seq_len):
    """[BLOCK_M, BLOCK_N]: which keys (cols) each query (offs_m, positions) sees, causally."""
    return (offs_m[:, None] >= cols[None, :]) & (cols < seq_len)[None, :]


@triton.jit
def load_diagonal_tile(k_base, v_base, offs_m, cols, offs_d, stride_ks, stride_vs, seq_len):
    """The diagonal key/value tile, which may be the partial last block, and its causal mask
    keep [BLOCK_M, BLOCK_N] (offs_m: the query positions; rows before the queries' first
    position, in a partial first block, are masked at load and store, not here)."""
    k, v = load_kv_tile_in_range(k_base, v_base, cols, offs_d, stride_ks, stride_vs, seq_len)
    return k, v, causal_keep(offs_m, cols, seq_len)


@triton.jit
def attend_tile(acc, l_i, m_i, q, k, v, qk_scale, keep):
    """One online-softmax step of FlashAttention over a single key/value tile.

    acc: [BLOCK_M, HEAD_DIM] fp32; l_i, m_i: [BLOCK_M] running sum and max (base-2 domain);
    q: [BLOCK_M, HEAD_DIM]; k: [HEAD_DIM, BLOCK_N] (transposed); v: [BLOCK_N, HEAD_DIM];
    keep: [BLOCK_M, BLOCK_N] bool, or None for a full tile that needs no masking;
    qk_scale > 0: the softmax scale times log2(e).
    """
    # [BLOCK_M, BLOCK_N]
    qk = tl.dot(q, k)
    if keep is not None:
        qk = tl.where(keep, qk, float("-inf"))
    return attend_scores(acc, l_i, m_i, qk, v, qk_scale)


@triton.jit
def attend_scores(acc, l_i, m_i, qk, v, qk_scale):
    """:func:`attend_tile` from the tile's scores qk = q·k (masked entries −inf). The max is
    taken on the unscaled scores and scaled once per row, so each score costs one FMA
    (``qk · qk_scale − m``) in the exponent."""
    m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
    p = tl.math.exp2(qk * qk_scale - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
    return acc, l_i, m_new


@triton.jit
def attend_scores_pair(acc, l_i, m_i, qk1, v1, qk2, v2, qk_scale):
    """Two tiles in one online-softmax step: :func:`attend_scores` on each, one after the
    other, up to rounding, with a single new max and a single rescale of acc and l_i. A tile
    may be wholly masked, not both: the row max must stay finite."""
    m_new = tl.maximum(m_i, tl.maximum(tl.max(qk1, 1), tl.max(qk2, 1)) * qk_scale)
    p1 = tl.math.exp2(qk1 * qk_scale - m_new[:, None])
    p2 = tl.math.exp2(qk2 * qk_scale - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p1, 1) + tl.sum(p2, 1)
    acc = tl.dot(p1.to(v1.dtype), v1, acc * alpha[:, None])
    acc = tl.dot(p2.to(v2.dtype), v2, acc)
    return acc, l_i, m_new


def autotuned(kernel):
    """Wrap a kernel in an autotuner over warps and pipeline depth, keyed on bucketed length."""
    configs = [
        triton.Config({}, num_warps=warps, num_stages=stages)
        for warps in (4, 8)
        for stages in (2, 3, 4)
    ]
    return triton.autotune(configs=configs, key=["seq_bucket", "HEAD_DIM"])(kernel)


def launch(kernel, tuned_kernel, grid, device: torch.device, *args, **constexprs) -> None:
    """Run ``kernel`` on the GPU with the configuration kept for this GPU and key (tuned once
    with ``tuned_kernel`` where none is kept yet); the interpreter runs it once, untuned."""
    if interpreting():
        run_kernel(kernel, grid, *args, **constexprs)
        return
    from .tuning import launch_tuned

    with torch.cuda.device(device):
        launch_tuned(kernel, tuned_kernel, grid, device, args, constexprs)
