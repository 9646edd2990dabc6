"""Dense causal FlashAttention that also returns the block-pooled attention map (Triton).

The map is the self-distillation target of SeerAttention (arXiv 2410.13276): for every 64×64
tile, the largest attention probability inside it, each block row then normalized to sum 1.
A first pass over the tiles is ordinary FlashAttention and yields each row's final max and sum;
a second pass recomputes QKᵀ per tile and takes its peak probability, so no [s, nb] buffer exists.
"""

import torch
import triton
import triton.language as tl

from ._common import (
    BLOCK,
    LOG2_E,
    attend_tile,
    autotuned,
    check_attention_inputs,
    check_kernel_launch,
    contiguous_last,
    launch,
    load_diagonal_tile,
    load_kv_tile,
    num_blocks,
    program_coordinates,
    seq_bucket,
    softmax_scale,
    start_query_block,
    store_query_block,
)


@triton.jit
def _tile_peak(q, k, m_i, inv_l, qk_scale, row_valid, keep):
    """Largest softmax probability in one tile, given each row's final max and 1 / sum."""
    # [BLOCK_M, BLOCK_N]
    qk = tl.dot(q, k) * qk_scale
    if keep is not None:
        qk = tl.where(keep, qk, float("-inf"))
    # exp is monotonic: the peak of a row is reached at its largest score.
    row_peak = tl.math.exp2(tl.max(qk, 1) - m_i) * inv_l
    return tl.max(tl.where(row_valid, row_peak, 0.0), 0)


@triton.jit
def _pooled_fwd(
    Q, K, V, Out, Peak,
    stride_qb, stride_qh, stride_qs,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    stride_ob, stride_oh, stride_os,
    stride_pb, stride_ph, stride_pm,
    num_q_heads, kv_group, seq_len, qk_scale, seq_bucket,
    HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    block_m, batch, head, kv_head = program_coordinates(num_q_heads, kv_group)
    k_base = K + batch * stride_kb + kv_head * stride_kh
    v_base = V + batch * stride_vb + kv_head * stride_vh

    q, offs_m, row_valid, acc, l_i, m_i = start_query_block(
        Q + batch * stride_qb + head * stride_qh, block_m, stride_qs, 0, seq_len, HEAD_DIM, BLOCK
    )
    offs_n = tl.arange(0, BLOCK)
    offs_d = tl.arange(0, HEAD_DIM)

    # Pass 1: FlashAttention over every causal tile (full tiles, then the diagonal).
    for block_n in range(0, block_m):
        cols = block_n * BLOCK + offs_n
        k, v = load_kv_tile(k_base, v_base, cols, offs_d, stride_ks, stride_vs)
        acc, l_i, m_i = attend_tile(acc, l_i, m_i, q, k, v, qk_scale, None)
    k_diag, v_diag, keep = load_diagonal_tile(
        k_base, v_base, offs_m, block_m * BLOCK + offs_n, offs_d, stride_ks, stride_vs, seq_len
    )
    acc, l_i, m_i = attend_tile(acc, l_i, m_i, q, k_diag, v_diag, qk_scale, keep)
    o_base = Out + batch * stride_ob + head * stride_oh
    store_query_block(o_base, offs_m, row_valid, acc, l_i, stride_os, HEAD_DIM)

    # Pass 2: with each row's final max and sum known, the peak probability of every tile.
    inv_l = 1.0 / l_i
    peak_base = Peak + batch * stride_pb + head * stride_ph + block_m * stride_pm
    for block_n in range(0, block_m):
        cols = block_n * BLOCK + offs_n
        k = tl.load(k_base + cols[None, :] * stride_ks + offs_d[:, None])
        tl.store(peak_base + block_n, _tile_peak(q, k, m_i, inv_l, qk_scale, row_valid, None))
    tl.store(peak_base + block_m, _tile_peak(q, k_diag, m_i, inv_l, qk_scale, row_valid, keep))


_pooled_fwd_tuned = autotuned(_pooled_fwd)


def pooled_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sm_scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense causal attention plus its row-normalized, max-pooled block attention map.

    Args:
        q: [b, Hq, s, d] queries (after RoPE); any s ≥ 1, d in (64, 128).
        k, v: [b, Hkv, s, d]; Hq a multiple of Hkv (GQA by head index).
        sm_scale: softmax scale, default 1 / sqrt(d).

    Returns:
        out: [b, Hq, s, d] in q's dtype, equal to causal softmax(q kᵀ) v.
        gt: [b, Hq, nb, nb] float32, nb = ceil(s / 64): ``gt[i, j]`` is the largest attention
        probability of any query in block i on any key in block j, each row divided by its sum
        (zero above the diagonal).
    """
    check_attention_inputs(q, k, v)
    check_kernel_launch(q)
    q, k, v = (contiguous_last(x) for x in (q, k, v))
    b, hq, s, d = q.shape
    nb = num_blocks(s)
    out = torch.empty_like(q)
    gt = torch.zeros(b, hq, nb, nb, dtype=torch.float32, device=q.device)
    scale = softmax_scale(sm_scale, d)
    launch(
        _pooled_fwd, _pooled_fwd_tuned, (nb, b * hq), q.device,
        q, k, v, out, gt,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        gt.stride(0), gt.stride(1), gt.stride(2),
        hq, hq // k.shape[1], s, scale * LOG2_E, seq_bucket(s),
        HEAD_DIM=d, BLOCK=BLOCK,
    )  # fmt: skip
    return out, gt / gt.sum(-1, keepdim=True)
