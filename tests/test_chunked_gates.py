"""Gates and policies for the last block rows of a prompt: a prompt prefilled in chunks, or a
prompt continuing a cache. A chunk's rows must score and select what the whole prompt's do."""

import itertools

import pytest
import torch
from seer_gates import (
    AttnGate,
    MaskPolicy,
    block_count,
    block_rope_tables,
    default_rotary,
    kept_causal_blocks,
    pool_keys,
    pool_queries,
    pooled_qk_scores,
    select_block_lists,
    select_blocks,
)
from seer_gates.pooled_keys import PooledKeys


def randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def chunk_bounds(seq_len: int, chunk: int):
    return [(start, min(start + chunk, seq_len)) for start in range(0, seq_len, chunk)]


def mask_from_lists(indices, counts, nb):
    """A block mask `[..., nq, nb]` from per-row lists, adding each row's diagonal block."""
    rows = indices.shape[-2]
    used = torch.arange(indices.shape[-1]) < counts[..., None]
    columns = torch.where(used, indices.long(), nb)
    mask = torch.zeros(*indices.shape[:-1], nb + 1, dtype=torch.bool)
    mask.scatter_(-1, columns, True)
    diagonal = torch.zeros(rows, nb, dtype=torch.bool)
    diagonal[:, nb - rows :].fill_diagonal_(True)
    return mask[..., :nb] | diagonal


# ---------------------------------------------------------------- pooling


@pytest.mark.parametrize("start", [0, 1, 63, 64, 100])
@pytest.mark.parametrize("s", [1, 63, 64, 200])
def test_pool_queries_of_a_chunk_lie_on_the_position_grid(start, s):
    q = randn(2, s, 3, 8, seed=s + start)
    pooled = pool_queries(q, start=start)
    # Scatter the chunk onto its positions and average each block's tokens by hand.
    first = start // 64
    expected = []
    for block in range(first, block_count(start + s)):
        lo, hi = max(block * 64, start), min((block + 1) * 64, start + s)
        expected.append(q[:, lo - start : hi - start].mean(dim=1))
    torch.testing.assert_close(pooled, torch.stack(expected, dim=1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("chunk", [1, 50, 64, 130])
def test_pooled_keys_in_chunks_equal_pooling_all_at_once(chunk, dtype):
    k = randn(2, 333, 3, 16, seed=chunk, dtype=dtype)
    pooled = PooledKeys()
    for start, end in chunk_bounds(333, chunk):
        so_far = pooled.extend(k[:, start:end])
        assert torch.equal(so_far, pool_keys(k[:, :end])), (start, end)
    assert pooled.tokens == 333


# ---------------------------------------------------------------- scores


GATES = [(4, 4, 64, 64), (6, 2, 32, 64)]


@pytest.mark.parametrize("hq, hkv, d, h", GATES, ids=["no-q-linear", "q-linear-gqa"])
@pytest.mark.parametrize("chunk", [64, 128, 100])
def test_gate_rows_of_a_chunk_equal_the_whole_prompts(hq, hkv, d, h, chunk):
    """Aligned chunks score exactly the whole prompt's rows; a chunk that starts or ends inside
    a block differs only in that partial row (it pools fewer tokens)."""
    torch.manual_seed(0)
    gate = AttnGate(hq, hkv, d, hidden_size=h)
    s = 300
    q, k = randn(1, s, hq, d, seed=1), randn(1, s, hkv, d, seed=2)
    cos, sin = block_rope_tables(default_rotary(h), block_count(s), 64, 1, "cpu")
    whole = gate(q, k, cos, sin)
    keys = PooledKeys()
    for start, end in chunk_bounds(s, chunk):
        nb = block_count(end)
        rows = gate(q[:, start:end], k[:, :end], cos[:, :nb], sin[:, :nb])
        pooled_q = pool_queries(q[:, start:end], start=start)
        logits = gate.logits(pooled_q, keys.extend(k[:, start:end]), cos[:, :nb], sin[:, :nb])
        torch.testing.assert_close(logits.softmax(-1), rows)
        first = start // 64
        assert rows.shape == (1, hq, nb - first, nb)
        lo = first + (start % 64 != 0)
        hi = nb - (end % 64 != 0 and end < s)
        torch.testing.assert_close(rows[..., lo - first : hi - first, :hi], whole[..., lo:hi, :hi])


def test_pooled_estimator_rows_of_a_chunk_equal_the_whole_prompts():
    q, k = randn(1, 6, 300, 32, seed=3), randn(1, 2, 300, 32, seed=4)
    whole = pooled_qk_scores(q, k)
    rows = pooled_qk_scores(q[:, :, 128:], k)
    assert rows.shape == (1, 6, 3, 5)
    torch.testing.assert_close(rows, whole[..., 2:, :])


def test_scores_need_queries_within_the_keys():
    with pytest.raises(ValueError, match="last positions"):
        pooled_qk_scores(randn(1, 2, 70, 8), randn(1, 2, 60, 8))


# ---------------------------------------------------------------- selection

POLICIES = [
    MaskPolicy(sparsity=s, keep_sink=sink, dense_last_row=dense)
    for s, (sink, dense) in itertools.product([0.0, 0.5, 0.9], [(True, True), (False, False)])
] + [
    MaskPolicy(threshold=0.05),
    MaskPolicy(threshold=0.05, keep_sink=False),
    MaskPolicy(sparsity=0.5, local_blocks=3),
    MaskPolicy(sparsity=0.9, keep_sink=False, local_blocks=1),
    MaskPolicy(threshold=0.05, local_blocks=8),
]


def policy_id(policy: MaskPolicy) -> str:
    kind = f"s{policy.sparsity}" if policy.threshold is None else f"t{policy.threshold}"
    local = f"-local{policy.local_blocks}" if policy.local_blocks else ""
    return f"{kind}-sink{int(policy.keep_sink)}-last{int(policy.dense_last_row)}{local}"


@pytest.mark.parametrize("policy", POLICIES, ids=policy_id)
@pytest.mark.parametrize("nb, chunk_blocks", [(1, 1), (9, 1), (9, 4), (33, 8)])
def test_selection_of_chunk_rows_equals_the_whole_prompts(nb, chunk_blocks, policy):
    """Budgets use each row's own index and the prompt's size; only the prompt's last row is
    dense."""
    scores = torch.rand(2, 3, nb, nb, generator=torch.Generator().manual_seed(nb)).tril()
    whole = select_blocks(scores, policy)
    for first in range(0, nb, chunk_blocks):
        end = min(first + chunk_blocks, nb)
        rows = scores[..., first:end, :end]
        mask = select_blocks(rows, policy, total_blocks=nb)
        assert torch.equal(mask, whole[..., first:end, :end]), first
        if policy.sparsity is not None:
            indices, counts = select_block_lists(rows, policy, total_blocks=nb)
            assert torch.equal(mask_from_lists(indices, counts, end), mask), first


def test_without_total_blocks_the_chunk_ends_the_prompt():
    scores = torch.rand(1, 1, 2, 6)
    mask = select_blocks(scores, MaskPolicy(sparsity=0.9))
    assert mask[0, 0, -1].all(), "the last row of a continuation is dense"
    assert not select_blocks(scores, MaskPolicy(sparsity=0.9), total_blocks=7)[0, 0, -1].all()


def test_kept_causal_blocks_of_chunk_rows():
    mask = torch.ones(2, 3, 2, 5, dtype=torch.bool)  # rows are blocks 3 and 4: 4 + 5 causal
    assert kept_causal_blocks(mask) == (6 * 9, 6 * 9)


@pytest.mark.parametrize(
    "shape, total, message",
    [((1, 1, 4, 3), None, "rows being the last key blocks"), ((1, 1, 2, 5), 4, "cannot have")],
    ids=["more-rows-than-blocks", "prompt-shorter-than-keys"],
)
def test_selection_checks_chunk_shapes(shape, total, message):
    with pytest.raises(ValueError, match=message):
        select_blocks(torch.rand(shape), MaskPolicy(sparsity=0.5), total_blocks=total)
