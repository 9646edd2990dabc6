"""Gate block features in one launch (Triton): the first half of fused gate scoring.

``_block_features`` pools each 64-token block of the pre-RoPE queries (mean) and keys (max, min,
mean), applies the gate's per-head linear maps and block RoPE, and writes one float32 feature
row per block and head — the only tensors of the gate that reach memory. The gate's logits are
then ``qf_i · kf_j / sqrt(h)``; ``gate_select`` scores and selects from them. The training-free
pooled estimator (mean-pooled post-RoPE queries and keys, no linear, no RoPE) takes the same
kernel. Nothing here reads a value back to the host.
"""

import torch
import triton
import triton.language as tl

from ._common import BLOCK, cdiv, interpreting, num_blocks, on_device, run_kernel

FEATURE_ROWS = 16  # blocks pooled per program, and query rows scored per work item (tl.dot's M)
# Measured on the H100 (bench_gates.py --sweep, BENCHMARKS.md): 4 warps beat 8.
FEATURE_WARPS, FEATURE_STAGES = 4, 2
# float32 products on tensor cores at float32 accuracy (three tf32 passes).
DOT_PRECISION: tl.constexpr = tl.constexpr("tf32x3")


@triton.jit
def _pool_block(x, valid, count):
    """(mean, max, min) over the valid rows of one block's tile x [BLOCK, C] float32."""
    mean = tl.sum(x, 0) / count
    high = tl.max(tl.where(valid[:, None], x, float("-inf")), 0)
    low = tl.min(tl.where(valid[:, None], x, float("inf")), 0)
    return mean, high, low


@triton.jit
def _pool_rows(base, stride_s, n_tokens, shift, first, ROWS: tl.constexpr, D2: tl.constexpr,
               BLOCK: tl.constexpr):  # fmt: skip
    """Pool ROWS consecutive blocks from block ``first`` into six [ROWS, D2] float32 tiles:
    (max, min, mean) of channels [0, D2), then of [D2, 2·D2) — the order of the key linear's
    weight rows.

    Token t of the n_tokens at ``base`` sits at offset t + shift of the first block (shift < BLOCK:
    queries of a chunk that starts inside a block). A block pools the tokens it has; a block
    past the end pools to zeros.
    """
    offs_t = tl.arange(0, BLOCK)
    offs_d = tl.arange(0, D2)
    row_ids = tl.arange(0, ROWS)
    high0 = tl.zeros([ROWS, D2], dtype=tl.float32)
    high1, low0, low1, mean0, mean1 = high0, high0, high0, high0, high0
    # Only the blocks that hold tokens; both channel halves of a block are loaded together.
    for r in range(0, tl.minimum(ROWS, tl.cdiv(n_tokens + shift, BLOCK) - first)):
        start = (first + r) * BLOCK - shift
        tokens = start + offs_t
        valid = (tokens >= 0) & (tokens < n_tokens)
        ptrs = base + tokens[:, None] * stride_s + offs_d[None, :]
        # [BLOCK, D2] each
        x0 = tl.load(ptrs, mask=valid[:, None], other=0.0).to(tl.float32)
        x1 = tl.load(ptrs + D2, mask=valid[:, None], other=0.0).to(tl.float32)
        count = tl.minimum(n_tokens, start + BLOCK) - tl.maximum(start, 0)
        here = row_ids[:, None] == r
        m0, h0, l0 = _pool_block(x0, valid, count)
        m1, h1, l1 = _pool_block(x1, valid, count)
        mean0 = tl.where(here, m0[None, :], mean0)
        mean1 = tl.where(here, m1[None, :], mean1)
        high0 = tl.where(here, h0[None, :], high0)
        high1 = tl.where(here, h1[None, :], high1)
        low0 = tl.where(here, l0[None, :], low0)
        low1 = tl.where(here, l1[None, :], low1)
    return high0, high1, low0, low1, mean0, mean1


@triton.jit
def _sum_dot(a, b, acc):
    """acc + a @ b; float32 operands at float32 accuracy."""
    if b.dtype == tl.float32:
        return tl.dot(a, b, acc, input_precision=DOT_PRECISION)
    return tl.dot(a, b, acc)


@triton.jit
def _mean_rows(base, stride_s, n_tokens, shift, first, ROWS: tl.constexpr, D2: tl.constexpr,
               BLOCK: tl.constexpr):  # fmt: skip
    """Means of ROWS consecutive blocks from block ``first``, tokens placed as in
    :func:`_pool_rows`: two [ROWS, D2] float32 tiles, channels [0, D2) and [D2, 2·D2).

    Summed on tensor cores, two blocks of tokens per step: a 0/1 matrix that puts each token in
    its block, times the tokens (exact products, float32 sums), with no reduction across warps.
    """
    CHUNK: tl.constexpr = 2 * BLOCK
    offs_t = tl.arange(0, CHUNK)
    offs_d = tl.arange(0, D2)
    row_ids = tl.arange(0, ROWS)
    sum0 = tl.zeros([ROWS, D2], dtype=tl.float32)
    sum1 = tl.zeros([ROWS, D2], dtype=tl.float32)
    end = tl.minimum(ROWS, tl.cdiv(n_tokens + shift, BLOCK) - first) * BLOCK
    for t0 in range(0, end, CHUNK):
        tokens = first * BLOCK - shift + t0 + offs_t
        valid = (tokens >= 0) & (tokens < n_tokens)
        ptrs = base + tokens[:, None] * stride_s + offs_d[None, :]
        # [CHUNK, D2] each
        x0 = tl.load(ptrs, mask=valid[:, None], other=0.0)
        x1 = tl.load(ptrs + D2, mask=valid[:, None], other=0.0)
        # [ROWS, CHUNK]: token t0 + i belongs to block row (t0 + i) // BLOCK.
        owner = ((t0 + offs_t) // BLOCK)[None, :] == row_ids[:, None]
        sum0 = _sum_dot(owner.to(x0.dtype), x0, sum0)
        sum1 = _sum_dot(owner.to(x1.dtype), x1, sum1)
    starts = (first + row_ids) * BLOCK - shift
    counts = tl.minimum(n_tokens, starts + BLOCK) - tl.maximum(starts, 0)
    counts = tl.maximum(counts, 1).to(tl.float32)[:, None]  # blocks past the end hold zeros
    return sum0 / counts, sum1 / counts


@triton.jit
def _load_rows(row_ptrs, valid, col0, COLS: tl.constexpr):
    """Channels [col0, col0 + COLS) of the rows at ``row_ptrs`` [ROWS]: [ROWS, COLS] float32."""
    cols = col0 + tl.arange(0, COLS)
    rows = tl.load(row_ptrs[:, None] + cols[None, :], mask=valid[:, None], other=0.0)
    return rows.to(tl.float32)


@triton.jit
def _project(x, W, head, row0, col0, stride_wh, stride_wi, acc, IN: tl.constexpr,
             OUT: tl.constexpr):  # fmt: skip
    """acc + x [ROWS, IN] @ W[head, row0 : row0 + IN, col0 : col0 + OUT], in float32.

    Operands stay at most 64 × 64: larger float32 tiles overflow registers and shared memory.
    """
    offs_i = row0 + tl.arange(0, IN)
    offs_o = col0 + tl.arange(0, OUT)
    w = tl.load(W + head * stride_wh + offs_i[:, None] * stride_wi + offs_o[None, :])
    return tl.dot(x, w.to(tl.float32), acc, input_precision=DOT_PRECISION)


@triton.jit
def _linear(parts, W, head, stride_wh, stride_wi, N_PARTS: tl.constexpr, D2: tl.constexpr,
            H2: tl.constexpr):  # fmt: skip
    """Output channel halves (x1, x2), each [ROWS, H2], of ``sum_p parts[p] @ W[head, rows p]``
    where rows p are weight rows [p·D2, (p+1)·D2) and parts[p] is [ROWS, D2].

    A loop rather than unrolled code, so that one weight tile is in flight at a time.
    """
    x1 = tl.zeros([parts[0].shape[0], H2], dtype=tl.float32)
    x2 = tl.zeros([parts[0].shape[0], H2], dtype=tl.float32)
    for p in range(N_PARTS):
        a = parts[0]
        for i in tl.static_range(1, N_PARTS):
            a = tl.where(p == i, parts[i], a)
        x1 = _project(a, W, head, p * D2, 0, stride_wh, stride_wi, x1, D2, H2)
        x2 = _project(a, W, head, p * D2, H2, stride_wh, stride_wi, x2, D2, H2)
    return x1, x2


@triton.jit
def _store_halves(out_base, x1, x2, blocks, valid, stride_on, HALF: tl.constexpr):
    """Store x1 and x2 [ROWS, HALF] as channels [0, HALF) and [HALF, 2·HALF) of ``blocks``."""
    out = out_base + blocks[:, None] * stride_on + tl.arange(0, HALF)[None, :]
    tl.store(out, x1, mask=valid[:, None])
    tl.store(out + HALF, x2, mask=valid[:, None])


@triton.jit
def _store_rope(out_base, x1, x2, blocks, valid, stride_on, COS, SIN, table_rows, stride_ts,
                HALF: tl.constexpr):  # fmt: skip
    """Rotate-half RoPE of the feature halves x1, x2 [ROWS, HALF] at the tables' rows
    ``table_rows``, then stored as :func:`_store_halves` does."""
    table = table_rows[:, None] * stride_ts + tl.arange(0, HALF)[None, :]
    cos1 = tl.load(COS + table, mask=valid[:, None], other=0.0)
    cos2 = tl.load(COS + table + HALF, mask=valid[:, None], other=0.0)
    sin1 = tl.load(SIN + table, mask=valid[:, None], other=0.0)
    sin2 = tl.load(SIN + table + HALF, mask=valid[:, None], other=0.0)
    _store_halves(out_base, x1 * cos1 - x2 * sin1, x2 * cos2 + x1 * sin2, blocks, valid,
                  stride_on, HALF)  # fmt: skip


@triton.jit(do_not_specialize=["q_tokens", "query_start", "k_len"])
def _block_features(
    Q, K, WQ, WK, COS, SIN, QF, KF,
    stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh,
    stride_wqh, stride_wqi, stride_wkh, stride_wki, stride_tb, stride_ts,
    stride_qfb, stride_qfh, stride_qfn, stride_kfb, stride_kfh, stride_kfn,
    q_tokens, query_start, k_len, num_q_heads, num_kv_heads, k_out_per_kv,
    HEAD_DIM: tl.constexpr, HIDDEN: tl.constexpr, BLOCK: tl.constexpr, ROWS: tl.constexpr,
    GATE: tl.constexpr, Q_LINEAR: tl.constexpr, Q_POOLED: tl.constexpr, K_POOLED: tl.constexpr,
):  # fmt: skip
    # Grid: (block groups, batch · (Hkv + Hq)); the first Hkv programs of a batch pool keys,
    # the heavier work (max, min and the key linear), so they start first rather than trail.
    # Channels are handled in halves: the RoPE pairs, and tiles small enough for registers.
    D2: tl.constexpr = HEAD_DIM // 2
    H2: tl.constexpr = HIDDEN // 2
    first = tl.program_id(0).to(tl.int64) * ROWS
    heads = num_q_heads + num_kv_heads
    batch = (tl.program_id(1) // heads).to(tl.int64)
    head = ((tl.program_id(1) + num_q_heads) % heads).to(tl.int64)  # kv heads: Hq, Hq + 1, …
    blocks = first + tl.arange(0, ROWS)
    cos, sin = COS + batch * stride_tb, SIN + batch * stride_tb
    if head < num_q_heads:
        # Query blocks lie on the grid of positions: the first is block query_start // BLOCK.
        if Q_POOLED:
            q_blocks = q_tokens  # blocks here, tokens otherwise
        else:
            q_blocks = tl.cdiv(q_tokens + query_start % BLOCK, BLOCK)
        valid = blocks < q_blocks
        if first < q_blocks:
            base = Q + batch * stride_qb + head * stride_qh
            if Q_POOLED:
                rows = base + blocks * stride_qs
                mean0 = _load_rows(rows, valid, 0, D2)
                mean1 = _load_rows(rows, valid, D2, D2)
            else:
                mean0, mean1 = _mean_rows(base, stride_qs, q_tokens, query_start % BLOCK, first,
                                          ROWS, D2, BLOCK)  # fmt: skip
            out = QF + batch * stride_qfb + head * stride_qfh
            table_rows = query_start // BLOCK + blocks
            if not GATE:
                _store_halves(out, mean0, mean1, blocks, valid, stride_qfn, D2)
            elif Q_LINEAR:
                x1, x2 = _linear((mean0, mean1), WQ, head, stride_wqh, stride_wqi, 2, D2, H2)
                _store_rope(out, x1, x2, blocks, valid, stride_qfn, cos, sin, table_rows,
                            stride_ts, H2)  # fmt: skip
            else:
                _store_rope(out, mean0, mean1, blocks, valid, stride_qfn, cos, sin, table_rows,
                            stride_ts, H2)  # fmt: skip
    else:
        kv_head = head - num_q_heads
        base = K + batch * stride_kb + kv_head * stride_kh
        if K_POOLED:
            # Keys pooled already ([max, min, mean] on channels, one row per block).
            valid = blocks < k_len  # k_len: blocks here, tokens otherwise
            if first < k_len:
                rows = base + blocks * stride_ks
                pooled = (
                    _load_rows(rows, valid, 0, D2), _load_rows(rows, valid, D2, D2),
                    _load_rows(rows, valid, 2 * D2, D2), _load_rows(rows, valid, 3 * D2, D2),
                    _load_rows(rows, valid, 4 * D2, D2), _load_rows(rows, valid, 5 * D2, D2),
                )  # fmt: skip
                _key_features(pooled, WK, KF, batch, kv_head, k_out_per_kv, blocks, valid, cos,
                              sin, stride_wkh, stride_wki, stride_kfb, stride_kfh, stride_kfn,
                              stride_ts, D2, H2)  # fmt: skip
        else:
            valid = blocks < tl.cdiv(k_len, BLOCK)
            if first < tl.cdiv(k_len, BLOCK):
                if GATE:
                    pooled = _pool_rows(base, stride_ks, k_len, 0, first, ROWS, D2, BLOCK)
                    _key_features(pooled, WK, KF, batch, kv_head, k_out_per_kv, blocks, valid,
                                  cos, sin, stride_wkh, stride_wki, stride_kfb, stride_kfh,
                                  stride_kfn, stride_ts, D2, H2)  # fmt: skip
                else:
                    mean0, mean1 = _mean_rows(base, stride_ks, k_len, 0, first, ROWS, D2, BLOCK)
                    out = KF + batch * stride_kfb + kv_head * stride_kfh
                    _store_halves(out, mean0, mean1, blocks, valid, stride_kfn, D2)


@triton.jit
def _key_features(pooled, WK, KF, batch, kv_head, k_out_per_kv, blocks, valid, cos, sin,
                  stride_wkh, stride_wki, stride_kfb, stride_kfh, stride_kfn, stride_ts,
                  D2: tl.constexpr, H2: tl.constexpr):  # fmt: skip
    """Key linear and RoPE of one key head's pooled blocks. Without a query linear the key
    linear has one head per query head: pooled once, projected for each query head of the
    group. Weight rows: max, then min, then mean."""
    for g in range(k_out_per_kv):
        out_head = kv_head * k_out_per_kv + g
        x1, x2 = _linear(pooled, WK, out_head, stride_wkh, stride_wki, 6, D2, H2)
        _store_rope(KF + batch * stride_kfb + out_head * stride_kfh, x1, x2, blocks, valid,
                    stride_kfn, cos, sin, blocks, stride_ts, H2)  # fmt: skip


def _check_power_of_two(name: str, value: int) -> None:
    if value < 16 or value & (value - 1):
        raise ValueError(f"the fused gate kernels need a power-of-two {name} of 16 or more, "
                         f"got {value}.")  # fmt: skip


def _check_device(x: torch.Tensor) -> None:
    if not (x.is_cuda or interpreting()):
        raise ValueError("the fused gate kernels need CUDA tensors (or TRITON_INTERPRET=1).")


def _launch_features(q, k, weight_q, weight_k, cos, sin, hidden, query_start, k_pooled,
                     q_pooled=False):  # fmt: skip
    """q: [b, sq, Hq, d], or [b, nq, Hq, d] pooled; k: [b, sk, Hkv, d], or [b, nb, Hkv, 3d]
    pooled (any strides, unit last stride); weight_k None for the pooled estimator (means only)
    → (qf, kf) float32."""
    q, k = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k))
    b, sq, hq, d = q.shape
    hkv = k.shape[2]
    _check_power_of_two("head_dim", d)
    _check_power_of_two("gate hidden size", hidden)
    gate = weight_k is not None
    q_blocks = sq if q_pooled else num_blocks(query_start % BLOCK + sq)
    k_blocks = k.shape[1] if k_pooled else num_blocks(k.shape[1])
    k_out = hq if gate and weight_q is None else hkv
    qf = torch.empty(b, hq, q_blocks, hidden, dtype=torch.float32, device=q.device)
    kf = torch.empty(b, k_out, k_blocks, hidden, dtype=torch.float32, device=q.device)
    # Unused operands point at q with zero strides.
    wq = weight_q.contiguous() if weight_q is not None else q
    wk = weight_k.contiguous() if gate else q
    cos, sin = (cos, sin) if gate else (q, q)
    w_strides = lambda w: (w.stride(0), w.stride(1)) if w is not q else (0, 0)  # noqa: E731
    t_strides = (cos.stride(0), cos.stride(1)) if gate else (0, 0)
    grid = (cdiv(max(q_blocks, k_blocks), FEATURE_ROWS), b * (hq + hkv))
    with on_device(q.device):
        run_kernel(
            _block_features, grid, q, k, wq, wk, cos, sin, qf, kf,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            *w_strides(wq), *w_strides(wk), *t_strides,
            qf.stride(0), qf.stride(1), qf.stride(2), kf.stride(0), kf.stride(1), kf.stride(2),
            sq, query_start, k_blocks if k_pooled else k.shape[1], hq, hkv, k_out // hkv,
            HEAD_DIM=d, HIDDEN=hidden, BLOCK=BLOCK, ROWS=FEATURE_ROWS, GATE=gate,
            Q_LINEAR=weight_q is not None, Q_POOLED=q_pooled, K_POOLED=k_pooled,
            num_warps=FEATURE_WARPS,
            num_stages=FEATURE_STAGES,
        )  # fmt: skip
    return qf, kf


def gate_block_features(
    q: torch.Tensor,
    k: torch.Tensor,
    weight_k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    weight_q: torch.Tensor | None = None,
    *,
    query_start: int = 0,
    queries_pooled: bool = False,
    keys_pooled: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Block features of a SeerAttention gate (``Qavg_Kmaxminavg``): pooled, projected, RoPE'd.

    Args:
        q: [b, sq, Hq, d] pre-RoPE queries at positions query_start, query_start + 1, …
            (d a power of two); blocks lie on the grid of positions, so the first query block
            is block query_start // 64 and pools only the queries in it.
            With ``queries_pooled``, [b, nq, Hq, d] as ``seer_gates.pool_queries`` makes them
            (query_start then a block's first position).
        k: [b, sk, Hkv, d] pre-RoPE keys from position 0; with ``keys_pooled``, [b, nb, Hkv, 3d]
            as ``seer_gates.pool_keys`` makes them (max, min, mean on channels).
        weight_k: [Hq, 3d, h] when ``weight_q`` is None (the published rule: no query linear,
            pooled keys repeated to the query heads), else [Hkv, 3d, h].
        cos, sin: [b, nt, h] RoPE tables at block positions (row j: block j's first token),
            covering every key block.
        weight_q: [Hq, d, h] or None.

    Returns:
        (qf [b, Hq, nq, h], kf [b, Hq or Hkv, nb, h]) float32: the gate's logits are
        ``qf_i · kf_j / sqrt(h)``.
    """
    _check_device(q)
    hidden = weight_k.shape[-1]
    if weight_k.shape[-2] != 3 * q.shape[-1] or cos.shape[-1] != hidden:
        raise ValueError(f"gate weights {tuple(weight_k.shape)} and RoPE tables "
                         f"{tuple(cos.shape)} do not fit head_dim {q.shape[-1]}.")  # fmt: skip
    if keys_pooled and k.shape[-1] != 3 * q.shape[-1]:
        raise ValueError(f"pooled keys must end in 3·head_dim channels, got {tuple(k.shape)}.")
    if queries_pooled and query_start % BLOCK:
        raise ValueError(f"pooled queries must start a block, not position {query_start}.")
    return _launch_features(q, k, weight_q, weight_k, cos, sin, hidden, query_start, keys_pooled,
                            queries_pooled)  # fmt: skip


def pooled_block_features(q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean-pooled blocks of q [b, Hq, sq, d], the last sq positions of k [b, Hkv, s, d] (heads
    first, as attention gets them): (qf [b, Hq, nq, d], kf [b, Hkv, nb, d]) float32."""
    _check_device(q)
    start = k.shape[2] - q.shape[2]
    return _launch_features(q.transpose(1, 2), k.transpose(1, 2), None, None, None, None,
                            q.shape[-1], start, False)  # fmt: skip
