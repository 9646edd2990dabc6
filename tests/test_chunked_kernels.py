"""Block-sparse attention of queries that are the last rows of the keys: a prompt prefilled in
chunks, or a prompt continuing a cache. Each chunk must give the rows the whole prompt gives.

Runs on the CPU (references always; the Triton kernel under TRITON_INTERPRET=1) and on a GPU.
"""

import pytest
import torch
from conftest import KERNEL_DEVICE, KERNEL_DTYPES, needs_kernel_device
from seer_kernels import (
    block_sparse_attention,
    block_sparse_attention_from_lists,
    block_sparse_attention_reference,
    kept_block_indices,
    num_blocks,
)
from test_kernels import assert_close_to_oracle, make_mask, oracle_attention, random_qkv

# (seq_len, chunk, q_heads, kv_heads, head_dim): chunks aligned to blocks and not (a chunk that
# starts inside a block makes a partial first query block), a last chunk of one token.
CHUNKINGS = [
    (1, 1, 2, 2, 64),
    (65, 64, 4, 1, 64),
    (200, 100, 6, 2, 128),
    (130, 63, 3, 1, 64),
    (1000, 300, 4, 4, 64),
]


def chunking_id(case) -> str:
    s, chunk, hq, hkv, d = case
    return f"s{s}-chunk{chunk}-hq{hq}-hkv{hkv}-d{d}"


def chunks(seq_len: int, chunk: int):
    """(start, end) of consecutive chunks covering seq_len tokens."""
    return [(start, min(start + chunk, seq_len)) for start in range(0, seq_len, chunk)]


def chunk_mask(mask: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """The rows of a whole prompt's block mask that the chunk [start, end) computes, over the
    key blocks seen so far."""
    return mask[:, :, start // 64 : num_blocks(end), : num_blocks(end)].contiguous()


def run_in_chunks(attention, q, k, v, mask, chunk: int) -> torch.Tensor:
    s = q.shape[2]
    parts = [
        attention(q[:, :, a:b].contiguous(), k[:, :, :b], v[:, :, :b], chunk_mask(mask, a, b))
        for a, b in chunks(s, chunk)
    ]
    return torch.cat(parts, dim=2)


@pytest.mark.parametrize("mask_kind", ["random", "full"])
@pytest.mark.parametrize("case", CHUNKINGS, ids=chunking_id)
def test_reference_in_chunks_equals_whole_prompt(case, mask_kind):
    s, chunk, hq, hkv, d = case
    q, k, v = random_qkv((s, hq, hkv, d), torch.float64, "cpu", seed=11)
    mask = make_mask(mask_kind, 2, hq, s, "cpu", seed=11)
    whole = block_sparse_attention_reference(q, k, v, mask)
    chunked = run_in_chunks(block_sparse_attention_reference, q, k, v, mask, chunk)
    torch.testing.assert_close(chunked, whole, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(chunked, oracle_attention(q, k, v, mask), rtol=1e-9, atol=1e-9)


@needs_kernel_device
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("mask_kind", ["random", "full"])
@pytest.mark.parametrize("case", CHUNKINGS, ids=chunking_id)
def test_kernel_in_chunks_equals_whole_prompt(case, mask_kind, dtype, poisoned_empty):
    """Every block kept gives dense attention; chunked gives the unchunked rows."""
    s, chunk, hq, hkv, d = case
    q, k, v = random_qkv((s, hq, hkv, d), dtype, KERNEL_DEVICE, batch=1, seed=12)
    mask = make_mask(mask_kind, 1, hq, s, KERNEL_DEVICE, seed=12)
    chunked = run_in_chunks(block_sparse_attention, q, k, v, mask, chunk)
    assert chunked.shape == q.shape and chunked.dtype == dtype
    same_precision = run_in_chunks(block_sparse_attention_reference, q, k, v, mask, chunk)
    assert_close_to_oracle(chunked, same_precision, oracle_attention(q, k, v, mask))
    whole = block_sparse_attention(q, k, v, mask)
    tolerance = 0 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(chunked, whole, rtol=tolerance, atol=tolerance + 1e-6)


@needs_kernel_device
@pytest.mark.parametrize("start", [64, 100, 255])
def test_lists_with_a_query_offset_give_the_mask_result(start, poisoned_empty):
    """A continuation of a cache at any offset, blocks given as lists or as a mask."""
    s = 300
    q, k, v = random_qkv((s, 4, 2, 64), KERNEL_DTYPES[0], KERNEL_DEVICE, batch=1, seed=13)
    mask = chunk_mask(make_mask("random", 1, 4, s, KERNEL_DEVICE, seed=13), start, s)
    indices, counts = kept_block_indices(mask)
    assert indices.shape[2] == mask.shape[2]
    tail = q[:, :, start:].contiguous()
    out = block_sparse_attention_from_lists(tail, k, v, indices, counts)
    torch.testing.assert_close(out, block_sparse_attention(tail, k, v, mask))


def test_kept_block_indices_of_chunk_rows():
    """Rows of a chunk list the kept blocks strictly below their own diagonal block."""
    mask = torch.ones(1, 1, 2, 5, dtype=torch.bool)  # rows are blocks 3 and 4
    indices, counts = kept_block_indices(mask)
    assert counts.tolist() == [[[3, 4]]]
    assert indices[0, 0, 0, :3].tolist() == [0, 1, 2]
    assert indices[0, 0, 1, :4].tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize(
    "q_len, mask_rows, message",
    [
        (71, 2, "does not match"),  # more queries than keys
        (70, 1, "block_mask must be shaped"),  # all 70 tokens fill two rows
        (6, 2, "block_mask must be shaped"),  # the last 6 of 70 tokens fill one row
    ],
    ids=["q-longer-than-kv", "too-few-rows", "too-many-rows"],
)
def test_chunk_shapes_are_checked(q_len, mask_rows, message):
    _, k, v = random_qkv((70, 4, 2, 64), torch.float32, "cpu", batch=1)
    q = torch.randn(1, 4, q_len, 64)
    mask = torch.ones(1, 4, mask_rows, 2, dtype=torch.bool)
    with pytest.raises(ValueError, match=message):
        block_sparse_attention_reference(q, k, v, mask)


def test_chunk_lists_are_checked():
    q, k, v = random_qkv((70, 4, 2, 64), torch.float32, "cpu", batch=1)
    tail = q[:, :, 64:]  # the last 6 tokens: one query block row
    counts = torch.zeros(1, 4, 2, dtype=torch.int32)
    with pytest.raises(ValueError, match=r"indices must be shaped \[1, 4, 1, width\]"):
        block_sparse_attention_from_lists(tail, k, v, torch.zeros(1, 4, 2, 1).int(), counts)
    with pytest.raises(ValueError, match=r"counts must be shaped \[1, 4, 1\]"):
        block_sparse_attention_from_lists(tail, k, v, torch.zeros(1, 4, 1, 1).int(), counts)
