"""Triton kernels against their PyTorch references and a dense float64 oracle.

The same file runs on the CPU (under TRITON_INTERPRET=1, float32/float16) and on a GPU
(float16/bfloat16, plus long sequences).
"""

import math

import pytest
import torch
import torch.nn.functional as F
import triton
from conftest import KERNEL_DEVICE, KERNEL_DTYPES, needs_gpu, needs_kernel_device
from seer_kernels import (
    BLOCK,
    block_sparse_attention,
    block_sparse_attention_from_lists,
    block_sparse_attention_reference,
    can_compile_ahead,
    compiling_ahead,
    kept_block_indices,
    num_blocks,
    pooled_attention,
    pooled_attention_reference,
)

# (seq_len, q_heads, kv_heads, head_dim): lengths around block edges, GQA ratios 1, 3 and 4.
SHAPES = [
    (1, 2, 2, 64),
    (63, 3, 1, 64),
    (65, 4, 1, 64),
    (200, 6, 2, 128),
    (1000, 4, 4, 64),
]
MASKS = ["random", "diagonal", "full"]


def shape_id(shape) -> str:
    s, hq, hkv, d = shape
    return f"s{s}-hq{hq}-hkv{hkv}-d{d}"


def random_qkv(shape, dtype, device, batch=2, seed=0):
    s, hq, hkv, d = shape
    gen = torch.Generator(device="cpu").manual_seed(seed)
    q = torch.randn(batch, hq, s, d, generator=gen)
    k = torch.randn(batch, hkv, s, d, generator=gen)
    v = torch.randn(batch, hkv, s, d, generator=gen)
    return [x.to(device=device, dtype=dtype) for x in (q, k, v)]


def make_mask(kind, batch, heads, seq_len, device, seed=0):
    nb = num_blocks(seq_len)
    if kind == "full":
        return torch.ones(batch, heads, nb, nb, dtype=torch.bool, device=device)
    if kind == "diagonal":
        return torch.eye(nb, dtype=torch.bool, device=device).expand(batch, heads, nb, nb).clone()
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return (torch.rand(batch, heads, nb, nb, generator=gen) < 0.4).to(device)


def oracle_probs(q, k, block_mask=None):
    """Dense float64 causal attention probabilities [b, Hq, s, s], optionally block-masked."""
    b, hq, s, d = q.shape
    group = hq // k.shape[1]
    k = k.double().repeat_interleave(group, dim=1)
    scores = (q.double() @ k.transpose(-1, -2)) / math.sqrt(d)
    allowed = torch.ones(s, s, dtype=torch.bool, device=q.device).tril()
    if block_mask is not None:
        nb = num_blocks(s)
        kept = block_mask | torch.eye(nb, dtype=torch.bool, device=q.device)
        tokens = kept.repeat_interleave(BLOCK, -1).repeat_interleave(BLOCK, -2)[..., :s, :s]
        allowed = allowed & tokens
    return torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)


def oracle_attention(q, k, v, block_mask=None):
    group = q.shape[1] // k.shape[1]
    return oracle_probs(q, k, block_mask) @ v.double().repeat_interleave(group, dim=1)


def oracle_pooled_map(q, k):
    probs = oracle_probs(q, k)
    b, hq, s, _ = probs.shape
    nb = num_blocks(s)
    padded = probs.new_zeros(b, hq, nb * BLOCK, nb * BLOCK)
    padded[:, :, :s, :s] = probs
    peak = padded.view(b, hq, nb, BLOCK, nb, BLOCK).amax(dim=(3, 5))
    return peak / peak.sum(-1, keepdim=True)


def rel_error(x, ref):
    return ((x.double() - ref).norm() / ref.norm()).item()


def assert_close_to_oracle(kernel_out, same_precision_out, oracle):
    """The kernel's error may be at most ~2× what PyTorch makes in the same precision."""
    assert not torch.isnan(kernel_out).any(), "output has NaN (an element was never written?)"
    torch_err = rel_error(same_precision_out, oracle)
    kernel_err = rel_error(kernel_out, oracle)
    assert kernel_err <= 2 * torch_err + 1e-5, f"kernel {kernel_err:.2e} vs torch {torch_err:.2e}"


# --- references against the float64 oracle (always run, any machine) ---


@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_block_sparse_reference_matches_oracle(shape, mask_kind):
    q, k, v = random_qkv(shape, torch.float64, "cpu")
    mask = make_mask(mask_kind, 2, shape[1], shape[0], "cpu")
    out = block_sparse_attention_reference(q, k, v, mask)
    torch.testing.assert_close(out, oracle_attention(q, k, v, mask), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_pooled_reference_matches_oracle(shape):
    q, k, v = random_qkv(shape, torch.float64, "cpu", seed=1)
    out, gt = pooled_attention_reference(q, k, v)
    torch.testing.assert_close(out, oracle_attention(q, k, v), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(gt.double(), oracle_pooled_map(q, k), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gt.sum(-1), torch.ones_like(gt.sum(-1)))


def test_reference_chunking_gives_the_same_result(monkeypatch):
    """Forcing one query block per chunk must not change the references' results."""
    import seer_kernels.reference as reference

    q, k, v = random_qkv((300, 4, 2, 64), torch.float64, "cpu", seed=2)
    mask = make_mask("random", 2, 4, 300, "cpu", seed=2)
    whole = block_sparse_attention_reference(q, k, v, mask)
    whole_out, whole_gt = pooled_attention_reference(q, k, v)
    monkeypatch.setattr(reference, "_CHUNK_ELEMENTS", 1)
    torch.testing.assert_close(block_sparse_attention_reference(q, k, v, mask), whole)
    chunked_out, chunked_gt = pooled_attention_reference(q, k, v)
    torch.testing.assert_close(chunked_out, whole_out)
    torch.testing.assert_close(chunked_gt, whole_gt)


# --- Triton kernels (interpreter on CPU, or a GPU) ---


@needs_kernel_device
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_block_sparse_kernel(shape, mask_kind, dtype, poisoned_empty):
    q, k, v = random_qkv(shape, dtype, KERNEL_DEVICE, seed=3)
    mask = make_mask(mask_kind, 2, shape[1], shape[0], KERNEL_DEVICE, seed=3)
    out = block_sparse_attention(q, k, v, mask)
    assert out.shape == q.shape and out.dtype == dtype
    same_precision = block_sparse_attention_reference(q, k, v, mask)
    assert_close_to_oracle(out, same_precision, oracle_attention(q, k, v, mask))


@needs_kernel_device
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_full_mask_equals_sdpa(shape, dtype):
    q, k, v = random_qkv(shape, dtype, KERNEL_DEVICE, seed=4)
    mask = make_mask("full", 2, shape[1], shape[0], KERNEL_DEVICE)
    group = shape[1] // shape[2]
    sdpa = F.scaled_dot_product_attention(
        q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1), is_causal=True
    )
    assert_close_to_oracle(block_sparse_attention(q, k, v, mask), sdpa, oracle_attention(q, k, v))


@needs_kernel_device
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_pooled_kernel(shape, dtype, poisoned_empty):
    q, k, v = random_qkv(shape, dtype, KERNEL_DEVICE, seed=5)
    out, gt = pooled_attention(q, k, v)
    ref_out, ref_gt = pooled_attention_reference(q, k, v)
    assert_close_to_oracle(out, ref_out, oracle_attention(q, k, v))
    oracle_gt = oracle_pooled_map(q, k)
    assert gt.shape == oracle_gt.shape and gt.dtype == torch.float32
    assert_close_to_oracle(gt, ref_gt, oracle_gt)
    assert torch.all(gt.triu(1) == 0)


@needs_kernel_device
def test_custom_scale_and_strided_inputs():
    """A non-default scale and non-contiguous (transposed) inputs give the reference's result."""
    b, s, hq, hkv, d = 1, 130, 4, 2, 64
    gen = torch.Generator().manual_seed(6)
    q = torch.randn(b, s, hq, d, generator=gen).to(KERNEL_DEVICE, KERNEL_DTYPES[0]).transpose(1, 2)
    k = torch.randn(b, s, hkv, d, generator=gen).to(KERNEL_DEVICE, KERNEL_DTYPES[0]).transpose(1, 2)
    v = torch.randn(b, s, hkv, d, generator=gen).to(KERNEL_DEVICE, KERNEL_DTYPES[0]).transpose(1, 2)
    mask = make_mask("random", b, hq, s, KERNEL_DEVICE, seed=6)
    out = block_sparse_attention(q, k, v, mask, sm_scale=0.05)
    ref = block_sparse_attention_reference(q, k, v, mask, sm_scale=0.05)
    torch.testing.assert_close(out, ref, rtol=2e-3, atol=2e-3)
    out_p, gt = pooled_attention(q, k, v, sm_scale=0.05)
    ref_p, ref_gt = pooled_attention_reference(q, k, v, sm_scale=0.05)
    torch.testing.assert_close(out_p, ref_p, rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(gt, ref_gt, rtol=2e-3, atol=2e-3)


@needs_kernel_device
@pytest.mark.parametrize("padded", ["k", "v"])
def test_unaligned_kv_rows_give_the_reference_result(padded, poisoned_empty):
    """K or V rows that are not 16-byte aligned (no tensor descriptor can address them) take the
    pointer loads, with the same result as aligned copies of the same inputs."""
    shape = (200, 8, 2, 64)
    q, k, v = random_qkv(shape, KERNEL_DTYPES[0], KERNEL_DEVICE, seed=9)
    unaligned = {"k": k, "v": v}
    # Rows of 65 elements: the row stride is 130 or 260 bytes.
    unaligned[padded] = F.pad(unaligned[padded], (0, 1))[..., :64]
    mask = make_mask("random", 2, 8, 200, KERNEL_DEVICE, seed=9)
    out = block_sparse_attention(q, unaligned["k"], unaligned["v"], mask)
    torch.testing.assert_close(out, block_sparse_attention(q, k, v, mask), rtol=1e-3, atol=1e-3)
    ref = block_sparse_attention_reference(q, k, v, mask)
    torch.testing.assert_close(out, ref, rtol=2e-3, atol=2e-3)


@needs_kernel_device
def test_block_lists_in_any_order_give_the_mask_result(poisoned_empty):
    """Per-row lists (here reversed, with junk past each count) equal the mask they describe."""
    shape = (300, 4, 2, 64)
    q, k, v = random_qkv(shape, KERNEL_DTYPES[0], KERNEL_DEVICE, seed=8)
    mask = make_mask("random", 2, 4, 300, KERNEL_DEVICE, seed=8)
    indices, counts = kept_block_indices(mask)
    width = indices.shape[-1]
    slots = torch.arange(width, device=KERNEL_DEVICE)
    # Reverse each row's valid prefix and fill the unused tail with an out-of-range block.
    reversed_slots = torch.where(slots < counts[..., None], counts[..., None] - 1 - slots, slots)
    shuffled = indices.gather(-1, reversed_slots.long())
    shuffled = torch.where(slots < counts[..., None], shuffled, 10_000).to(torch.int32)
    out = block_sparse_attention_from_lists(q, k, v, shuffled, counts)
    torch.testing.assert_close(out, block_sparse_attention(q, k, v, mask), rtol=1e-3, atol=1e-3)


@needs_kernel_device
@pytest.mark.parametrize("split_entries", [1, 3])
@pytest.mark.parametrize("mask_kind", ["random", "full"])
@pytest.mark.parametrize("shape", [(1000, 4, 4, 64), (700, 6, 2, 128)], ids=shape_id)
def test_last_row_split_over_programs(shape, mask_kind, split_entries, poisoned_empty, monkeypatch):
    """The last query row walked in shares of a few entries by several programs, then merged,
    gives the reference's result, for a whole prompt and for a chunk that continues a cache."""
    import seer_kernels.block_sparse as block_sparse

    q, k, v = random_qkv(shape, KERNEL_DTYPES[0], KERNEL_DEVICE, seed=10)
    mask = make_mask(mask_kind, 2, shape[1], shape[0], KERNEL_DEVICE, seed=10)
    whole = block_sparse_attention(q, k, v, mask)
    # The last 300 queries: the chunk starts inside a block.
    q_chunk = q[:, :, -300:]
    chunk_rows = num_blocks(shape[0]) - (shape[0] - 300) // BLOCK
    chunk = block_sparse_attention(q_chunk, k, v, mask[:, :, -chunk_rows:])
    monkeypatch.setattr(block_sparse, "LAST_ROW_SPLIT_ENTRIES", split_entries)
    monkeypatch.setattr(block_sparse, "LAST_ROW_SPLIT_HEAD_DIMS", (64, 128))
    assert block_sparse.last_row_splits(shape[0], shape[3]) > 1
    out = block_sparse_attention(q, k, v, mask)
    same_precision = block_sparse_attention_reference(q, k, v, mask)
    assert_close_to_oracle(out, same_precision, oracle_attention(q, k, v, mask))
    torch.testing.assert_close(out, whole, rtol=1e-3, atol=1e-3)
    split_chunk = block_sparse_attention(q_chunk, k, v, mask[:, :, -chunk_rows:])
    torch.testing.assert_close(split_chunk, chunk, rtol=1e-3, atol=1e-3)


@needs_gpu
def test_compiling_ahead_compiles_without_running(poisoned_empty, monkeypatch):
    """Inside ``compiling_ahead`` a launch leaves its output unwritten; the real launch after it
    runs the kernel compiled and loaded there."""
    assert can_compile_ahead(torch.device("cuda"))
    q, k, v = random_qkv((777, 4, 2, 64), torch.bfloat16, "cuda", seed=9)
    mask = make_mask("random", 2, 4, 777, "cuda", seed=9)
    indices, counts = kept_block_indices(mask)
    with compiling_ahead():
        dry = block_sparse_attention_from_lists(q, k, v, indices, counts)
    torch.cuda.synchronize()
    assert bool(dry.isnan().all())
    loads = []
    monkeypatch.setattr(triton.knobs.runtime, "kernel_load_start_hook",
                        lambda *args: loads.append(args))  # fmt: skip
    out = block_sparse_attention_from_lists(q, k, v, indices, counts)
    assert not loads
    same_precision = block_sparse_attention_reference(q, k, v, mask)
    assert_close_to_oracle(out, same_precision, oracle_attention(q, k, v, mask))


def test_compiling_ahead_needs_a_gpu():
    assert not can_compile_ahead(torch.device("cpu"))


def test_block_lists_are_checked():
    q, k, v = random_qkv((70, 4, 2, 64), torch.float32, "cpu")
    counts = torch.zeros(2, 4, 2, dtype=torch.int32)
    with pytest.raises(ValueError, match="int32"):
        block_sparse_attention_from_lists(q, k, v, torch.zeros(2, 4, 2, 1), counts)
    with pytest.raises(ValueError, match="indices must be shaped"):
        block_sparse_attention_from_lists(q, k, v, torch.zeros(2, 4, 3, 1).int(), counts)


# --- input validation ---


def _valid_inputs():
    q, k, v = random_qkv((70, 4, 2, 64), torch.float32, "cpu")
    return q, k, v, make_mask("full", 2, 4, 70, "cpu")


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda q, k, v, m: (q[0], k, v, m), "4-D"),
        (lambda q, k, v, m: (q, k, v[:, :, :10], m), "same shape"),
        (lambda q, k, v, m: (q, k[:, :, :10], v[:, :, :10], m), "does not match"),
        (lambda q, k, v, m: (q[:, :3], k, v, m), "not a multiple"),
        (lambda q, k, v, m: (q, k.double(), v, m), "one dtype"),
        (lambda q, k, v, m: (q, k, v, m.float()), "bool"),
        (lambda q, k, v, m: (q, k, v, m[:, :, :1]), "block_mask must be shaped"),
    ],
    ids=["not-4d", "kv-shape", "kv-length", "gqa-ratio", "dtype", "mask-dtype", "mask-shape"],
)
def test_bad_inputs_raise_value_error(change, message):
    args = change(*_valid_inputs())
    with pytest.raises(ValueError, match=message):
        block_sparse_attention_reference(*args)


@pytest.mark.parametrize("scale", [0.0, -0.1])
def test_scale_must_be_positive(scale):
    q, k, v, mask = _valid_inputs()
    with pytest.raises(ValueError, match="sm_scale must be positive"):
        block_sparse_attention_reference(q, k, v, mask, sm_scale=scale)


def test_kernel_rejects_unsupported_head_dim():
    q, k, v = random_qkv((10, 2, 2, 32), torch.float32, "cpu")
    with pytest.raises(ValueError, match="head_dim 32"):
        pooled_attention(q, k, v)


@pytest.mark.skipif(KERNEL_DEVICE is not None, reason="only without a GPU or the interpreter")
def test_kernel_without_gpu_says_what_to_do():
    q, k, v, mask = _valid_inputs()
    with pytest.raises(ValueError, match="reference"):
        block_sparse_attention(q, k, v, mask)


# --- long sequences on a GPU ---


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("seq_len", [4097, 16384, 32768])
def test_long_sequences_on_gpu(seq_len, dtype):
    shape = (seq_len, 8, 2, 128)
    q, k, v = random_qkv(shape, dtype, "cuda", batch=1, seed=7)
    mask = make_mask("random", 1, 8, seq_len, "cuda", seed=7)
    # float32 reference of the same inputs stands in for the oracle at this length.
    gold = block_sparse_attention_reference(q.float(), k.float(), v.float(), mask).double()
    same_precision = block_sparse_attention_reference(q, k, v, mask)
    assert_close_to_oracle(block_sparse_attention(q, k, v, mask), same_precision, gold)
    if seq_len <= 16384:
        out, gt = pooled_attention(q, k, v)
        gold_out, gold_gt = pooled_attention_reference(q.float(), k.float(), v.float())
        ref_out, ref_gt = pooled_attention_reference(q, k, v)
        assert_close_to_oracle(out, ref_out, gold_out.double())
        assert_close_to_oracle(gt, ref_gt, gold_gt.double())
