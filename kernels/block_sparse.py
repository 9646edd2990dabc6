"""Block-sparse causal FlashAttention forward over kept 64×64 tiles (Triton).

The online-softmax formulation follows FlashAttention-2 (Dao, 2023); block sparsity as in
SeerAttention (arXiv 2410.13276). Each program owns one 64-row query block of one head and walks a
compact list of the key blocks kept for that row, so the inner loop holds no mask branch.

Queries may be the last rows of the keys (a prompt chunk continuing a cache): their blocks sit on
the key grid at an offset, so a chunk of a prompt keeps exactly the tiles the whole prompt would.

Three choices measured on an H100 (131072 tokens, sparsity 0.9, 32 query / 8 key-value heads,
d 128, bf16; 41.2 ms before them, ``benchmarks/kernel_variants.py`` keeps the variants that lost):

- the softmax scale is folded into one FMA per score (``attend_tile``): 38.7 ms;
- group order: the query heads that share a key/value head run side by side on the same query
  row, so a K/V tile that several of them keep comes from memory once, then from L2: 37.6 ms;
- on Hopper and later GPUs the listed K/V tiles are loaded through TMA (tensor descriptors made
  in the kernel), which copies a whole tile without per-element address arithmetic: 36.7 ms.
  Inputs whose rows are not 16-byte aligned, which descriptors cannot address, and older GPUs
  take the same loop with pointer loads.

At head_dim 64 (9 query / 3 key-value heads, the default model's shapes) a row walks its list two
entries per step, one softmax update for both tiles (``attend_scores_pair``): 0.77 → 0.64 ms at
32768 tokens and 5.82 → 5.15 ms at 131072 (sparsity 0.9, same GPU). At head_dim 128 the paired
step is slower (35.95 → 41.21 ms at 131072): more registers live, fewer programs in flight.

A row's whole walk is one pipelined loop: its diagonal block first (masked in step 0), then the
listed blocks, an odd walk padded with the block above the diagonal, which causality masks whole.
Before, the diagonal and an odd last entry ran after the loop, loaded without overlap: 0.644 →
0.601 ms at 32768 / d64, 3.11 → 2.25 at 32768 / d128, 35.8 → 32.8 at 131072 / d128 (sparsity 0.9,
same GPU).

The last query row runs as several programs, each walking up to ``LAST_ROW_SPLIT_ENTRIES``
entries of it; they write unnormalised partial results that a second kernel merges. A dense last
row (the policy's default) lists every block before it, 511 at 32768 tokens where no other row
lists more than 49, and one program walking it was the kernel's critical path: 0.598 → 0.365 ms
at 32768 / d64 and 0.498 → 0.232 at sparsity 0.95; 5.08 → 4.92 at 131072 / d64 (same GPU). At
head_dim 128 the split lost at 131072 (28.99 → 32.43 ms, though 32768 gained 2.21 → 2.08), so
there the row stays one program's walk.
"""

import threading

import torch
import triton
import triton.language as tl

from ._common import (
    BLOCK,
    LOG2_E,
    attend_scores,
    attend_scores_pair,
    autotuned,
    causal_keep,
    cdiv,
    check_attention_inputs,
    check_kernel_launch,
    contiguous_last,
    group_major_coordinates,
    launch,
    load_kv_tile_in_range,
    num_blocks,
    on_device,
    query_blocks,
    run_kernel,
    seq_bucket,
    softmax_scale,
    start_query_block,
    store_query_block,
)

# Head dims whose rows walk their lists two entries per step (``attend_scores_pair``).
PAIRED_HEAD_DIMS = (64,)
# Head dims whose last query row, which a dense last row makes the longest walk, runs as several
# programs of at most LAST_ROW_SPLIT_ENTRIES walk entries each.
LAST_ROW_SPLIT_HEAD_DIMS = (64,)
LAST_ROW_SPLIT_ENTRIES = 64
# Query rows per program that merges the last row's splits: four programs a head, not one, which
# ran its splits one after another (16 us of a 32k layer's ~400 on the H100).
MERGE_ROWS = 16


@triton.jit
def _walk_entry(idx_base, e, count, diagonal):
    """The key block of entry e of a row's walk: its diagonal block first (e = 0), then the
    ``count`` listed blocks, then, as padding to a whole last step, the block above the
    diagonal, which causality masks whole."""
    listed = tl.load(idx_base + e - 1, mask=(e >= 1) & (e <= count), other=0)
    return tl.where(e == 0, diagonal, tl.where(e > count, diagonal + 1, listed))


@triton.jit
def _tile_scores(q, k_desc, v_desc, k_base, v_base, block, offs_d, stride_ks, stride_vs, seq_len,
                 BLOCK: tl.constexpr, USE_TMA: tl.constexpr):  # fmt: skip
    """q·k of key block ``block`` [BLOCK_M, BLOCK] and its value tile; columns past the keys
    read as zeros (TMA fills them; pointer loads mask them), for the caller to mask."""
    if USE_TMA:
        k = k_desc.load([block * BLOCK, 0]).T
        v = v_desc.load([block * BLOCK, 0])
    else:
        cols = block.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        k, v = load_kv_tile_in_range(k_base, v_base, cols, offs_d, stride_ks, stride_vs, seq_len)
    return tl.dot(q, k), v


@triton.jit
def _causal(qk, offs_m, block, seq_len, BLOCK: tl.constexpr):
    """Scores of key block ``block`` with the keys after each query, or past the last key, −inf."""
    keep = causal_keep(offs_m, block * BLOCK + tl.arange(0, BLOCK), seq_len)
    return tl.where(keep, qk, float("-inf"))


@triton.jit(do_not_specialize=["q_start", "seq_len", "seq_bucket", "last_splits"])
def _block_sparse_fwd(
    Q, K, V, Out, BlockIdx, BlockCount, Partial, PartialStats,
    stride_qb, stride_qh, stride_qs,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    stride_ob, stride_oh, stride_os,
    stride_ib, stride_ih, stride_im,
    stride_cb, stride_ch,
    num_q_heads, kv_group, q_start, seq_len, qk_scale, seq_bucket, last_splits,
    HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, USE_TMA: tl.constexpr, PAIRED: tl.constexpr,
    SPLIT_LAST: tl.constexpr,
):  # fmt: skip
    row, batch, head, kv_head, split = group_major_coordinates(num_q_heads, kv_group, last_splits)
    # Queries are the positions [q_start, seq_len): row r is block q_start // BLOCK + r.
    block_m = q_start // BLOCK + row
    k_base = K + batch * stride_kb + kv_head * stride_kh
    v_base = V + batch * stride_vb + kv_head * stride_vh

    q, offs_m, row_valid, acc, l_i, m_i = start_query_block(
        Q + batch * stride_qb + head * stride_qh, block_m, stride_qs, q_start, seq_len,
        HEAD_DIM, BLOCK,
    )  # fmt: skip
    offs_d = tl.arange(0, HEAD_DIM)
    k_desc, v_desc = None, None
    if USE_TMA:
        k_desc = tl.make_tensor_descriptor(
            k_base, [seq_len, HEAD_DIM], [stride_ks, 1], [BLOCK, HEAD_DIM]
        )
        v_desc = tl.make_tensor_descriptor(
            v_base, [seq_len, HEAD_DIM], [stride_vs, 1], [BLOCK, HEAD_DIM]
        )

    # One pipelined loop walks the diagonal block, then the listed ones (full tiles below the
    # diagonal: no masking), STEP entries at a time; a split row's program, its share of them.
    idx_base = BlockIdx + batch * stride_ib + head * stride_ih + row * stride_im
    count = tl.load(BlockCount + batch * stride_cb + head * stride_ch + row)
    diagonal = block_m.to(tl.int32)
    STEP: tl.constexpr = 2 if PAIRED else 1
    first, end = 0, count + 1
    if SPLIT_LAST:
        if split >= 0:
            share = STEP * tl.cdiv(tl.cdiv(count + 1, last_splits), STEP)
            first = tl.minimum(split * share, count + 1)
            end = tl.minimum(first + share, count + 1)
    for t in range(0, tl.cdiv(end - first, STEP)):
        e = first + STEP * t
        b1 = _walk_entry(idx_base, e, count, diagonal)
        qk1, v1 = _tile_scores(q, k_desc, v_desc, k_base, v_base, b1, offs_d, stride_ks,
                               stride_vs, seq_len, BLOCK, USE_TMA)  # fmt: skip
        if e == 0:
            qk1 = _causal(qk1, offs_m, b1, seq_len, BLOCK)
        if PAIRED:
            b2 = _walk_entry(idx_base, e + 1, count, diagonal)
            qk2, v2 = _tile_scores(q, k_desc, v_desc, k_base, v_base, b2, offs_d, stride_ks,
                                   stride_vs, seq_len, BLOCK, USE_TMA)  # fmt: skip
            if e + 1 > count:
                qk2 = tl.full([BLOCK, BLOCK], float("-inf"), tl.float32)
            acc, l_i, m_i = attend_scores_pair(acc, l_i, m_i, qk1, v1, qk2, v2, qk_scale)
        else:
            acc, l_i, m_i = attend_scores(acc, l_i, m_i, qk1, v1, qk_scale)

    o_base = Out + batch * stride_ob + head * stride_oh
    if SPLIT_LAST:
        if split >= 0:
            part = (batch * num_q_heads + head) * last_splits + split
            _store_partial(Partial, PartialStats, part, acc, l_i, m_i, HEAD_DIM, BLOCK)
        else:
            store_query_block(o_base, offs_m - q_start, row_valid, acc, l_i, stride_os, HEAD_DIM)
    else:
        store_query_block(o_base, offs_m - q_start, row_valid, acc, l_i, stride_os, HEAD_DIM)


@triton.jit
def _store_partial(Partial, PartialStats, part, acc, l_i, m_i, HEAD_DIM: tl.constexpr,
                  BLOCK: tl.constexpr):  # fmt: skip
    """One split's unnormalised accumulator [BLOCK, HEAD_DIM] and its softmax max and sum."""
    offs_m, offs_d = tl.arange(0, BLOCK), tl.arange(0, HEAD_DIM)
    tl.store(Partial + part * BLOCK * HEAD_DIM + offs_m[:, None] * HEAD_DIM + offs_d[None, :], acc)
    tl.store(PartialStats + part * 2 * BLOCK + offs_m, m_i)
    tl.store(PartialStats + part * 2 * BLOCK + BLOCK + offs_m, l_i)


@triton.jit(do_not_specialize=["q_start", "seq_len", "splits"])
def _merge_last_row(
    Partial, PartialStats, Out, stride_ob, stride_oh, stride_os,
    num_q_heads, q_start, seq_len, last_block, splits,
    HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, ROWS: tl.constexpr,
):  # fmt: skip
    """ROWS rows of the last query row of one (batch, head) from its splits' partial results."""
    bh = tl.program_id(0).to(tl.int64)
    offs_m = tl.program_id(1) * ROWS + tl.arange(0, ROWS)
    offs_d = tl.arange(0, HEAD_DIM)
    stats = PartialStats + bh * splits * 2 * BLOCK + offs_m
    m = tl.full([ROWS], float("-inf"), tl.float32)
    for s in range(0, splits):
        m = tl.maximum(m, tl.load(stats + s * 2 * BLOCK))
    acc = tl.zeros([ROWS, HEAD_DIM], tl.float32)
    l_i = tl.zeros([ROWS], tl.float32)
    parts = Partial + bh * splits * BLOCK * HEAD_DIM + offs_m[:, None] * HEAD_DIM + offs_d[None, :]
    for s in range(0, splits):
        # A split with nothing to walk has max −inf and sum 0: weight 0.
        weight = tl.math.exp2(tl.load(stats + s * 2 * BLOCK) - m)
        l_i += weight * tl.load(stats + s * 2 * BLOCK + BLOCK)
        acc += weight[:, None] * tl.load(parts + s * BLOCK * HEAD_DIM)
    rows = last_block * BLOCK + offs_m
    o_base = Out + (bh // num_q_heads) * stride_ob + (bh % num_q_heads) * stride_oh
    row_valid = (rows >= q_start) & (rows < seq_len)
    store_query_block(o_base, rows - q_start, row_valid, acc, l_i, stride_os, HEAD_DIM)


_block_sparse_fwd_tuned = autotuned(_block_sparse_fwd)


def check_block_mask(block_mask: torch.Tensor, q: torch.Tensor, kv_len: int) -> None:
    b, hq, s, _ = q.shape
    shape = (b, hq, query_blocks(s, kv_len)[1], num_blocks(kv_len))
    if block_mask.dtype != torch.bool:
        raise ValueError(f"block_mask must be a bool tensor, got {block_mask.dtype}.")
    if tuple(block_mask.shape) != shape:
        raise ValueError(
            f"block_mask must be shaped [batch, q_heads, query block rows, key blocks] = {shape} "
            f"for {s} queries over {kv_len} keys, got {tuple(block_mask.shape)}."
        )
    if block_mask.device != q.device:
        raise ValueError("block_mask must be on the same device as q.")


def check_block_lists(q: torch.Tensor, k: torch.Tensor, indices, counts) -> None:
    """Per-row block lists must be int32 and shaped for q's query block rows over k's keys."""
    b, hq, s, _ = q.shape
    nq = query_blocks(s, k.shape[2])[1]
    if indices.dtype != torch.int32 or counts.dtype != torch.int32:
        raise ValueError("indices and counts must be int32 tensors.")
    if indices.dim() != 4 or tuple(indices.shape[:3]) != (b, hq, nq):
        raise ValueError(
            f"indices must be shaped [{b}, {hq}, {nq}, width] for {s} queries over "
            f"{k.shape[2]} keys, got {tuple(indices.shape)}."
        )
    if tuple(counts.shape) != (b, hq, nq):
        raise ValueError(f"counts must be shaped [{b}, {hq}, {nq}], got {tuple(counts.shape)}.")


def kept_block_indices(block_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """List each query block row's kept off-diagonal key blocks, in ascending order.

    block_mask: [b, H, nq, nb] bool, the rows being the last nq blocks (row r is block
    nb - nq + r). Returns ``(indices [b, H, nq, w] int32, counts [b, H, nq] int32)`` where row
    ``r`` keeps ``indices[..., r, :counts[..., r]]``; the diagonal block is left out of the list
    because the kernel always computes it, and blocks above it are ignored.
    """
    nq, nb = block_mask.shape[-2:]
    below_diagonal = torch.ones(nq, nb, dtype=torch.bool, device=block_mask.device).tril(
        nb - nq - 1
    )
    off_diagonal = block_mask & below_diagonal
    slot = off_diagonal.cumsum(-1, dtype=torch.int32) - 1
    counts = slot[..., -1] + 1
    width = max(int(counts.max()), 1)
    # Column j goes to slot (number of kept columns before it); dropped columns go to a spare
    # last slot that is cut off afterwards.
    slot = torch.where(off_diagonal, slot, width).long()
    columns = torch.arange(nb, dtype=torch.int32, device=block_mask.device).expand_as(slot)
    indices = torch.zeros(*slot.shape[:-1], width + 1, dtype=torch.int32, device=slot.device)
    indices.scatter_(-1, slot, columns)
    return indices[..., :width].contiguous(), counts


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: torch.Tensor,
    sm_scale: float | None = None,
) -> torch.Tensor:
    """Causal attention computed only on the kept 64×64 tiles.

    Args:
        q: [b, Hq, sq, d] queries (after RoPE) of the last sq positions of k/v: a whole prompt
            (sq = s) or a chunk that continues a cache; any sq ≥ 1, d in (64, 128).
        k, v: [b, Hkv, s, d] with s ≥ sq; Hq must be a multiple of Hkv (query head h reads
            key/value head h // (Hq // Hkv); nothing is repeated in memory).
        block_mask: [b, Hq, nq, nb] bool with nb = ceil(s / 64) key blocks and nq the query
            block rows, the last nq blocks: nq = nb - (s - sq) // 64. Row r is block nb - nq + r
            and only its columns up to that block are read. When the queries start inside a
            block (s - sq not a multiple of 64), their first row is that partial block.
            The diagonal block is always computed (every token attends to itself), so a row that
            keeps only its diagonal, or nothing at all, is valid.
        sm_scale: softmax scale, default 1 / sqrt(d).

    Returns:
        out: [b, Hq, sq, d] in q's dtype. float16/bfloat16 on CUDA; float32/float16 on the CPU
        under ``TRITON_INTERPRET=1``.
    """
    check_attention_inputs(q, k, v, last_rows=True)
    check_kernel_launch(q)
    check_block_mask(block_mask, q, k.shape[2])
    indices, counts = kept_block_indices(block_mask)
    return _launch_block_sparse(q, k, v, indices, counts, softmax_scale(sm_scale, q.shape[-1]))


def block_sparse_attention_from_lists(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    indices: torch.Tensor,
    counts: torch.Tensor,
    sm_scale: float | None = None,
) -> torch.Tensor:
    """:func:`block_sparse_attention` with the kept blocks given as per-row lists.

    indices: [b, Hq, nq, w] int32, counts: [b, Hq, nq] int32: query block row r (block
    nb - nq + r, as for the mask) attends to key blocks ``indices[..., r, :counts[..., r]]``
    (each below its diagonal block, any order) plus that diagonal block. This is what a top-k
    selection produces directly, without a mask.
    """
    check_attention_inputs(q, k, v, last_rows=True)
    check_block_lists(q, k, indices, counts)
    check_kernel_launch(q)
    indices = indices if indices.stride(-1) == 1 else indices.contiguous()
    return _launch_block_sparse(q, k, v, indices, counts, softmax_scale(sm_scale, q.shape[-1]))


def _tma_loads(k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether the kernel loads K/V tiles through tensor descriptors: on GPUs with TMA (compute
    capability 9+) and under the interpreter, when every head's rows start 16-byte aligned."""
    if k.is_cuda and torch.cuda.get_device_capability(k.device)[0] < 9:
        return False

    def aligned(x: torch.Tensor) -> bool:
        steps = (step * x.element_size() for step in x.stride()[:-1])
        return x.data_ptr() % 16 == 0 and all(step % 16 == 0 for step in steps)

    return aligned(k) and aligned(v)


_scratch_allocator_set = threading.local()


def _set_scratch_allocator() -> None:
    """Give Triton an allocator for the global scratch memory that tensor descriptors made in a
    kernel are written to (Triton has none by default, and such a launch fails without one).

    Set at the first TMA launch rather than at import, so importing seer changes no process-wide
    Triton state; once per thread, because Triton keeps the allocator in a context variable that
    each new thread starts without. The scratch goes on the current device and stream, which
    ``launch`` has selected.
    """
    if getattr(_scratch_allocator_set, "done", False):
        return
    triton.set_allocator(
        lambda size, alignment, stream: torch.empty(size, dtype=torch.int8, device="cuda")
    )
    _scratch_allocator_set.done = True


def last_row_splits(kv_len: int, head_dim: int) -> int:
    """Programs that walk the last query row: at head dims that split it, one per
    ``LAST_ROW_SPLIT_ENTRIES`` of the longest walk it can have (its diagonal and every block
    before it)."""
    if head_dim not in LAST_ROW_SPLIT_HEAD_DIMS:
        return 1
    return cdiv(num_blocks(kv_len), LAST_ROW_SPLIT_ENTRIES)


def _launch_block_sparse(q, k, v, indices, counts, scale: float) -> torch.Tensor:
    q, k, v = (contiguous_last(x) for x in (q, k, v))
    b, hq, s, d = q.shape
    hkv, kv_len = k.shape[1:3]
    out = torch.empty_like(q)
    use_tma = _tma_loads(k, v)
    if use_tma and q.is_cuda:
        _set_scratch_allocator()
    group = hq // hkv
    rows = query_blocks(s, kv_len)[1]
    splits = last_row_splits(kv_len, d)
    # Unnormalised partial results of the last row's splits and their max and sum, in one
    # allocation (a few floats where unsplit).
    size = b * hq * splits * BLOCK if splits > 1 else 1
    scratch = torch.empty(size * (d + 2), dtype=torch.float32, device=q.device)
    partial, partial_stats = scratch[: size * d], scratch[size * d :]
    grid = ((rows + splits - 1) * group, b * hkv)
    launch(
        _block_sparse_fwd, _block_sparse_fwd_tuned, grid, q.device,
        q, k, v, out, indices, counts, partial, partial_stats,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        indices.stride(0), indices.stride(1), indices.stride(2),
        counts.stride(0), counts.stride(1),
        hq, group, kv_len - s, kv_len, scale * LOG2_E, seq_bucket(kv_len), splits,
        HEAD_DIM=d, BLOCK=BLOCK, USE_TMA=use_tma, PAIRED=d in PAIRED_HEAD_DIMS,
        SPLIT_LAST=d in LAST_ROW_SPLIT_HEAD_DIMS,
    )  # fmt: skip
    if splits > 1:
        with on_device(q.device):
            run_kernel(
                _merge_last_row, (b * hq, BLOCK // MERGE_ROWS), partial, partial_stats, out,
                out.stride(0), out.stride(1), out.stride(2), hq, kv_len - s, kv_len,
                num_blocks(kv_len) - 1, splits, HEAD_DIM=d, BLOCK=BLOCK, ROWS=MERGE_ROWS,
            )  # fmt: skip
    return out


__all__ = ["block_sparse_attention", "kept_block_indices"]
