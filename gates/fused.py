"""Gate scoring and block selection in two fused launches (GPU, or the Triton interpreter).

The same kept blocks as ``select_block_lists`` / ``select_blocks`` on the gate's scores, without
the score map (a layer budget makes one map of ranks), and with nothing read back to the host:
list widths come from the policy's row budgets, known from the shape alone. Queries may be the
last rows of the keys (a chunk of a prompt, or a prompt continuing a cache), as for the
block-sparse kernel.
"""

import math

import torch
from seer_kernels import (
    block_lists_from_features,
    gate_block_features,
    layer_block_lists_from_features,
    pooled_block_features,
)

from .gate import AttnGate
from .policy import MaskPolicy, _plan_for, layer_rank_scale, layer_ranked_count


def _select(qf, kf, policy: MaskPolicy, scale: float, total_blocks: int | None):
    """Lists of the query blocks of qf [b, Hq, nq, h], the last nq of kf's nb key blocks, in a
    prompt of ``total_blocks`` (default nb) blocks."""
    nq, nb = qf.shape[2], kf.shape[2]
    total = nb if total_blocks is None else total_blocks
    if nq > nb or total < nb:
        raise ValueError(f"{nq} query blocks over {nb} key blocks do not fit a prompt of "
                         f"{total} blocks.")  # fmt: skip
    dense_row = total - 1 if policy.dense_last_row else -1
    # Every chunk of a prompt runs the selection kernel compiled for its last one.
    common = dict(scale=scale, keep_sink=policy.keep_sink, local_blocks=policy.local_blocks,
                  dense_row=dense_row, query_offset=nb - nq, max_keys=total)  # fmt: skip
    if policy.threshold is not None:
        return block_lists_from_features(qf, kf, threshold=policy.threshold, **common)
    if policy.budget == "layer":
        keep = layer_ranked_count(policy, total, nb, nq, qf.device) * qf.shape[1]
        row_scale = layer_rank_scale(total, policy.rank_power, qf.device)
        return layer_block_lists_from_features(qf, kf, keep=keep, row_scale=row_scale, **common)
    plan = _plan_for(total, policy, qf.device, with_diagonal=False)
    width = max(plan.k, nb - 1 if nb == total and policy.dense_last_row else 0, 1)
    return block_lists_from_features(qf, kf, budgets=plan.budgets, width=width, **common)


def gate_block_lists(
    gate: AttnGate,
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    policy: MaskPolicy,
    total_blocks: int | None = None,
    key_tokens: int | None = None,
    query_tokens: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The block-sparse kernel's lists for one layer, from its pre-RoPE queries and keys.

    q: [b, sq, Hq, d], the last sq positions of the keys, or, given ``query_tokens`` = sq (from
    a block's first position), the same already pooled: [b, nq, Hq, d] as ``pool_queries``
    makes them. k: [b, s, Hkv, d], every key so far, or, given ``key_tokens`` = s, the same
    already pooled: [b, nb, Hkv, 3d] as ``pool_keys`` makes them. cos, sin: [b, nt, h] at block
    positions, covering every key block.
    total_blocks: blocks of the whole prompt when this is one of its chunks (default: the keys'
    nb), for the budgets and the dense last row. Returns (indices [b, Hq, nq, w], counts
    [b, Hq, nq]) int32 for the nq query blocks, the diagonal left out (the kernel always
    computes it).
    """
    if gate.block_size != 64:
        raise ValueError(f"the fused gate kernels pool blocks of 64 tokens, not {gate.block_size}.")
    weight_q = gate.mask_linear_q.weight if gate.mask_linear_q is not None else None
    keys = k.shape[1] if key_tokens is None else key_tokens
    queries = q.shape[1] if query_tokens is None else query_tokens
    qf, kf = gate_block_features(
        q, k, gate.mask_linear_k.weight, cos, sin, weight_q, query_start=keys - queries,
        queries_pooled=query_tokens is not None, keys_pooled=key_tokens is not None,
    )  # fmt: skip
    return _select(qf, kf, policy, 1 / math.sqrt(gate.hidden_size), total_blocks)


def pooled_block_lists(
    q: torch.Tensor, k: torch.Tensor, policy: MaskPolicy, total_blocks: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's lists from the training-free pooled estimator (``pooled_qk_scores``).

    q: [b, Hq, sq, d], the last sq positions of k: [b, Hkv, s, d], post-RoPE, heads first.
    Returns as :func:`gate_block_lists`.
    """
    qf, kf = pooled_block_features(q, k)
    return _select(qf, kf, policy, 1 / math.sqrt(q.shape[-1]), total_blocks)
