"""Experimental variants of the block-sparse attention forward, timed against the current kernel.

Every variant computes what ``seer_kernels.block_sparse_attention_from_lists`` computes (a whole
prompt, q_start = 0): per query block row, the kept 64×64 key tiles of its list plus the causal
diagonal tile. Variants:

- ``current``: the library kernel with its shipped launch configuration. It took over the
  variants that won here on an H100 (the softmax scale in one FMA, group order, TMA loads; the
  docstring of ``kernels/block_sparse.py`` gives their times); the variants below lost to them
  and stay as the record, with their own loop, the library's ``attend_tile`` and the plain
  head-major order.
- ``wide``: two list entries per step, 64×128 score tiles (half the softmax rescales, wider
  MMAs); an odd last entry runs as a 64-wide tile.
- ``pair128``: 128-row query tiles covering two adjacent rows. The two rows' lists become one
  union list (host-side, in PyTorch, timed apart as ``pair128 prep``), each entry
  ``column·4 + flags`` (bit 0: the upper row keeps the tile, bit 1: the lower row); the half
  that did not keep a tile is masked. The two diagonal tiles run as one 128×128 tile.
  ``pair128+tma`` loads its tiles through TMA.

The lists come from the project's own selection (``seer_gates.pooled_block_lists``, top-k under
``MaskPolicy``) on two kinds of synthetic q/k: ``stripes``, where key blocks carry a per-head
salience that all queries of the head see (vertical stripes, as in real attention maps, so
adjacent rows keep similar blocks), and ``iid``, plain Gaussian q/k (adjacent rows nearly
independent: the worst case for ``pair128``). The table gives each setting's row overlap.

Run (GPU; checks each variant on a small awkward shape, then times them):

    source benchmarks/seer_env.sh && python3 benchmarks/kernel_variants.py

Correctness checks only, on the CPU through Triton's interpreter (fp32 and fp16):

    TRITON_INTERPRET=1 python benchmarks/kernel_variants.py --check
"""

import argparse
import math
import sys
from dataclasses import dataclass, field
from functools import partial

import torch
import triton
import triton.language as tl
from seer_gates import MaskPolicy, pooled_block_lists
from seer_kernels import (
    BLOCK,
    block_sparse_attention_from_lists,
    block_sparse_attention_reference,
    interpreting,
    num_blocks,
)
from seer_kernels._common import (
    LOG2_E,
    attend_tile,
    load_diagonal_tile,
    load_kv_tile,
    program_coordinates,
    start_query_block,
    store_query_block,
)
from seer_kernels.block_sparse import _set_scratch_allocator

Q_HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128
TIMED = [  # (length, sparsity, list source)
    (131072, 0.9, "stripes"),
    (131072, 0.95, "stripes"),
    (32768, 0.9, "stripes"),
    (32768, 0.95, "stripes"),
    (131072, 0.9, "iid"),
]


# ---------------------------------------------------------------------------------------------
# Kernels


@triton.jit
def attend_rows(acc, l_i, m_i, q, k, v, qk_scale, keep_row):
    """``_common.attend_tile`` for a full tile that only some rows kept (keep_row [BLOCK_M]
    bool): the others keep their state. Their scores may overflow in exp2; the select drops
    them, and their alpha is 1 even while their max is still -inf."""
    # [BLOCK_M, BLOCK_N]
    qk = tl.dot(q, k)
    m_new = tl.where(keep_row, tl.maximum(m_i, tl.max(qk, 1) * qk_scale), m_i)
    p = tl.where(keep_row[:, None], tl.math.exp2(qk * qk_scale - m_new[:, None]), 0.0)
    alpha = tl.where(keep_row, tl.math.exp2(m_i - m_new), 1.0)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
    return acc, l_i, m_new


@triton.jit
def kv_descriptors(k_base, v_base, seq_len, stride_ks, HEAD_DIM: tl.constexpr,
                   BLOCK: tl.constexpr):  # fmt: skip
    """TMA descriptors of one key/value head's K and V ([seq_len, HEAD_DIM] each, tiles of
    BLOCK rows; rows past seq_len read as zeros)."""
    k_desc = tl.make_tensor_descriptor(k_base, [seq_len, HEAD_DIM], [stride_ks, 1],
                                       [BLOCK, HEAD_DIM])  # fmt: skip
    v_desc = tl.make_tensor_descriptor(v_base, [seq_len, HEAD_DIM], [stride_ks, 1],
                                       [BLOCK, HEAD_DIM])  # fmt: skip
    return k_desc, v_desc


@triton.jit
def load_listed_tile(k_base, v_base, k_desc, v_desc, block, offs_n, offs_d, stride_ks,
                     BLOCK: tl.constexpr, USE_TMA: tl.constexpr):  # fmt: skip
    """Key/value tile ``block`` (a list entry): k [HEAD_DIM, BLOCK], v [BLOCK, HEAD_DIM],
    through TMA or through pointers."""
    if USE_TMA:
        k, v = k_desc.load([block * BLOCK, 0]).T, v_desc.load([block * BLOCK, 0])
    else:
        cols = block.to(tl.int64) * BLOCK + offs_n
        k, v = load_kv_tile(k_base, v_base, cols, offs_d, stride_ks, stride_ks)
    return k, v


@triton.jit
def _wide_fwd(
    Q, K, V, Out, BlockIdx, BlockCount,
    stride_qh, stride_qs, stride_kh, stride_ks, stride_ih, stride_im, stride_ch,
    num_q_heads, kv_group, seq_len, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """Two list entries per step: one [BLOCK, 2·BLOCK] score tile gathered from two blocks."""
    block_m, _, head, kv_head = program_coordinates(num_q_heads, kv_group)
    k_base = K + kv_head * stride_kh
    v_base = V + kv_head * stride_kh
    q, offs_m, row_valid, acc, l_i, m_i = start_query_block(
        Q + head * stride_qh, block_m, stride_qs, 0, seq_len, HEAD_DIM, BLOCK
    )
    offs_n = tl.arange(0, BLOCK)
    offs_w = tl.arange(0, 2 * BLOCK)
    offs_d = tl.arange(0, HEAD_DIM)

    idx_base = BlockIdx + head * stride_ih + block_m * stride_im
    count = tl.load(BlockCount + head * stride_ch + block_m)
    for t in range(0, count // 2):
        first = tl.load(idx_base + 2 * t).to(tl.int64) * BLOCK
        second = tl.load(idx_base + 2 * t + 1).to(tl.int64) * BLOCK - BLOCK
        # [2·BLOCK]: the first block's columns, then the second's
        cols = tl.where(offs_w < BLOCK, first, second) + offs_w
        k, v = load_kv_tile(k_base, v_base, cols, offs_d, stride_ks, stride_ks)
        acc, l_i, m_i = attend_tile(acc, l_i, m_i, q, k, v, qk_scale, None)
    if count % 2 == 1:
        cols = tl.load(idx_base + count - 1).to(tl.int64) * BLOCK + offs_n
        k, v = load_kv_tile(k_base, v_base, cols, offs_d, stride_ks, stride_ks)
        acc, l_i, m_i = attend_tile(acc, l_i, m_i, q, k, v, qk_scale, None)

    k, v, keep = load_diagonal_tile(
        k_base, v_base, offs_m, block_m * BLOCK + offs_n, offs_d, stride_ks, stride_ks, seq_len
    )
    acc, l_i, m_i = attend_tile(acc, l_i, m_i, q, k, v, qk_scale, keep)
    store_query_block(Out + head * stride_qh, offs_m, row_valid, acc, l_i, stride_qs, HEAD_DIM)


@triton.jit
def _pair_fwd(
    Q, K, V, Out, PairIdx, PairCount,
    stride_qh, stride_qs, stride_kh, stride_ks, stride_ih, stride_im, stride_ch,
    num_q_heads, kv_group, seq_len, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, USE_TMA: tl.constexpr,
):  # fmt: skip
    """128 query rows (block rows 2p and 2p + 1) over the union of their kept tiles."""
    pair, _, head, kv_head = program_coordinates(num_q_heads, kv_group)
    k_base = K + kv_head * stride_kh
    v_base = V + kv_head * stride_kh
    # [2·BLOCK] rows: the upper block row, then the lower one
    q, offs_m, row_valid, acc, l_i, m_i = start_query_block(
        Q + head * stride_qh, pair, stride_qs, 0, seq_len, HEAD_DIM, 2 * BLOCK
    )
    lower = tl.arange(0, 2 * BLOCK) >= BLOCK
    offs_n = tl.arange(0, BLOCK)
    offs_d = tl.arange(0, HEAD_DIM)
    k_desc, v_desc = None, None
    if USE_TMA:
        k_desc, v_desc = kv_descriptors(k_base, v_base, seq_len, stride_ks, HEAD_DIM, BLOCK)

    idx_base = PairIdx + head * stride_ih + pair * stride_im
    count = tl.load(PairCount + head * stride_ch + pair)
    for t in range(0, count):
        entry = tl.load(idx_base + t)
        keep_row = tl.where(lower, entry & 2, entry & 1) != 0
        k, v = load_listed_tile(k_base, v_base, k_desc, v_desc, entry >> 2, offs_n, offs_d,
                                stride_ks, BLOCK, USE_TMA)  # fmt: skip
        acc, l_i, m_i = attend_rows(acc, l_i, m_i, q, k, v, qk_scale, keep_row)

    # Both diagonal tiles in one [2·BLOCK, 2·BLOCK] tile: each row sees its own block only.
    cols = pair * 2 * BLOCK + tl.arange(0, 2 * BLOCK)
    k, v, keep = load_diagonal_tile(k_base, v_base, offs_m, cols, offs_d, stride_ks, stride_ks,
                                    seq_len)  # fmt: skip
    keep &= (offs_m[:, None] // BLOCK) == (cols[None, :] // BLOCK)
    acc, l_i, m_i = attend_tile(acc, l_i, m_i, q, k, v, qk_scale, keep)
    store_query_block(Out + head * stride_qh, offs_m, row_valid, acc, l_i, stride_qs, HEAD_DIM)


# ---------------------------------------------------------------------------------------------
# Launchers: batch 1, whole prompts, contiguous tensors (what the benchmark feeds them).


def pair_union_lists(indices: torch.Tensor, counts: torch.Tensor, nb: int):
    """Per pair of block rows (2p, 2p + 1), the union of their lists in ascending order, each
    entry ``column·4 + flags`` (1: row 2p keeps it, 2: row 2p + 1). An odd last row pairs with
    an empty one. Returns (lists [b, H, np, w] int32, counts [b, H, np] int32)."""
    b, h, nq, width = indices.shape
    valid = torch.arange(width, device=indices.device) < counts[..., None]
    columns = torch.where(valid, indices, nb).long()  # dropped slots land on a spare column
    npairs = (nq + 1) // 2
    flags = torch.zeros(b, h, 2 * npairs, nb + 1, dtype=torch.int32, device=indices.device)
    flags[:, :, :nq].scatter_(-1, columns, 1)
    flags = flags.view(b, h, npairs, 2, nb + 1)
    flags = flags[..., 0, :nb] | (flags[..., 1, :nb] << 1)
    entries = torch.arange(nb, dtype=torch.int32, device=indices.device) * 4 + flags
    kept = flags != 0
    pair_counts = kept.sum(-1, dtype=torch.int32)
    pair_width = max(int(pair_counts.max()), 1)
    entries = torch.where(kept, entries, torch.iinfo(torch.int32).max)
    return entries.sort(-1).values[..., :pair_width].contiguous(), pair_counts


@dataclass
class Variant:
    """One kernel at one fixed launch configuration."""

    name: str
    kernel: object
    num_warps: int
    num_stages: int
    constexprs: dict = field(default_factory=dict)
    pairs: bool = False  # takes the union lists of row pairs

    @property
    def label(self) -> str:
        return f"{self.name} w{self.num_warps}s{self.num_stages}"

    def __call__(self, q, k, v, indices, counts) -> torch.Tensor:
        out = torch.empty_like(q)
        hq, s, d = q.shape[1:]
        rows = num_blocks(s)
        if self.pairs:
            rows = (rows + 1) // 2
        self.kernel[(rows, hq)](
            q, k, v, out, indices, counts,
            q.stride(1), q.stride(2), k.stride(1), k.stride(2),
            indices.stride(1), indices.stride(2), counts.stride(1),
            hq, hq // k.shape[1], s, LOG2_E / math.sqrt(d),
            HEAD_DIM=d, BLOCK=BLOCK, **self.constexprs,
            **({} if interpreting() else {"num_warps": self.num_warps,
                                          "num_stages": self.num_stages}),
        )  # fmt: skip
        return out


def pair(warps, stages, tma=False):
    name = "pair128+tma" if tma else "pair128"
    return Variant(name, _pair_fwd, warps, stages, dict(USE_TMA=tma), pairs=True)


VARIANTS = [
    Variant("wide", _wide_fwd, 4, 2), Variant("wide", _wide_fwd, 8, 2),
    Variant("wide", _wide_fwd, 8, 3),
    pair(8, 2), pair(8, 3), pair(8, 3, tma=True), pair(8, 4, tma=True),
]  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Inputs and block lists


def synthetic_qkv(length: int, hq: int, hkv: int, d: int, source: str, dtype, device, seed=0):
    """q [1, hq, s, d], k/v [1, hkv, s, d]. ``stripes``: every key block of a key/value head
    leans by a random salience along one direction of that head, which its queries share, so
    all rows of a head favour the same blocks (plus per-row noise); ``iid``: Gaussian."""
    gen = torch.Generator(device=device).manual_seed(seed)
    randn = partial(torch.randn, generator=gen, device=device, dtype=torch.float32)
    q, k, v = randn(1, hq, length, d), randn(1, hkv, length, d), randn(1, hkv, length, d)
    if source == "stripes":
        direction = torch.nn.functional.normalize(randn(1, hkv, 1, d), dim=-1)
        salience = randn(1, hkv, num_blocks(length), 1).repeat_interleave(BLOCK, 2)[:, :, :length]
        k += 2.0 * salience * direction
        q += 2.0 * direction.repeat_interleave(hq // hkv, 1)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def kept_lists(q, k, sparsity: float):
    """The project's top-k selection on pooled q·k scores: the kernel's (indices, counts)."""
    return pooled_block_lists(q, k, MaskPolicy(sparsity=sparsity))


def shuffled(indices, counts, seed=0):
    """The same lists in a random order (the kernels must accept any order)."""
    gen = torch.Generator(device=indices.device).manual_seed(seed)
    valid = torch.arange(indices.shape[-1], device=indices.device) < counts[..., None]
    keys = torch.rand(indices.shape, generator=gen, device=indices.device).masked_fill(~valid, 2)
    return indices.gather(-1, keys.argsort(-1)).contiguous()


def lists_to_mask(indices, counts, nb: int) -> torch.Tensor:
    """[b, H, nq, nb] bool mask of the lists plus the diagonal, for the reference."""
    valid = torch.arange(indices.shape[-1], device=indices.device) < counts[..., None]
    mask = torch.zeros(*indices.shape[:-1], nb + 1, dtype=torch.bool, device=indices.device)
    mask.scatter_(-1, torch.where(valid, indices, nb).long(), True)
    rows = torch.arange(nb, device=indices.device)
    mask[..., rows, rows] = True
    return mask[..., :nb]


def row_overlap(indices, counts, nb: int) -> float:
    """Union size of adjacent row pairs over the sum of their list lengths: 0.5 means the two
    rows keep the same tiles, 1.0 that they share none (what ``pair128`` pays for)."""
    _, pair_counts = pair_union_lists(indices, counts, nb)
    return float(pair_counts.sum()) / max(float(counts.sum()), 1.0)


# ---------------------------------------------------------------------------------------------
# Checks and timing


def relative_error(out, gold) -> float:
    return float((out.float() - gold).norm() / gold.norm())


def run_variant(variant: Variant, q, k, v, indices, counts, nb: int):
    if variant.pairs:
        return variant(q, k, v, *pair_union_lists(indices, counts, nb))
    return variant(q, k, v, indices, counts)


def check(dtype, device, length=1000, hq=8, hkv=2, d=64) -> dict[str, str]:
    """Each variant against the current kernel and the fp32 reference on an awkward shape (a
    partial last block, an odd number of block rows, GQA 4), the lists in a random order.
    Returns {variant label: failure}; a variant passes when its error against the reference
    is at most twice the current kernel's (plus a little)."""
    q, k, v = synthetic_qkv(length, hq, hkv, d, "stripes", dtype, device, seed=1)
    nb = num_blocks(length)
    indices, counts = kept_lists(q, k, 0.5)
    indices = shuffled(indices, counts)
    gold = block_sparse_attention_reference(
        q.float(), k.float(), v.float(), lists_to_mask(indices, counts, nb)
    )
    current = block_sparse_attention_from_lists(q, k, v, indices, counts)
    bound = 2 * relative_error(current, gold) + 1e-6
    failures = {}
    # The interpreter ignores launch configurations: one run per kernel variant is enough.
    variants = {v.name: v for v in VARIANTS}.values() if interpreting() else VARIANTS
    for variant in variants:
        try:
            out = run_variant(variant, q, k, v, indices, counts, nb)
            err, err_current = relative_error(out, gold), relative_error(out, current.float())
            if not (err <= bound):
                failures[variant.label] = (
                    f"wrong: rel. err {err:.1e} vs reference (bound {bound:.1e})"
                )
            print(f"check {variant.label} {dtype}: vs reference {err:.1e}, vs current "
                  f"{err_current:.1e}", file=sys.stderr)  # fmt: skip
        except Exception as error:  # noqa: BLE001 — a broken variant becomes a table row
            failures[variant.label] = f"failed: {type(error).__name__}: {str(error)[:120]}"
            print(f"check {variant.label}: {failures[variant.label]}", file=sys.stderr)
    return failures


def median_ms(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")


def time_setting(length: int, sparsity: float, source: str, failures: dict) -> list[str]:
    """Table rows of one (length, sparsity, list source): the current kernel, then each
    variant (a failed one says why)."""
    device = torch.device("cuda")
    q, k, v = synthetic_qkv(length, Q_HEADS, KV_HEADS, HEAD_DIM, source, torch.bfloat16, device)
    nb = num_blocks(length)
    indices, counts = kept_lists(q, k, sparsity)
    kept_tiles = int(counts.sum()) + counts.numel()
    achieved = 1 - kept_tiles / (counts.numel() * (nb + 1) / 2)
    overlap = row_overlap(indices, counts, nb)
    setting = f"| {length} | {sparsity:.2f} ({achieved:.3f}) | {source} ({overlap:.2f})"
    tflops = lambda ms: kept_tiles * 4 * BLOCK * BLOCK * HEAD_DIM / (ms * 1e-3) / 1e12
    base = median_ms(partial(block_sparse_attention_from_lists, q, k, v, indices, counts))
    rows = [f"{setting} | current (tuned) | {base:.2f} | {tflops(base):.0f} | 1.00 |"]
    print(rows[-1], file=sys.stderr, flush=True)
    pairs = pair_union_lists(indices, counts, nb)
    prep = median_ms(partial(pair_union_lists, indices, counts, nb))
    rows.append(f"{setting} | pair128 prep (PyTorch) | {prep:.2f} | - | - |")
    for variant in VARIANTS:
        if variant.label in failures:
            rows.append(f"{setting} | {variant.label} | {failures[variant.label]} | - | - |")
            continue
        lists = pairs if variant.pairs else (indices, counts)
        try:
            ms = median_ms(partial(variant, q, k, v, *lists))
        except Exception as error:  # noqa: BLE001
            failures[variant.label] = f"failed: {type(error).__name__}: {str(error)[:120]}"
            rows.append(f"{setting} | {variant.label} | {failures[variant.label]} | - | - |")
            continue
        rows.append(f"{setting} | {variant.label} | {ms:.2f} | {tflops(ms):.0f} | "
                    f"{base / ms:.2f} |")  # fmt: skip
        print(rows[-1], file=sys.stderr, flush=True)
    del q, k, v, indices, counts, pairs
    torch.cuda.empty_cache()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="correctness checks only (CPU: needs TRITON_INTERPRET=1)")  # fmt: skip
    args = parser.parse_args()
    # pair128+tma makes tensor descriptors in the kernel, which needs the scratch allocator the
    # library sets at its own first such launch (the interpreter needs none).
    _set_scratch_allocator()
    if args.check:
        if not interpreting() and not torch.cuda.is_available():
            raise SystemExit("--check needs a GPU or TRITON_INTERPRET=1.")
        device = torch.device("cpu" if interpreting() else "cuda")
        dtypes = (torch.float32, torch.float16) if interpreting() else (torch.bfloat16,)
        failures = {}
        for dtype in dtypes:
            failures.update(check(dtype, device))
        print("all variants pass" if not failures else f"failures: {failures}")
        raise SystemExit(1 if failures else 0)
    if not torch.cuda.is_available() or interpreting():
        raise SystemExit("timing needs a CUDA GPU (use --check under TRITON_INTERPRET=1).")
    device = torch.device("cuda")
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton "
          f"{triton.__version__}", flush=True)  # fmt: skip
    failures = check(torch.bfloat16, device, length=4097, hq=8, hkv=2, d=128)
    lines = [
        "| length | sparsity (achieved) | lists (pair union / sum) | variant | ms "
        "| TFLOP/s (kept tiles) | × current |",
        "|---|---|---|---|---|---|---|",
    ]
    for setting in TIMED:
        lines += time_setting(*setting, failures)
    print("\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
