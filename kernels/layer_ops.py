"""The element-wise work around attention, fused (Triton): rotary embeddings, the SiLU gate, and
the residual add with the RMSNorm that follows it.

transformers computes RoPE as ``q * cos + rotate_half(q) * sin`` and the MLP's gate as
``silu(gate) * up``: six to eight passes over memory per layer, each its own launch. At 128k
tokens on Llama-3.1-8B shapes they cost ~16 ms of a layer's 160 (BENCHMARKS.md); here each is
one pass, computed in float32 and rounded once. RoPE does not specialise on lengths, so every
prompt length runs the kernel compiled for the first. The SiLU gate does specialise on its element
count, as Triton does by default: on its divisibility by 16 (and on being 1), which for a model
whose intermediate size is a multiple of 16 (Llama, Mistral, Qwen and SmolLM2 sizes are) holds
at any length, so one variant serves them all. Knowing it, the masked loads and stores are
vectorised: 0.189 → 0.104 ms for a [32768, 1536] bf16 gate on an H100 (2.9 TB/s, the rate of a
plain ``torch.add``).
The residual add and the post-attention RMSNorm read the residual stream and the attention's
output once and write the sum and its norm, where PyTorch makes a pass for the add and one for
the norm (which reads the sum back): 0.49 → 0.36 ms for [32768, 4096] bf16 and 0.083 → 0.056
ms for [32768, 576] on an H100 (3.0 TB/s at 4096). It does not specialise on the row count
either.
"""

import contextlib

import torch
import triton
import triton.language as tl

from ._common import (
    BLOCK,
    SUPPORTED_HEAD_DIMS,
    cdiv,
    compiling_ahead,
    next_power_of_2,
    on_device,
    only_compiling,
    run_kernel,
)

# Token rows per rotary program (a pooling one takes a block); elements per SiLU-gate program.
# Measured on the H100 (8B shapes, 32k / 128k): pooling a block at once with 4 warps adds 11 % /
# 4 % to a layer's RoPE pass, 32 rows twice 25 % / 14 %, 8 warps 26 % / 14 %.
ROTARY_ROWS = 32
GATE_ELEMENTS = 2048
# Elements of the rows one add-and-norm program takes (rows padded to a power of two): several
# rows where they are short, one from this width on. On the H100 (32768 rows, hidden 576 to
# 8192, bf16) 1024 to 8192 of them, and 4 to 16 warps, were within 1 % of each other.
NORM_ELEMENTS = 4096
# Row widths the warm-up compiles the add-and-norm kernel for: hidden sizes from 513 to 8192
# (SmolLM2's 576 to Llama-70B's 8192), each a multiple of 16 as every supported model's is.
COMPILED_NORM_WIDTHS = (1024, 2048, 4096, 8192)


@triton.jit(do_not_specialize=["seq_len", "x_heads", "y_heads"])
def _rotary(
    X, Y, COS, SIN, OUT_X, OUT_Y, POOLED_X, POOLED_Y,
    stride_xb, stride_xh, stride_xs, stride_yb, stride_yh, stride_ys, stride_tb, stride_ts,
    stride_oxb, stride_oxh, stride_oxs, stride_oyb, stride_oyh, stride_oys,
    stride_pxb, stride_pxn, stride_pxh, stride_pyb, stride_pyn, stride_pyh,
    seq_len, x_heads, y_heads,
    HALF: tl.constexpr, HALF_SLOTS: tl.constexpr, ROWS: tl.constexpr, POOL_X: tl.constexpr,
    POOL_Y: tl.constexpr,
):  # fmt: skip
    # A program rotates ROWS token rows of one head of X (heads 0 … x_heads - 1 of the launch)
    # or of Y (the next y_heads): a layer's queries and keys in one launch.
    batch = (tl.program_id(1) // (x_heads + y_heads)).to(tl.int64)
    head = (tl.program_id(1) % (x_heads + y_heads)).to(tl.int64)
    first = tl.program_id(0).to(tl.int64) * ROWS
    cos = COS + batch * stride_tb
    sin = SIN + batch * stride_tb
    if head < x_heads:
        _rotate_rows(
            X + batch * stride_xb + head * stride_xh, stride_xs, cos, sin, stride_ts,
            OUT_X + batch * stride_oxb + head * stride_oxh, stride_oxs,
            POOLED_X + batch * stride_pxb + (first // ROWS) * stride_pxn + head * stride_pxh,
            first, seq_len, HALF, HALF_SLOTS, ROWS, POOL_X,
        )  # fmt: skip
    else:
        head -= x_heads
        _rotate_rows(
            Y + batch * stride_yb + head * stride_yh, stride_ys, cos, sin, stride_ts,
            OUT_Y + batch * stride_oyb + head * stride_oyh, stride_oys,
            POOLED_Y + batch * stride_pyb + (first // ROWS) * stride_pyn + head * stride_pyh,
            first, seq_len, HALF, HALF_SLOTS, ROWS, POOL_Y,
        )  # fmt: skip


@triton.jit
def _rotate_rows(
    x_base, stride_xs, cos_base, sin_base, stride_ts, o_base, stride_os, p_base, first, seq_len,
    HALF: tl.constexpr, HALF_SLOTS: tl.constexpr, ROWS: tl.constexpr, POOL: tl.constexpr,
):  # fmt: skip
    """RoPE of ROWS token rows of one head from ``first``; with POOL (1: mean, 2: max, min and
    mean) those rows are one block, whose pre-RoPE pools go to ``p_base``."""
    rows = first + tl.arange(0, ROWS)
    cols = tl.arange(0, HALF_SLOTS)
    valid = (rows < seq_len)[:, None] & (cols < HALF)[None, :]
    x_ptrs = x_base + rows[:, None] * stride_xs + cols[None, :]
    t_off = rows[:, None] * stride_ts + cols[None, :]
    x1 = tl.load(x_ptrs, mask=valid, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptrs + HALF, mask=valid, other=0.0).to(tl.float32)
    cos1 = tl.load(cos_base + t_off, mask=valid, other=0.0).to(tl.float32)
    cos2 = tl.load(cos_base + t_off + HALF, mask=valid, other=0.0).to(tl.float32)
    sin1 = tl.load(sin_base + t_off, mask=valid, other=0.0).to(tl.float32)
    sin2 = tl.load(sin_base + t_off + HALF, mask=valid, other=0.0).to(tl.float32)
    # rotate_half(x) = [-x2, x1]
    o_ptrs = o_base + rows[:, None] * stride_os + cols[None, :]
    tl.store(o_ptrs, (x1 * cos1 - x2 * sin1).to(o_base.dtype.element_ty), mask=valid)
    tl.store(o_ptrs + HALF, (x2 * cos2 + x1 * sin2).to(o_base.dtype.element_ty), mask=valid)
    if POOL > 0:
        count = tl.minimum(seq_len - first, ROWS).to(tl.float32)
        p_ptrs = p_base + cols
        # Channels as pool_queries / pool_keys lay them out: [mean] or [max, min, mean].
        mean_at = 0 if POOL == 1 else 4 * HALF
        col_ok = cols < HALF
        tl.store(p_ptrs + mean_at, tl.sum(x1, 0) / count, mask=col_ok)
        tl.store(p_ptrs + mean_at + HALF, tl.sum(x2, 0) / count, mask=col_ok)
        if POOL > 1:
            tl.store(p_ptrs, tl.max(tl.where(valid, x1, float("-inf")), 0), mask=col_ok)
            tl.store(p_ptrs + HALF, tl.max(tl.where(valid, x2, float("-inf")), 0), mask=col_ok)
            tl.store(p_ptrs + 2 * HALF, tl.min(tl.where(valid, x1, float("inf")), 0), mask=col_ok)
            tl.store(p_ptrs + 3 * HALF, tl.min(tl.where(valid, x2, float("inf")), 0), mask=col_ok)


@triton.jit
def _silu_gate(G, U, numel, BLOCK_SIZE: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    valid = offs < numel
    g = tl.load(G + offs, mask=valid, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=valid, other=0.0).to(tl.float32)
    tl.store(G + offs, (g / (1.0 + tl.exp(-g)) * u).to(G.dtype.element_ty), mask=valid)


@triton.jit(do_not_specialize=["rows"])
def _add_rms_norm(
    X, Y, W, SUM, OUT, rows, cols, stride_x, stride_y, stride_out, eps,
    COLS: tl.constexpr, ROWS: tl.constexpr,
):  # fmt: skip
    # A program adds ROWS rows of cols elements (COLS slots) and normalises their sums.
    row = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    col = tl.arange(0, COLS)
    col_ok = col < cols
    valid = (row < rows)[:, None] & col_ok[None, :]
    # [ROWS, COLS]
    x = tl.load(X + row[:, None] * stride_x + col[None, :], mask=valid, other=0.0)
    y = tl.load(Y + row[:, None] * stride_y + col[None, :], mask=valid, other=0.0)
    # The sum rounded to the inputs' dtype, as ``x + y`` is; the norm is of that rounded sum.
    total = (x.to(tl.float32) + y.to(tl.float32)).to(SUM.dtype.element_ty)
    out_off = row[:, None] * stride_out + col[None, :]
    tl.store(SUM + out_off, total, mask=valid)
    total = total.to(tl.float32)
    # [ROWS]
    inv_rms = tl.math.rsqrt(tl.sum(total * total, 1) / cols + eps)
    w = tl.load(W + col, mask=col_ok, other=0.0).to(tl.float32)
    normed = total * inv_rms[:, None] * w[None, :]
    tl.store(OUT + out_off, normed.to(OUT.dtype.element_ty), mask=valid)


def rotary_embedding(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE of x [b, H, s, d] (any strides with a unit last one) by cos/sin [b or 1, s, d], the
    tables a transformers rotary module returns (scaling folded in): a new tensor laid out as x.
    """
    return _launch_rotary(cos, sin, (x, 0))[0][0]


def rotary_embedding_pooled(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, keys: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`rotary_embedding`, and in the same pass the pre-RoPE block pools of x that seer's
    gates score: blocks of 64 tokens from x's first (the last block pools the tokens it has),
    float32, means ``[b, nb, H, d]`` as ``pool_queries`` makes them or, for ``keys``, max, min
    and mean ``[b, nb, H, 3d]`` as ``pool_keys`` does. Returns (rotated x, pools)."""
    return _launch_rotary(cos, sin, (x, 2 if keys else 1))[0]


def rotary_embedding_pair(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, pools: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """A layer's queries and keys (one length, head counts of their own) rotated in one launch:
    :func:`rotary_embedding` of each or, with ``pools``, :func:`rotary_embedding_pooled` of q as
    queries and of k as keys. Returns (rotated q, rotated k, q's pools, k's pools), the pools
    None without ``pools``."""
    (q_out, q_pools), (k_out, k_pools) = _launch_rotary(
        cos, sin, (q, 1 if pools else 0), (k, 2 if pools else 0)
    )
    return q_out, k_out, q_pools, k_pools


def _launch_rotary(cos, sin, *inputs) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """One launch over one or two ``(x, pool)`` inputs of one length and head_dim; pool 0: none,
    1: means, 2: max, min and means. Returns (rotated x, pools or None) for each."""
    b, _, s, d = inputs[0][0].shape
    if any(x.shape[0] != b or x.shape[2:] != (s, d) or x.stride(-1) != 1 for x, _ in inputs):
        raise ValueError("queries and keys must share batch, length and head_dim, with unit last "
                         "strides.")  # fmt: skip
    if d % 2 or cos.shape[-2:] != (s, d) or sin.shape != cos.shape:
        raise ValueError(
            f"rotary tables {tuple(cos.shape)} do not fit x {tuple(inputs[0][0].shape)}."
        )
    cos, sin = (t if t.stride(-1) == 1 else t.contiguous() for t in (cos, sin))
    if cos.stride() != sin.stride():
        cos, sin = cos.contiguous(), sin.contiguous()
    results = []
    for x, pool in inputs:
        out = torch.empty_like(x)
        pooled = None
        if pool:
            width = d if pool == 1 else 3 * d
            pooled = torch.empty(b, cdiv(s, BLOCK), x.shape[1], width, dtype=torch.float32,
                                 device=x.device)  # fmt: skip
        results.append((out, pooled))
    # A single input also stands in as the second, with no heads.
    (x, x_pool), (y, y_pool) = inputs[0], inputs[-1]
    (x_out, x_pooled), (y_out, y_pooled) = results[0], results[-1]
    y_heads = y.shape[1] if len(inputs) > 1 else 0
    rows = BLOCK if x_pool or y_pool else ROTARY_ROWS
    table_batch_stride = cos.stride(0) if cos.shape[0] == b else 0
    grid = (cdiv(s, rows), b * (x.shape[1] + y_heads))
    with on_device(x.device):
        run_kernel(
            _rotary, grid, x, y, cos, sin, x_out, y_out,
            x_out if x_pooled is None else x_pooled, y_out if y_pooled is None else y_pooled,
            *x.stride()[:3], *y.stride()[:3], table_batch_stride, cos.stride(1),
            *x_out.stride()[:3], *y_out.stride()[:3],
            *_pool_strides(x_pooled), *_pool_strides(y_pooled),
            s, x.shape[1], y_heads, HALF=d // 2, HALF_SLOTS=next_power_of_2(d // 2), ROWS=rows,
            POOL_X=x_pool, POOL_Y=y_pool,
        )  # fmt: skip
    return results


def _pool_strides(pooled: torch.Tensor | None) -> tuple[int, int, int]:
    """Batch, block and head strides of pools; zeros where there are none (the kernel's pointer
    then stands on the rotated output, never written through)."""
    return (0, 0, 0) if pooled is None else (pooled.stride(0), pooled.stride(1), pooled.stride(2))


def compile_rotary(device: torch.device, dtype: torch.dtype) -> None:
    """Compile the RoPE kernels every prefill in ``dtype`` runs (a layer's queries and keys,
    plain, and pooling for sparse prefill's gates) for each head_dim the attention kernels take,
    side by side; what the first prefill of a process then finds ready (``seer_cli``'s GPU
    warm-up calls this). Inside :func:`compiling_ahead` they join its compiles."""
    with _ahead():
        for d in SUPPORTED_HEAD_DIMS:
            # Laid out as attention layers hand q and k over: [b, H, s, d] seen from [b, s, H, d].
            q = torch.empty(1, BLOCK, 3, d, device=device, dtype=dtype).transpose(1, 2)
            k = torch.empty(1, BLOCK, 2, d, device=device, dtype=dtype).transpose(1, 2)
            table = torch.empty(1, BLOCK, d, device=device, dtype=dtype)
            for pools in (False, True):
                rotary_embedding_pair(q, k, table, table, pools=pools)


def silu_gate_(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` written into ``gate`` (both contiguous, one shape); returns gate."""
    if gate.shape != up.shape or not (gate.is_contiguous() and up.is_contiguous()):
        raise ValueError(f"gate {tuple(gate.shape)} and up {tuple(up.shape)} must be contiguous "
                         "tensors of one shape.")  # fmt: skip
    numel = gate.numel()
    with on_device(gate.device):
        _silu_gate[(cdiv(numel, GATE_ELEMENTS),)](gate, up, numel, BLOCK_SIZE=GATE_ELEMENTS)
    return gate


def add_rms_norm(
    x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x + y, rms_norm(x + y))`` in one pass: x and y [..., hidden] of one shape and dtype
    (unit last strides), weight [hidden] of their dtype. The sum is rounded to that dtype as
    ``x + y`` is; its norm, ``torch.nn.functional.rms_norm(x + y, weight.shape, weight, eps)``,
    is computed in float32 and rounded once. Both come back as new contiguous tensors."""
    hidden = x.shape[-1] if x.dim() else 0
    if x.shape != y.shape or weight.shape != (hidden,) or not hidden:
        raise ValueError(
            f"x {tuple(x.shape)} and y {tuple(y.shape)} must share one shape [..., hidden] "
            f"with weight [hidden], got weight {tuple(weight.shape)}."
        )
    if not (x.dtype == y.dtype == weight.dtype and x.device == y.device == weight.device):
        raise ValueError(
            f"x, y and weight must share one dtype and device, got {x.dtype} on {x.device}, "
            f"{y.dtype} on {y.device} and {weight.dtype} on {weight.device}."
        )
    if x.stride(-1) != 1 or y.stride(-1) != 1:
        raise ValueError("x and y must be contiguous in their last dimension.")
    x_rows, y_rows = x.reshape(-1, hidden), y.reshape(-1, hidden)
    total = torch.empty_like(x, memory_format=torch.contiguous_format)
    normed = torch.empty_like(x, memory_format=torch.contiguous_format)
    rows = x_rows.shape[0]
    if rows == 0:
        return total, normed
    cols = next_power_of_2(hidden)
    per_program = max(1, NORM_ELEMENTS // cols)
    with on_device(x.device):
        run_kernel(
            _add_rms_norm, (cdiv(rows, per_program),), x_rows, y_rows,
            weight.contiguous(), total, normed, rows, hidden, x_rows.stride(0), y_rows.stride(0),
            hidden, eps, COLS=cols, ROWS=per_program, num_warps=_norm_warps(per_program * cols),
        )  # fmt: skip
    return total, normed


def _norm_warps(elements: int) -> int:
    """Warps of an add-and-norm program: 16 elements per thread, 4 to 16 warps."""
    return min(max(elements // 512, 4), 16)


def compile_add_rms_norm(device: torch.device, dtype: torch.dtype) -> None:
    """Compile the add-and-norm kernel for rows of ``dtype`` padded to each of
    ``COMPILED_NORM_WIDTHS``, side by side: what a prefill of any length then finds ready for a
    hidden size of 513 to 8192 that is a multiple of 16 (``seer_cli``'s GPU warm-up calls
    this). Inside :func:`compiling_ahead` they join its compiles."""
    with _ahead():
        for width in COMPILED_NORM_WIDTHS:
            x = torch.empty(1, width, device=device, dtype=dtype)
            add_rms_norm(x, x, x[0], 1e-6)


def _ahead():
    """:func:`compiling_ahead`, or nothing inside one already (the compiles then join it)."""
    return contextlib.nullcontext() if only_compiling() else compiling_ahead()
