"""Fused gate scoring and block selection (Triton) against the PyTorch gate and policies.

The kept blocks must be identical: random inputs have no ties, and the kernels compute the
gate's logits to float32 accuracy. Runs under TRITON_INTERPRET=1 (float32/float16) and on a
GPU (float16/bfloat16).
"""

import math

import pytest
import torch
from conftest import KERNEL_DEVICE, KERNEL_DTYPES, needs_kernel_device
from seer_gates import (
    AttnGate,
    MaskPolicy,
    block_rope_tables,
    default_rotary,
    gate_block_lists,
    pool_keys,
    pool_queries,
    pooled_block_lists,
    pooled_qk_scores,
    select_blocks,
)
from seer_kernels import block_lists_from_features, gate_block_features, gate_select, num_blocks

pytestmark = needs_kernel_device

# (seq_len, q_heads, kv_heads, head_dim, gate hidden, query linear) and the policies each runs:
# the published rule (h == d, no query linear) and gates with a query linear; GQA 1 and 3.
GATE_CASES = [
    ((1, 2, 2, 64, 64, False), ["top-k 0.5"]),
    (
        (65, 3, 1, 64, 128, True),
        ["top-k 0.5", "threshold, no sink", "top-k 0.5, local 1", "layer 0.5"],
    ),
    (
        (1000, 3, 1, 128, 128, False),
        [
            "top-k 0.9, nothing forced",
            "threshold",
            "top-k 0.9, local 3",
            "threshold, local 8",
            "layer 0.5, power 2, local 1",
        ],
    ),  # fmt: skip
    (
        (700, 2, 2, 128, 64, True),
        [
            "top-k 0.9",
            "threshold",
            "top-k 0.9, local 8, nothing else",
            "threshold, local 3",
            "layer 0.9, nothing forced",
        ],
    ),  # fmt: skip
]
POLICIES = {
    "top-k 0.5": MaskPolicy(sparsity=0.5),
    "top-k 0.9": MaskPolicy(sparsity=0.9),
    "top-k 0.9, nothing forced": MaskPolicy(sparsity=0.9, keep_sink=False, dense_last_row=False),
    "threshold": MaskPolicy(threshold=1.0),
    "threshold, no sink": MaskPolicy(threshold=2.0, keep_sink=False, dense_last_row=False),
    # Local windows: with the sink inside or outside the window, or no sink at all.
    "top-k 0.5, local 1": MaskPolicy(sparsity=0.5, local_blocks=1),
    "top-k 0.9, local 3": MaskPolicy(sparsity=0.9, local_blocks=3),
    "top-k 0.9, local 8, nothing else": MaskPolicy(
        sparsity=0.9, keep_sink=False, dense_last_row=False, local_blocks=8
    ),
    "threshold, local 3": MaskPolicy(threshold=1.0, local_blocks=3),
    "threshold, local 8": MaskPolicy(threshold=2.0, keep_sink=False, local_blocks=8),
    # Layer budgets: the sequence's maps share one ranking.
    "layer 0.5": MaskPolicy(sparsity=0.5, budget="layer"),
    "layer 0.9": MaskPolicy(sparsity=0.9, budget="layer"),
    "layer 0.5, power 2, local 1": MaskPolicy(
        sparsity=0.5, budget="layer", rank_power=2.0, local_blocks=1
    ),
    "layer 0.9, nothing forced": MaskPolicy(
        sparsity=0.9, budget="layer", keep_sink=False, dense_last_row=False
    ),
}


def ranks_probabilities(policy: MaskPolicy) -> bool:
    """Whether ``select_blocks`` takes each row's softmax under ``policy`` (else logits)."""
    return policy.threshold is not None or policy.budget == "layer"


def case_id(shape) -> str:
    s, hq, hkv, d, h, q_linear = shape
    return f"s{s}-hq{hq}-hkv{hkv}-d{d}-h{h}" + ("-qlinear" if q_linear else "")


def gate_inputs(shape, dtype, batch=1, seed=0):
    s, hq, hkv, d, h, q_linear = shape
    torch.manual_seed(seed)
    gate = AttnGate(hq, hkv, d, h, force_double=q_linear and h == d).to(KERNEL_DEVICE)
    assert (gate.mask_linear_q is not None) == q_linear
    q = torch.randn(batch, s, hq, d).to(KERNEL_DEVICE, dtype)
    k = torch.randn(batch, s, hkv, d).to(KERNEL_DEVICE, dtype)
    cos, sin = block_rope_tables(default_rotary(h), num_blocks(s), 64, batch, KERNEL_DEVICE)
    return gate, q, k, cos, sin


def reference_mask(gate, q, k, cos, sin, policy):
    with torch.no_grad():
        scores = gate(q, k, cos, sin, probabilities=ranks_probabilities(policy))
    return select_blocks(scores, policy)


def lists_to_mask(indices, counts, keys):
    """Kept blocks [b, H, n, keys] of per-row lists; checks each row is ascending below its
    diagonal (so no block is listed twice)."""
    b, h, n, width = indices.shape
    assert bool((counts >= 0).all()) and bool((counts <= width).all())
    listed = torch.arange(width, device=indices.device) < counts[..., None]
    rows = keys - n + torch.arange(n, device=indices.device)
    cols = torch.where(listed, indices.long(), -1)
    assert bool((cols < rows[:, None]).all()), "a listed block is not below the diagonal"
    ascending = (cols[..., 1:] > cols[..., :-1]) | ~listed[..., 1:]
    assert bool(ascending.all()), "a row lists its blocks out of order or twice"
    mask = torch.zeros(b, h, n, keys + 1, dtype=torch.bool, device=indices.device)
    mask.scatter_(-1, torch.where(listed, indices.long(), keys), True)
    return mask[..., :keys] | (rows[:, None] == torch.arange(keys, device=indices.device))


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize(
    ("shape", "policy_name"),
    [(shape, name) for shape, names in GATE_CASES for name in names],
    ids=lambda x: case_id(x) if isinstance(x, tuple) else x.replace(" ", ""),
)
def test_fused_gate_keeps_the_blocks_of_the_pytorch_path(shape, policy_name, dtype):
    policy = POLICIES[policy_name]
    gate, q, k, cos, sin = gate_inputs(shape, dtype, batch=2 if shape[0] == 65 else 1)
    indices, counts = gate_block_lists(gate, q, k, cos, sin, policy)
    expected = reference_mask(gate, q, k, cos, sin, policy)
    torch.testing.assert_close(lists_to_mask(indices, counts, num_blocks(shape[0])), expected)


@pytest.mark.parametrize(
    "policy_name", ["top-k 0.5", "threshold", "top-k 0.9, local 3", "layer 0.9"]
)
def test_fused_pooled_estimator_keeps_the_blocks_of_the_pytorch_path(policy_name):
    policy = POLICIES[policy_name]
    torch.manual_seed(1)
    q = torch.randn(1, 6, 900, 64).to(KERNEL_DEVICE, KERNEL_DTYPES[-1])
    k = torch.randn(1, 2, 900, 64).to(KERNEL_DEVICE, KERNEL_DTYPES[-1])
    indices, counts = pooled_block_lists(q, k, policy)
    expected = select_blocks(pooled_qk_scores(q, k), policy)
    torch.testing.assert_close(lists_to_mask(indices, counts, num_blocks(900)), expected)
    # A chunk of queries starting inside block 5, in a prompt of 20 blocks.
    indices, counts = pooled_block_lists(q[:, :, 350:], k, policy, total_blocks=20)
    expected = select_blocks(pooled_qk_scores(q[:, :, 350:], k), policy, 20)
    torch.testing.assert_close(lists_to_mask(indices, counts, num_blocks(900)), expected)


@pytest.mark.parametrize(
    "policy_name", ["top-k 0.9", "threshold", "top-k 0.9, local 3", "layer 0.5, power 2, local 1"]
)
@pytest.mark.parametrize(
    "pooled", ["raw", "pooled keys", "pooled queries and keys"], ids=lambda x: x.replace(" ", "-")
)
def test_a_chunk_of_queries_keeps_the_blocks_of_the_pytorch_path(policy_name, pooled):
    """Queries that are the last positions of the keys (a chunk of a prompt, or a prompt
    continuing a cache), starting inside a block or on one; the keys raw or pooled already, and
    queries that start a block pooled already too (as the fused RoPE pools them)."""
    policy = POLICIES[policy_name]
    gate, q, k, cos, sin = gate_inputs((1000, 3, 1, 64, 128, True), KERNEL_DTYPES[0])
    for start, end, total in ((320, 1000, 16), (300, 1000, 16), (250, 560, 16), (0, 1000, 16)):
        chunk, keys = q[:, start:end], k[:, :end]
        key_input = keys if pooled == "raw" else pool_keys(keys)
        pool_chunk = pooled == "pooled queries and keys" and start % 64 == 0
        lists = gate_block_lists(
            gate, pool_queries(chunk) if pool_chunk else chunk, key_input, cos, sin, policy,
            total, key_tokens=None if pooled == "raw" else end,
            query_tokens=end - start if pool_chunk else None,
        )  # fmt: skip
        with torch.no_grad():
            nb = num_blocks(end)
            logits = gate.logits(pool_queries(chunk, start=start), pool_keys(keys), cos[:, :nb],
                                 sin[:, :nb])  # fmt: skip
        scores = logits.softmax(-1) if ranks_probabilities(policy) else logits
        expected = select_blocks(scores, policy, total)
        torch.testing.assert_close(lists_to_mask(*lists, nb), expected)


@pytest.mark.parametrize("widths", [3, 2, 1])
def test_selection_in_several_passes_per_work_item(widths, monkeypatch):
    """Rows selected a few at a time (as at long lengths on the GPU), more work items than
    programs and any number of row widths keep the same blocks."""
    monkeypatch.setattr(gate_select, "SELECT_ELEMENTS", 64)
    monkeypatch.setattr(gate_select, "SELECT_WIDTHS", widths)
    monkeypatch.setattr(gate_select, "_program_slots", lambda device: 2)
    shape = (2100, 2, 1, 64, 64, False)
    gate, q, k, cos, sin = gate_inputs(shape, KERNEL_DTYPES[0])
    for policy in (POLICIES["top-k 0.9"], POLICIES["threshold"]):
        indices, counts = gate_block_lists(gate, q, k, cos, sin, policy)
        expected = reference_mask(gate, q, k, cos, sin, policy)
        torch.testing.assert_close(lists_to_mask(indices, counts, num_blocks(2100)), expected)


@pytest.mark.parametrize("policy_name", ["top-k 0.9, local 3", "threshold"])
def test_a_kernel_compiled_for_more_keys_keeps_the_same_blocks(policy_name):
    """A chunk scored by the kernel compiled for the prompt's last chunk (``max_keys``) keeps
    what the kernel compiled for its own keys keeps."""
    gate, q, k, cos, sin = gate_inputs((900, 2, 1, 64, 64, False), KERNEL_DTYPES[0])
    qf, kf = gate_block_features(q, k, gate.mask_linear_k.weight, cos, sin)
    policy = POLICIES[policy_name]
    kwargs = dict(scale=1 / 8, local_blocks=policy.local_blocks, query_offset=4)
    if policy.threshold is None:
        kwargs.update(budgets=torch.full((15,), 3, dtype=torch.int32, device=KERNEL_DEVICE))
    else:
        kwargs.update(threshold=policy.threshold)
    own = block_lists_from_features(qf[:, :, 4:], kf, **kwargs)
    wide = block_lists_from_features(qf[:, :, 4:], kf, max_keys=300, **kwargs)
    assert torch.equal(own[1], wide[1])
    torch.testing.assert_close(lists_to_mask(*wide, 15), lists_to_mask(*own, 15))


def test_tied_logits_fill_each_budget_from_the_lowest_blocks():
    """Equal logits (identical key blocks, as in a repeated text) still keep exactly each row's
    budget: the sink, then the lowest blocks."""
    nb, budget = 40, 5
    qf = torch.ones(1, 2, nb, 64, device=KERNEL_DEVICE)
    kf = -torch.ones(1, 1, nb, 64, device=KERNEL_DEVICE)
    budgets = torch.full((nb,), budget, dtype=torch.int32, device=KERNEL_DEVICE)
    indices, counts = block_lists_from_features(qf, kf, budgets=budgets, width=budget)
    rows = torch.arange(nb, device=KERNEL_DEVICE)
    assert torch.equal(counts[0, 0], rows.clamp(max=budget).int())
    for row in (1, 3, 39):
        kept = sorted(indices[0, 1, row, : counts[0, 1, row]].tolist())
        assert kept == list(range(min(row, budget)))


def test_the_features_are_the_gates_own_logits():
    gate, q, k, cos, sin = gate_inputs((200, 3, 1, 64, 128, True), torch.float32)
    qf, kf = gate_block_features(
        q, k, gate.mask_linear_k.weight, cos, sin, gate.mask_linear_q.weight
    )
    logits = torch.einsum("bhic,bhjc->bhij", qf, kf.repeat_interleave(3, dim=1)) / math.sqrt(128)
    with torch.no_grad():
        expected = gate(q, k, cos, sin, probabilities=False)
    causal = torch.ones(4, 4, dtype=torch.bool, device=q.device).tril()
    torch.testing.assert_close(logits[..., causal], expected[..., causal], rtol=1e-4, atol=1e-4)


def test_bad_arguments_raise_one_sentence():
    qf = torch.zeros(1, 2, 4, 64, device=KERNEL_DEVICE)
    budgets = torch.ones(4, dtype=torch.int32, device=KERNEL_DEVICE)
    with pytest.raises(ValueError, match="either row budgets or a threshold"):
        block_lists_from_features(qf, qf, budgets=budgets, threshold=0.1)
    with pytest.raises(ValueError, match="do not fit"):
        block_lists_from_features(qf, qf[:, :, :2], threshold=0.1)
    with pytest.raises(ValueError, match="int32"):
        block_lists_from_features(qf, qf, budgets=budgets.long())
    with pytest.raises(ValueError, match="local_blocks"):
        block_lists_from_features(qf, qf, threshold=0.1, local_blocks=-1)
    gate, q, k, cos, sin = gate_inputs((100, 2, 2, 64, 64, False), torch.float32)
    with pytest.raises(ValueError, match="power-of-two head_dim"):
        gate_block_features(q[..., :48], k[..., :48], gate.mask_linear_k.weight[:, :144], cos,
                            sin)  # fmt: skip
    with pytest.raises(ValueError, match="pooled queries must start a block"):
        gate_block_features(pool_queries(q[:, 30:]), k, gate.mask_linear_k.weight, cos, sin,
                            query_start=30, queries_pooled=True)  # fmt: skip
