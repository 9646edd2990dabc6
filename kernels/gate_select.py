"""Block selection in one launch (Triton): block features to the block-sparse kernel's lists.

``_select_lists`` is a persistent kernel: each program scores 16 query block rows of one head
against their causal key blocks (the features of ``gate_features``), keeps the rows' logits in a
scratch slice of its own (a few MB in all, instead of a [b, Hq, nb, nb] score map) and writes
the per-row lists: the top-k budget of each row, found exactly by a search for the k-th largest
logit, or the blocks whose softmax probability is above τ times the row's average. A layer
budget takes two launches around a top-k of PyTorch's: one writes every candidate block's rank
(its probability times a per-row factor), the next keeps the ranks at or above each sequence's
cut. Nothing here reads a value back to the host: list widths are the caller's static bounds.
"""

import functools
import math

import torch
import triton
import triton.language as tl

from ._common import cdiv, next_power_of_2, on_device, run_kernel
from .gate_features import DOT_PRECISION, FEATURE_ROWS, _check_device

# Key blocks per logits tile and logits held in registers while selecting; the fastest of
# bench_gates.py --sweep on the H100 (BENCHMARKS.md), which times other settings.
KEY_COLUMNS = 64
SELECT_ELEMENTS = 2048
SELECT_WARPS, SELECT_STAGES = 4, 2
# Row widths the selection searches (3: the longest row's, half and a quarter of it; 2: the
# first two; 1: the longest). Each is compiled code of its own: on the H100 two widths cost
# +6 % selection time against three and compile ~1 s sooner on a first run (BENCHMARKS.md).
SELECT_WIDTHS = 2

# What a selection launch does with a row's logits (``_select_rows``'s MODE): keep the blocks
# above a threshold, keep the row's top-k budget, write the blocks' ranks, or keep the ranks
# at or above the sequence's cut.
THRESHOLD, TOP_K, WRITE_RANKS, RANKED = (tl.constexpr(mode) for mode in range(4))


@triton.jit
def _top_k(x, candidate, k, SEL_ROWS: tl.constexpr):
    """Mask of each row's k largest x among ``candidate`` (ties go to the lowest column).

    x: [SEL_ROWS, KEYS] float32; k: [SEL_ROWS] int32, at most the row's candidates. A search
    for the k-th largest value on keys that order like the floats, two bits per step, which
    stops once every row's count of keys at or above the bits found so far is exactly k: those
    keys are the row's top k (random logits settle in about half the 16 steps). A row's count
    is a cross-warp reduction, the cost here: a step's three counts travel in one int64 sum,
    21 bits each.
    """
    bits = x.to(tl.int32, bitcast=True)
    keys = (bits ^ ((bits >> 31) | -2147483648)).to(tl.uint32, bitcast=True)
    keys = tl.where(candidate, keys, 0)
    k = tl.maximum(k, 0)
    one = tl.full([SEL_ROWS], 1, dtype=tl.uint32)
    field = (1 << 21) - 1
    kth = tl.zeros([SEL_ROWS], dtype=tl.uint32)
    at_kth = tl.full([SEL_ROWS], -1, dtype=tl.int32)  # keys >= kth, once a trial has passed
    shift = 30
    unsettled = SEL_ROWS
    while (shift >= 0) & (unsettled > 0):
        trial1 = kth | (one << shift)
        trial2 = kth | ((one + one) << shift)
        trial3 = trial1 | trial2
        packed = (keys >= trial1[:, None]).to(tl.int64)
        packed += (keys >= trial2[:, None]).to(tl.int64) << 21
        packed += (keys >= trial3[:, None]).to(tl.int64) << 42
        counts = tl.sum(packed, 1)
        count1 = (counts & field).to(tl.int32)
        count2 = ((counts >> 21) & field).to(tl.int32)
        count3 = (counts >> 42).to(tl.int32)
        # count1 >= count2 >= count3: the highest trial that keeps k keys wins.
        kth = tl.where(count1 >= k, trial1, kth)
        at_kth = tl.where(count1 >= k, count1, at_kth)
        kth = tl.where(count2 >= k, trial2, kth)
        at_kth = tl.where(count2 >= k, count2, at_kth)
        kth = tl.where(count3 >= k, trial3, kth)
        at_kth = tl.where(count3 >= k, count3, at_kth)
        unsettled = tl.sum((at_kth != k).to(tl.int32), 0)
        shift -= 2
    keep = candidate & (keys >= kth[:, None])
    if unsettled > 0:
        # Ties at the k-th value: all 32 bits found, kth is that value.
        above = keys > kth[:, None]
        ties = candidate & (keys == kth[:, None])
        spare = k - tl.sum(above.to(tl.int32), 1)
        tie_rank = tl.cumsum(ties.to(tl.int32), 1)
        keep = candidate & (above | (ties & (tie_rank <= spare[:, None])))
    return keep


@triton.jit
def _select_rows(
    scratch, Budgets, out, counts_out, group, q_blocks, query_offset, budget_rows, dense_row,
    local_blocks, width, stride_in, score_scale, threshold, RowScale, cut,
    ROWS: tl.constexpr, KEYS: tl.constexpr, STRIDE: tl.constexpr, SEL_ROWS: tl.constexpr,
    MODE: tl.constexpr, KEEP_SINK: tl.constexpr,
):  # fmt: skip
    """Lists of the ROWS query rows of ``group`` from their logits in ``scratch`` (row stride
    STRIDE), SEL_ROWS rows at a time over the first KEYS key blocks, which hold every row's
    causal keys. ``out`` and ``counts_out`` point at the head's first row; under WRITE_RANKS
    ``out`` is the head's float32 ranks (row stride ``stride_in``) and no list is written."""
    offs_k = tl.arange(0, KEYS)
    for sub in range(0, ROWS, SEL_ROWS):
        sel = sub + tl.arange(0, SEL_ROWS)
        row_ok = group * ROWS + sel < q_blocks
        row = query_offset + group * ROWS + sel
        # [SEL_ROWS, KEYS]
        causal = offs_k[None, :] < row[:, None]
        x = tl.load(scratch + sel[:, None] * STRIDE + offs_k[None, :],
                    mask=(offs_k[None, :] <= row[:, None]) & row_ok[:, None],
                    other=float("-inf"))  # fmt: skip
        # The local window (the last local_blocks before the diagonal) and the sink are kept
        # outside the ranking and count inside the row's budget.
        window = tl.minimum(row, local_blocks)
        has_sink = (row > local_blocks) & KEEP_SINK  # a sink outside the window
        forced = causal & (offs_k[None, :] >= (row - window)[:, None])
        forced |= (offs_k[None, :] == 0) & has_sink[:, None]
        forced |= causal & (row[:, None] == dense_row)
        if MODE == TOP_K:
            budget = tl.load(Budgets + row, mask=row_ok & (row < budget_rows), other=0)
            # Counted from the row index: a cross-warp sum is this kernel's cost.
            budget -= window + has_sink.to(tl.int32)
            keep = _top_k(x, causal & ~forced, budget, SEL_ROWS)
        else:
            # The softmax runs over j <= i: the diagonal counts, though it is not listed.
            scores = x * score_scale
            row_max = tl.max(scores, 1)
            # Rows past the end hold no logits: keep their arithmetic finite.
            row_max = tl.where(row_max == float("-inf"), 0.0, row_max)
            p = tl.exp(scores - row_max[:, None])
            p = p / tl.maximum(tl.sum(p, 1), 1.0)[:, None]  # ≥ 1 on real rows: exp(0)
            if MODE == THRESHOLD:
                # τ times the row's average probability, 1 / (row + 1): MaskPolicy's meaning.
                keep = causal & (p > threshold / (row[:, None] + 1).to(tl.float32))
            else:
                rank = p * tl.load(RowScale + row, mask=row_ok, other=0.0)[:, None]
                keep = causal & ~forced & (rank >= cut)
                if MODE == WRITE_RANKS:
                    ptrs = out + (row - query_offset)[:, None] * stride_in + offs_k[None, :]
                    tl.store(ptrs, rank, mask=causal & ~forced & row_ok[:, None])
        if MODE != WRITE_RANKS:
            keep = keep | forced
            slot = tl.cumsum(keep.to(tl.int32), 1) - 1
            ptrs = out + (row - query_offset)[:, None] * stride_in + slot
            tl.store(ptrs, offs_k[None, :] + 0 * slot,
                     mask=keep & (slot < width) & row_ok[:, None])  # fmt: skip
            count = tl.minimum(tl.sum(keep.to(tl.int32), 1), width)
            tl.store(counts_out + (row - query_offset), count, mask=row_ok)


@triton.jit(
    do_not_specialize=[
        "q_blocks",
        "query_offset",
        "budget_rows",
        "dense_row",
        "local_blocks",
        "width",
        "num_items",
        "groups_per_head",
    ]
)
def _select_lists(
    QF, KF, Budgets, Scratch, Indices, Counts, RowScale, Cuts,
    stride_qfb, stride_qfh, stride_qfn, stride_kfb, stride_kfh, stride_kfn,
    stride_ib, stride_ih, stride_in, stride_cb, stride_ch,
    num_q_heads, kf_group, q_blocks, query_offset, budget_rows, dense_row, local_blocks, width,
    num_items, groups_per_head, score_scale, threshold,
    HIDDEN: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr, KEYS: tl.constexpr,
    KEYS_HALF: tl.constexpr, KEYS_QUARTER: tl.constexpr, SEL_FULL: tl.constexpr,
    SEL_HALF: tl.constexpr, SEL_QUARTER: tl.constexpr, MODE: tl.constexpr,
    KEEP_SINK: tl.constexpr, WIDTHS: tl.constexpr,
):  # fmt: skip
    # Persistent: program p takes work items p, p + P, … ; an item is ROWS query rows of one
    # head, heaviest (last) rows first. Its logits go to this program's own scratch slice.
    scratch = Scratch + tl.program_id(0).to(tl.int64) * (ROWS * KEYS)
    H2: tl.constexpr = HIDDEN // 2
    offs_r = tl.arange(0, ROWS)
    offs_c = tl.arange(0, COLS)
    offs_h = tl.arange(0, H2)
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
        out = Indices + batch * stride_ib + head * stride_ih
        counts_out = Counts + batch * stride_cb + head * stride_ch
        cut = tl.load(Cuts + batch) if MODE == RANKED else 0.0
        args = (scratch, Budgets, out, counts_out, group, q_blocks, query_offset, budget_rows,
                dense_row, local_blocks, width, stride_in, score_scale, threshold, RowScale,
                cut)  # fmt: skip
        # Rows search only the keys they have, in the smallest of the WIDTHS widths that holds
        # them: the short rows of a causal map need not search the longest row's width.
        if WIDTHS > 2 and key_end <= KEYS_QUARTER:
            _select_rows(*args, ROWS, KEYS_QUARTER, KEYS, SEL_QUARTER, MODE, KEEP_SINK)
        elif WIDTHS > 1 and key_end <= KEYS_HALF:
            _select_rows(*args, ROWS, KEYS_HALF, KEYS, SEL_HALF, MODE, KEEP_SINK)
        else:
            _select_rows(*args, ROWS, KEYS, KEYS, SEL_FULL, MODE, KEEP_SINK)
        tl.debug_barrier()  # every thread is done with scratch before the next item


def _sel_rows(keys: int) -> int:
    """Rows that select at once over ``keys`` columns: SELECT_ELEMENTS logits in registers."""
    return max(1, min(FEATURE_ROWS, SELECT_ELEMENTS // keys))


@functools.lru_cache(maxsize=8)
def _program_slots(device: torch.device) -> int:
    """Programs of the persistent selection kernel: two per SM keep every SM busy."""
    if device.type != "cuda":
        return 4
    return 2 * torch.cuda.get_device_properties(device).multi_processor_count


def block_lists_from_features(
    qf: torch.Tensor,
    kf: torch.Tensor,
    *,
    budgets: torch.Tensor | None = None,
    threshold: float | None = None,
    scale: float = 1.0,
    keep_sink: bool = True,
    local_blocks: int = 0,
    dense_row: int = -1,
    query_offset: int = 0,
    width: int | None = None,
    max_keys: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The block-sparse kernel's per-row lists from block features, in one launch.

    Scores query block rows ``query_offset + i`` of qf [b, Hq, n, h] against key blocks
    ``j <= query_offset + i`` of kf [b, Hk, nk, h] (query head i reads key head i // (Hq / Hk)):
    logits ``scale · qf_i · kf_j``. Keeps, besides the diagonal (never listed, always computed):
    - top-k: ``budgets`` int32 [r] on the device, blocks to keep in absolute row i < r, the
      diagonal not counted, the sink counted; the row's highest logits fill it;
    - threshold: blocks whose softmax probability over j ≤ i exceeds ``threshold`` times the
      row's average, 1 / (i + 1) (``MaskPolicy.threshold``);
    - the first block if ``keep_sink``, the ``local_blocks`` blocks before the diagonal (top-k:
      counted in the budget, as the sink), and every block of absolute row ``dense_row``.

    ``width`` (default: the longest possible row) must bound every row's count. ``max_keys``:
    key blocks of the widest call sharing this one's compiled kernel (a chunked prompt's last
    chunk; default: this call's) — the kernel is compiled per power of two of it. Returns
    (indices [b, Hq, n, width] int32, counts [b, Hq, n] int32): row i keeps
    ``indices[..., i, :counts[..., i]]`` in ascending order; later slots are unspecified.
    """
    if (budgets is None) == (threshold is None):
        raise ValueError("give either row budgets or a threshold, not both or neither.")
    if budgets is not None and (budgets.dtype != torch.int32 or budgets.device != qf.device):
        raise ValueError("row budgets must be an int32 tensor on the features' device.")
    selection = _Selection(qf, kf, scale, keep_sink, local_blocks, dense_row, query_offset,
                           max_keys)  # fmt: skip
    if budgets is not None:
        return selection.lists(TOP_K, width, budgets=budgets)
    return selection.lists(THRESHOLD, width, threshold=threshold)


def layer_block_lists_from_features(
    qf: torch.Tensor,
    kf: torch.Tensor,
    *,
    keep: int,
    row_scale: torch.Tensor,
    scale: float = 1.0,
    keep_sink: bool = True,
    local_blocks: int = 0,
    dense_row: int = -1,
    query_offset: int = 0,
    max_keys: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's lists under a layer budget: per sequence, the forced blocks (as in
    :func:`block_lists_from_features`) and the ``keep`` other causal blocks of highest rank
    over every head and row, a block's rank being its softmax probability over j ≤ i times
    ``row_scale[i]`` (float32 [rows of the prompt] on the device). Two selection launches around
    a top-k of the ranks (float32 [b, Hq, n, nk], the only score map made): blocks tied with
    the ``keep``-th rank are all kept. Same arguments and lists as
    :func:`block_lists_from_features`, list width the longest row."""
    if row_scale.dtype != torch.float32 or row_scale.device != qf.device:
        raise ValueError("row_scale must be a float32 tensor on the features' device.")
    selection = _Selection(qf, kf, scale, keep_sink, local_blocks, dense_row, query_offset,
                           max_keys)  # fmt: skip
    b, hq, n, _ = qf.shape
    ranks = torch.full((b, hq, n, selection.keys), -math.inf, device=qf.device)
    selection.write_ranks(ranks, row_scale)
    if keep > 0:
        cuts = ranks.view(b, -1).topk(keep, dim=-1, sorted=False).values.amin(dim=-1)
    else:
        cuts = torch.full((b,), math.inf, device=qf.device)
    del ranks
    return selection.lists(RANKED, None, row_scale=row_scale, cuts=cuts)


class _Selection:
    """One layer's selection launches over the same features and forced blocks."""

    def __init__(self, qf, kf, scale, keep_sink, local_blocks, dense_row, query_offset, max_keys):
        _check_device(qf)
        b, hq, n, hidden = qf.shape
        self.keys = query_offset + n
        if (kf.shape[0] != b or kf.shape[2] < self.keys or kf.shape[3] != hidden
                or hq % kf.shape[1]):  # fmt: skip
            raise ValueError(f"key features {tuple(kf.shape)} do not fit query features "
                             f"{tuple(qf.shape)} at query offset {query_offset}.")  # fmt: skip
        if qf.dtype != torch.float32 or kf.dtype != torch.float32:
            raise ValueError("block features must be float32, as gate_block_features makes them.")
        if local_blocks < 0:
            raise ValueError(f"local_blocks must be 0 or more, got {local_blocks}.")
        if self.keys >= 1 << 21:
            raise ValueError(f"{self.keys} key blocks are more than the selection kernel counts "
                             "(2^21).")  # fmt: skip
        self.qf, self.kf = (x if x.stride(-1) == 1 else x.contiguous() for x in (qf, kf))
        self.scale, self.keep_sink, self.dense_row = scale, keep_sink, dense_row
        self.local_blocks, self.query_offset = min(local_blocks, self.keys), query_offset
        self.key_slots = max(next_power_of_2(max(self.keys, max_keys or 0)), 16)

    def lists(self, mode, width: int | None, *, budgets=None, threshold=None, row_scale=None,
              cuts=None):  # fmt: skip
        b, hq, n, _ = self.qf.shape
        width = width if width is not None else max(self.keys - 1, 1)
        indices = torch.empty(b, hq, n, width, dtype=torch.int32, device=self.qf.device)
        counts = torch.empty(b, hq, n, dtype=torch.int32, device=self.qf.device)
        self._launch(mode, indices, counts, width, budgets, threshold, row_scale, cuts)
        return indices, counts

    def write_ranks(self, ranks: torch.Tensor, row_scale: torch.Tensor) -> None:
        self._launch(WRITE_RANKS, ranks, ranks, self.keys, None, None, row_scale, None)

    def _launch(self, mode, out, counts, width, budgets, threshold, row_scale, cuts):
        qf, kf = self.qf, self.kf
        b, hq, n, hidden = qf.shape
        key_slots = self.key_slots
        half, quarter = max(key_slots // 2, 16), max(key_slots // 4, 16)
        groups = cdiv(n, FEATURE_ROWS)
        items = b * hq * groups
        programs = min(items, _program_slots(qf.device))
        scratch = torch.empty(programs * FEATURE_ROWS * key_slots, dtype=torch.float32,
                              device=qf.device)  # fmt: skip
        unused = counts  # a pointer the launch's mode never reads
        with on_device(qf.device):
            run_kernel(
                _select_lists, (programs,), qf, kf, unused if budgets is None else budgets,
                scratch, out, counts, unused if row_scale is None else row_scale,
                unused if cuts is None else cuts,
                qf.stride(0), qf.stride(1), qf.stride(2), kf.stride(0), kf.stride(1),
                kf.stride(2), out.stride(0), out.stride(1), out.stride(2),
                counts.stride(0), counts.stride(1),
                hq, hq // kf.shape[1], n, self.query_offset,
                0 if budgets is None else budgets.numel(), self.dense_row, self.local_blocks,
                width, items, groups, self.scale, threshold or 0.0,
                HIDDEN=hidden, ROWS=FEATURE_ROWS, COLS=KEY_COLUMNS, KEYS=key_slots,
                KEYS_HALF=half, KEYS_QUARTER=quarter, SEL_FULL=_sel_rows(key_slots),
                SEL_HALF=_sel_rows(half), SEL_QUARTER=_sel_rows(quarter), MODE=mode.value,
                KEEP_SINK=self.keep_sink, WIDTHS=SELECT_WIDTHS, num_warps=SELECT_WARPS,
                num_stages=SELECT_STAGES,
            )  # fmt: skip
