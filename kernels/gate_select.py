"""Gate scoring and block selection fused into two launches per layer (Triton).

1. ``_block_features``: pools each 64-token block of the pre-RoPE queries (mean) and keys (max,
   min, mean), applies the gate's per-head linear maps and block RoPE, and writes one float32
   feature row per block and head — the only tensors of the gate that reach memory.
2. ``_select_lists``: a persistent kernel; each program scores 16 query block rows of one head
   against their causal key blocks, keeps the rows' logits in a scratch slice of its own (a few
   MB in all, instead of a [b, Hq, nb, nb] score map) and writes the block-sparse kernel's
   per-row lists: the top-k budget of each row, found exactly by a bitwise search for the k-th
   largest logit, or the blocks whose softmax probability is above τ times the row's average.

Nothing here reads a value back to the host. The training-free pooled estimator (mean-pooled
post-RoPE queries and keys, no linear, no RoPE) runs through the same two kernels.
"""

import contextlib
import functools

import torch
import triton
import triton.language as tl

from ._common import BLOCK, interpreting, num_blocks

FEATURE_ROWS = 16  # blocks pooled per program, and query rows scored per work item (tl.dot's M)
# Launch settings, chosen so that neither kernel spills registers on an H100 (see
# benchmarks/bench_gates.py): key blocks per logits tile, logits held in registers while
# selecting, warps and pipeline stages.
KEY_COLUMNS = 32
SELECT_ELEMENTS = 4096
FEATURE_WARPS, SELECT_WARPS, STAGES = 8, 8, 2
# float32 products on tensor cores at float32 accuracy (three tf32 passes).
DOT_PRECISION: tl.constexpr = tl.constexpr("tf32x3")


@triton.jit
def _pool_block(x, valid, count, MIN_MAX: tl.constexpr):
    """(mean, max, min) over the valid rows of one block's tile x [BLOCK, C] float32."""
    mean = tl.sum(x, 0) / count
    high = mean
    low = mean
    if MIN_MAX:
        high = tl.max(tl.where(valid[:, None], x, float("-inf")), 0)
        low = tl.min(tl.where(valid[:, None], x, float("inf")), 0)
    return mean, high, low


@triton.jit
def _pool_rows(base, stride_s, n_tokens, shift, first, ROWS: tl.constexpr, D2: tl.constexpr,
               BLOCK: tl.constexpr, MIN_MAX: tl.constexpr):  # fmt: skip
    """Pool ROWS consecutive blocks from block ``first`` into six [ROWS, D2] float32 tiles:
    (max, min, mean) of channels [0, D2), then of [D2, 2·D2) — the order of the key linear's
    weight rows. Max and min are zero unless MIN_MAX.

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
        m0, h0, l0 = _pool_block(x0, valid, count, MIN_MAX)
        m1, h1, l1 = _pool_block(x1, valid, count, MIN_MAX)
        mean0 = tl.where(here, m0[None, :], mean0)
        mean1 = tl.where(here, m1[None, :], mean1)
        if MIN_MAX:
            high0 = tl.where(here, h0[None, :], high0)
            high1 = tl.where(here, h1[None, :], high1)
            low0 = tl.where(here, l0[None, :], low0)
            low1 = tl.where(here, l1[None, :], low1)
    return high0, high1, low0, low1, mean0, mean1


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


@triton.jit
def _block_features(
    Q, K, WQ, WK, COS, SIN, QF, KF,
    stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh,
    stride_wqh, stride_wqi, stride_wkh, stride_wki, stride_tb, stride_ts,
    stride_qfb, stride_qfh, stride_qfn, stride_kfb, stride_kfh, stride_kfn,
    q_tokens, query_start, k_len, num_q_heads, num_kv_heads, k_out_per_kv,
    HEAD_DIM: tl.constexpr, HIDDEN: tl.constexpr, BLOCK: tl.constexpr, ROWS: tl.constexpr,
    GATE: tl.constexpr, Q_LINEAR: tl.constexpr, K_POOLED: tl.constexpr,
):  # fmt: skip
    # Grid: (block groups, batch · (Hq + Hkv)); the first Hq programs of a batch pool queries.
    # Channels are handled in halves: the RoPE pairs, and tiles small enough for registers.
    D2: tl.constexpr = HEAD_DIM // 2
    H2: tl.constexpr = HIDDEN // 2
    first = tl.program_id(0).to(tl.int64) * ROWS
    heads = num_q_heads + num_kv_heads
    batch = (tl.program_id(1) // heads).to(tl.int64)
    head = (tl.program_id(1) % heads).to(tl.int64)
    blocks = first + tl.arange(0, ROWS)
    cos, sin = COS + batch * stride_tb, SIN + batch * stride_tb
    if head < num_q_heads:
        # Query blocks lie on the grid of positions: the first is block query_start // BLOCK.
        shift = query_start % BLOCK
        valid = blocks < tl.cdiv(q_tokens + shift, BLOCK)
        if first < tl.cdiv(q_tokens + shift, BLOCK):
            base = Q + batch * stride_qb + head * stride_qh
            pooled = _pool_rows(base, stride_qs, q_tokens, shift, first, ROWS, D2, BLOCK, False)
            mean0, mean1 = pooled[4], pooled[5]
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
                pooled = _pool_rows(base, stride_ks, k_len, 0, first, ROWS, D2, BLOCK, GATE)
                if GATE:
                    _key_features(pooled, WK, KF, batch, kv_head, k_out_per_kv, blocks, valid,
                                  cos, sin, stride_wkh, stride_wki, stride_kfb, stride_kfh,
                                  stride_kfn, stride_ts, D2, H2)  # fmt: skip
                else:
                    out = KF + batch * stride_kfb + kv_head * stride_kfh
                    _store_halves(out, pooled[4], pooled[5], blocks, valid, stride_kfn, D2)


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


@triton.jit
def _top_k(x, candidate, k, SEL_ROWS: tl.constexpr):
    """Mask of each row's k largest x among ``candidate`` (ties go to the lowest column).

    x: [SEL_ROWS, KEYS] float32; k: [SEL_ROWS] int32, at most the row's candidates. The k-th
    largest value is found exactly on keys that order like the floats, two bits per step. A
    row's count is a cross-warp reduction, the cost here: a step's three counts travel in one
    int64 sum, 21 bits each.
    """
    bits = x.to(tl.int32, bitcast=True)
    keys = (bits ^ ((bits >> 31) | -2147483648)).to(tl.uint32, bitcast=True)
    keys = tl.where(candidate, keys, 0)
    one = tl.full([SEL_ROWS], 1, dtype=tl.uint32)
    field = (1 << 21) - 1
    kth = tl.zeros([SEL_ROWS], dtype=tl.uint32)
    for i in range(16):
        shift = 30 - 2 * i
        trial1 = kth | (one << shift)
        trial2 = kth | ((one + one) << shift)
        trial3 = trial1 | trial2
        packed = (keys >= trial1[:, None]).to(tl.int64)
        packed += (keys >= trial2[:, None]).to(tl.int64) << 21
        packed += (keys >= trial3[:, None]).to(tl.int64) << 42
        counts = tl.sum(packed, 1)
        kth = tl.where((counts & field) >= k, trial1, kth)
        kth = tl.where(((counts >> 21) & field) >= k, trial2, kth)
        kth = tl.where((counts >> 42) >= k, trial3, kth)
    above = keys > kth[:, None]
    ties = candidate & (keys == kth[:, None])
    spare = k - tl.sum(above.to(tl.int32), 1)
    tie_rank = tl.cumsum(ties.to(tl.int32), 1)
    return candidate & (above | (ties & (tie_rank <= spare[:, None])))


@triton.jit
def _select_lists(
    QF, KF, Budgets, Scratch, Indices, Counts,
    stride_qfb, stride_qfh, stride_qfn, stride_kfb, stride_kfh, stride_kfn,
    stride_ib, stride_ih, stride_in, stride_cb, stride_ch,
    num_q_heads, kf_group, q_blocks, query_offset, budget_rows, dense_row, width,
    num_items, groups_per_head, score_scale, threshold,
    HIDDEN: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr, KEYS: tl.constexpr,
    SEL_ROWS: tl.constexpr, TOP_K: tl.constexpr, KEEP_SINK: tl.constexpr,
):  # fmt: skip
    # Persistent: program p takes work items p, p + P, … ; an item is ROWS query rows of one
    # head, heaviest (last) rows first. Its logits go to this program's own scratch slice.
    scratch = Scratch + tl.program_id(0).to(tl.int64) * (ROWS * KEYS)
    H2: tl.constexpr = HIDDEN // 2
    offs_r = tl.arange(0, ROWS)
    offs_c = tl.arange(0, COLS)
    offs_h = tl.arange(0, H2)
    offs_k = tl.arange(0, KEYS)
    heads_total = num_items // groups_per_head
    for item in range(tl.program_id(0), num_items, tl.num_programs(0)):
        group = groups_per_head - 1 - item // heads_total
        batch = ((item % heads_total) // num_q_heads).to(tl.int64)
        head = ((item % heads_total) % num_q_heads).to(tl.int64)
        local = group * ROWS + offs_r
        q_ptrs = QF + batch * stride_qfb + head * stride_qfh + local[:, None] * stride_qfn
        # Both channel halves [ROWS, H2]: float32 operands of tl.dot stay small.
        q1 = tl.load(q_ptrs + offs_h[None, :], mask=(local < q_blocks)[:, None], other=0.0)
        q2 = tl.load(q_ptrs + H2 + offs_h[None, :], mask=(local < q_blocks)[:, None], other=0.0)
        key_end = query_offset + tl.minimum(group * ROWS + ROWS, q_blocks)
        kf_base = KF + batch * stride_kfb + (head // kf_group) * stride_kfh
        for col0 in range(0, key_end, COLS):
            cols = col0 + offs_c
            in_range = cols < key_end
            # [H2, COLS]
            k_ptrs = kf_base + cols[None, :] * stride_kfn + offs_h[:, None]
            k1 = tl.load(k_ptrs, mask=in_range[None, :], other=0.0)
            k2 = tl.load(k_ptrs + H2, mask=in_range[None, :], other=0.0)
            logits = tl.dot(q1, k1, input_precision=DOT_PRECISION)
            logits = tl.dot(q2, k2, logits, input_precision=DOT_PRECISION)
            tl.store(scratch + offs_r[:, None] * KEYS + cols[None, :], logits,
                     mask=in_range[None, :])  # fmt: skip
        tl.debug_barrier()  # the logits of all threads are in scratch
        for sub in range(0, ROWS, SEL_ROWS):
            sel = sub + tl.arange(0, SEL_ROWS)
            row_ok = group * ROWS + sel < q_blocks
            row = query_offset + group * ROWS + sel
            # [SEL_ROWS, KEYS]
            causal = offs_k[None, :] < row[:, None]
            x = tl.load(scratch + sel[:, None] * KEYS + offs_k[None, :],
                        mask=(offs_k[None, :] <= row[:, None]) & row_ok[:, None],
                        other=float("-inf"))  # fmt: skip
            # The sink block is kept outside the ranking and counts inside the row's budget.
            has_sink = (row > 0) & KEEP_SINK
            sink = (offs_k[None, :] == 0) & has_sink[:, None]
            if TOP_K:
                budget = tl.load(Budgets + row, mask=row_ok & (row < budget_rows), other=0)
                budget -= has_sink.to(tl.int32)
                keep = _top_k(x, causal & ~sink, budget, SEL_ROWS)
            else:
                # The softmax runs over j <= i: the diagonal counts, though it is not listed.
                scores = x * score_scale
                row_max = tl.max(scores, 1)
                # Rows past the end hold no logits: keep their arithmetic finite.
                row_max = tl.where(row_max == float("-inf"), 0.0, row_max)
                p = tl.exp(scores - row_max[:, None])
                p = p / tl.maximum(tl.sum(p, 1), 1.0)[:, None]  # ≥ 1 on real rows: exp(0)
                # τ times the row's average probability, 1 / (row + 1): MaskPolicy's meaning.
                keep = causal & (p > threshold / (row[:, None] + 1).to(tl.float32))
            keep = keep | sink | (causal & (row[:, None] == dense_row))
            slot = tl.cumsum(keep.to(tl.int32), 1) - 1
            out = Indices + batch * stride_ib + head * stride_ih
            out += (row - query_offset)[:, None] * stride_in + slot
            tl.store(out, offs_k[None, :] + 0 * slot, mask=keep & (slot < width) & row_ok[:, None])
            count = tl.minimum(tl.sum(keep.to(tl.int32), 1), width)
            counts = Counts + batch * stride_cb + head * stride_ch + (row - query_offset)
            tl.store(counts, count, mask=row_ok)
        tl.debug_barrier()  # every thread is done with scratch before the next item


def _on_device(device: torch.device):
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


@functools.lru_cache(maxsize=8)
def _program_slots(device: torch.device) -> int:
    """Programs of the persistent selection kernel: two per SM keep every SM busy."""
    if device.type != "cuda":
        return 4
    return 2 * torch.cuda.get_device_properties(device).multi_processor_count


def _check_power_of_two(name: str, value: int) -> None:
    if value < 16 or value & (value - 1):
        raise ValueError(f"the fused gate kernels need a power-of-two {name} of 16 or more, "
                         f"got {value}.")  # fmt: skip


def _check_device(x: torch.Tensor) -> None:
    if not (x.is_cuda or interpreting()):
        raise ValueError("the fused gate kernels need CUDA tensors (or TRITON_INTERPRET=1).")


def _launch_features(q, k, weight_q, weight_k, cos, sin, hidden, query_start, k_pooled):
    """q: [b, sq, Hq, d]; k: [b, sk, Hkv, d], or [b, nb, Hkv, 3d] pooled (any strides, unit last
    stride); weight_k None for the pooled estimator (means only) → (qf, kf) float32."""
    q, k = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k))
    b, sq, hq, d = q.shape
    hkv = k.shape[2]
    _check_power_of_two("head_dim", d)
    _check_power_of_two("gate hidden size", hidden)
    gate = weight_k is not None
    q_blocks = num_blocks(query_start % BLOCK + sq)
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
    grid = (triton.cdiv(max(q_blocks, k_blocks), FEATURE_ROWS), b * (hq + hkv))
    with _on_device(q.device):
        _block_features[grid](
            q, k, wq, wk, cos, sin, qf, kf,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            *w_strides(wq), *w_strides(wk), *t_strides,
            qf.stride(0), qf.stride(1), qf.stride(2), kf.stride(0), kf.stride(1), kf.stride(2),
            sq, query_start, k_blocks if k_pooled else k.shape[1], hq, hkv, k_out // hkv,
            HEAD_DIM=d, HIDDEN=hidden, BLOCK=BLOCK, ROWS=FEATURE_ROWS, GATE=gate,
            Q_LINEAR=weight_q is not None, K_POOLED=k_pooled, num_warps=FEATURE_WARPS,
            num_stages=STAGES,
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
    keys_pooled: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Block features of a SeerAttention gate (``Qavg_Kmaxminavg``): pooled, projected, RoPE'd.

    Args:
        q: [b, sq, Hq, d] pre-RoPE queries at positions query_start, query_start + 1, …
            (d a power of two); blocks lie on the grid of positions, so the first query block
            is block query_start // 64 and pools only the queries in it.
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
    return _launch_features(q, k, weight_q, weight_k, cos, sin, hidden, query_start, keys_pooled)


def pooled_block_features(q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean-pooled blocks of q [b, Hq, sq, d], the last sq positions of k [b, Hkv, s, d] (heads
    first, as attention gets them): (qf [b, Hq, nq, d], kf [b, Hkv, nb, d]) float32."""
    _check_device(q)
    start = k.shape[2] - q.shape[2]
    return _launch_features(q.transpose(1, 2), k.transpose(1, 2), None, None, None, None,
                            q.shape[-1], start, False)  # fmt: skip


def block_lists_from_features(
    qf: torch.Tensor,
    kf: torch.Tensor,
    *,
    budgets: torch.Tensor | None = None,
    threshold: float | None = None,
    scale: float = 1.0,
    keep_sink: bool = True,
    dense_row: int = -1,
    query_offset: int = 0,
    width: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The block-sparse kernel's per-row lists from block features, in one launch.

    Scores query block rows ``query_offset + i`` of qf [b, Hq, n, h] against key blocks
    ``j <= query_offset + i`` of kf [b, Hk, nk, h] (query head i reads key head i // (Hq / Hk)):
    logits ``scale · qf_i · kf_j``. Keeps, besides the diagonal (never listed, always computed):
    - top-k: ``budgets`` int32 [r] on the device, blocks to keep in absolute row i < r, the
      diagonal not counted, the sink counted; the row's highest logits fill it;
    - threshold: blocks whose softmax probability over j ≤ i exceeds ``threshold`` times the
      row's average, 1 / (i + 1) (``MaskPolicy.threshold``);
    - the first block if ``keep_sink``, and every block of absolute row ``dense_row``.

    ``width`` (default: the longest possible row) must bound every row's count. Returns
    (indices [b, Hq, n, width] int32, counts [b, Hq, n] int32): row i keeps
    ``indices[..., i, :counts[..., i]]`` in ascending order; later slots are unspecified.
    """
    if (budgets is None) == (threshold is None):
        raise ValueError("give either row budgets or a threshold, not both or neither.")
    b, hq, n, hidden = qf.shape
    keys = query_offset + n
    if kf.shape[0] != b or kf.shape[2] < keys or kf.shape[3] != hidden or hq % kf.shape[1]:
        raise ValueError(f"key features {tuple(kf.shape)} do not fit query features "
                         f"{tuple(qf.shape)} at query offset {query_offset}.")  # fmt: skip
    if qf.dtype != torch.float32 or kf.dtype != torch.float32:
        raise ValueError("block features must be float32, as gate_block_features makes them.")
    if budgets is not None and (budgets.dtype != torch.int32 or budgets.device != qf.device):
        raise ValueError("row budgets must be an int32 tensor on the features' device.")
    qf, kf = (x if x.stride(-1) == 1 else x.contiguous() for x in (qf, kf))
    if keys >= 1 << 21:
        raise ValueError(f"{keys} key blocks are more than the selection kernel counts (2^21).")
    width = width if width is not None else max(keys - 1, 1)
    indices = torch.empty(b, hq, n, width, dtype=torch.int32, device=qf.device)
    counts = torch.empty(b, hq, n, dtype=torch.int32, device=qf.device)
    key_slots = max(triton.next_power_of_2(keys), 16)
    groups = triton.cdiv(n, FEATURE_ROWS)
    items = b * hq * groups
    programs = min(items, _program_slots(qf.device))
    scratch = torch.empty(programs * FEATURE_ROWS * key_slots, dtype=torch.float32,
                          device=qf.device)  # fmt: skip
    top_k = budgets is not None
    with _on_device(qf.device):
        _select_lists[(programs,)](
            qf, kf, budgets if top_k else counts, scratch, indices, counts,
            qf.stride(0), qf.stride(1), qf.stride(2), kf.stride(0), kf.stride(1), kf.stride(2),
            indices.stride(0), indices.stride(1), indices.stride(2),
            counts.stride(0), counts.stride(1),
            hq, hq // kf.shape[1], n, query_offset, budgets.numel() if top_k else 0, dense_row,
            width, items, groups, scale, threshold if not top_k else 0.0,
            HIDDEN=hidden, ROWS=FEATURE_ROWS, COLS=KEY_COLUMNS, KEYS=key_slots,
            SEL_ROWS=max(1, min(FEATURE_ROWS, SELECT_ELEMENTS // key_slots)), TOP_K=top_k,
            KEEP_SINK=keep_sink, num_warps=SELECT_WARPS, num_stages=STAGES,
        )  # fmt: skip
    return indices, counts
