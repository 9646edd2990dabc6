"""The element-wise work around attention, fused (Triton): rotary embeddings and the SiLU gate.

transformers computes RoPE as ``q * cos + rotate_half(q) * sin`` and the MLP's gate as
``silu(gate) * up``: six to eight passes over memory per layer, each its own launch. At 128k
tokens on Llama-3.1-8B shapes they cost ~16 ms of a layer's 160 (BENCHMARKS.md); here each is
one pass, computed in float32 and rounded once. Lengths are not specialised on, so every
prompt length runs the kernels compiled for the first.
"""

import torch
import triton
import triton.language as tl

from ._common import on_device

# Token rows per rotary program; elements per SiLU-gate program.
ROTARY_ROWS = 32
GATE_ELEMENTS = 2048


@triton.jit(do_not_specialize=["seq_len", "num_heads"])
def _rotary(
    X, COS, SIN, OUT,
    stride_xb, stride_xh, stride_xs, stride_tb, stride_ts, stride_ob, stride_oh, stride_os,
    seq_len, num_heads,
    HALF: tl.constexpr, HALF_SLOTS: tl.constexpr, ROWS: tl.constexpr,
):  # fmt: skip
    batch = (tl.program_id(1) // num_heads).to(tl.int64)
    head = (tl.program_id(1) % num_heads).to(tl.int64)
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, HALF_SLOTS)
    valid = (rows < seq_len)[:, None] & (cols < HALF)[None, :]
    x_ptrs = X + batch * stride_xb + head * stride_xh + rows[:, None] * stride_xs + cols[None, :]
    t_off = batch * stride_tb + rows[:, None] * stride_ts + cols[None, :]
    x1 = tl.load(x_ptrs, mask=valid, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptrs + HALF, mask=valid, other=0.0).to(tl.float32)
    cos1 = tl.load(COS + t_off, mask=valid, other=0.0).to(tl.float32)
    cos2 = tl.load(COS + t_off + HALF, mask=valid, other=0.0).to(tl.float32)
    sin1 = tl.load(SIN + t_off, mask=valid, other=0.0).to(tl.float32)
    sin2 = tl.load(SIN + t_off + HALF, mask=valid, other=0.0).to(tl.float32)
    # rotate_half(x) = [-x2, x1]
    o_ptrs = OUT + batch * stride_ob + head * stride_oh + rows[:, None] * stride_os + cols[None, :]
    tl.store(o_ptrs, (x1 * cos1 - x2 * sin1).to(OUT.dtype.element_ty), mask=valid)
    tl.store(o_ptrs + HALF, (x2 * cos2 + x1 * sin2).to(OUT.dtype.element_ty), mask=valid)


@triton.jit(do_not_specialize=["numel"])
def _silu_gate(G, U, numel, BLOCK_SIZE: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    valid = offs < numel
    g = tl.load(G + offs, mask=valid, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=valid, other=0.0).to(tl.float32)
    tl.store(G + offs, (g / (1.0 + tl.exp(-g)) * u).to(G.dtype.element_ty), mask=valid)


def rotary_embedding(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE of x [b, H, s, d] (any strides with a unit last one) by cos/sin [b or 1, s, d], the
    tables a transformers rotary module returns (scaling folded in): a new tensor laid out as x.
    """
    b, heads, s, d = x.shape
    if d % 2 or x.stride(-1) != 1 or cos.shape[-2:] != (s, d) or sin.shape != cos.shape:
        raise ValueError(f"rotary tables {tuple(cos.shape)} do not fit x {tuple(x.shape)}.")
    cos, sin = (t if t.stride(-1) == 1 else t.contiguous() for t in (cos, sin))
    if cos.stride() != sin.stride():
        cos, sin = cos.contiguous(), sin.contiguous()
    out = torch.empty_like(x)
    table_batch_stride = cos.stride(0) if cos.shape[0] == b else 0
    grid = (triton.cdiv(s, ROTARY_ROWS), b * heads)
    with on_device(x.device):
        _rotary[grid](
            x, cos, sin, out,
            x.stride(0), x.stride(1), x.stride(2), table_batch_stride, cos.stride(1),
            out.stride(0), out.stride(1), out.stride(2),
            s, heads, HALF=d // 2, HALF_SLOTS=triton.next_power_of_2(d // 2), ROWS=ROTARY_ROWS,
        )  # fmt: skip
    return out


def silu_gate_(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` written into ``gate`` (both contiguous, one shape); returns gate."""
    if gate.shape != up.shape or not (gate.is_contiguous() and up.is_contiguous()):
        raise ValueError(f"gate {tuple(gate.shape)} and up {tuple(up.shape)} must be contiguous "
                         "tensors of one shape.")  # fmt: skip
    numel = gate.numel()
    with on_device(gate.device):
        _silu_gate[(triton.cdiv(numel, GATE_ELEMENTS),)](gate, up, numel, BLOCK_SIZE=GATE_ELEMENTS)
    return gate
