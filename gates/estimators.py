"""Training-free block score estimate: attention between mean-pooled queries and keys."""

import torch

from .gate import block_causal_logits, pool_queries


def pooled_qk_scores(q: torch.Tensor, k: torch.Tensor, block_size: int = 64) -> torch.Tensor:
    """Block-causal softmax of mean-pooled q · mean-pooled k / sqrt(d).

    q: `[b, Hq, sq, d]`, the last sq positions of k: `[b, Hkv, s, d]` (sq = s for a whole
    prompt), post-RoPE, heads first; query head i reads key head i // (Hq // Hkv). Returns
    float32 `[b, Hq, nq, nb]` (the query blocks are the last nq of the nb key blocks), each row
    summing to 1 over the key blocks up to its own.
    """
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3] or q.shape[2] > k.shape[2]:
        raise ValueError(
            f"q {tuple(q.shape)} must be the last positions of k {tuple(k.shape)}, "
            "with the same batch and head_dim."
        )
    start = k.shape[2] - q.shape[2]
    q_pooled = pool_queries(q.transpose(1, 2), block_size, start).float()
    k_pooled = pool_queries(k.transpose(1, 2), block_size).float()
    return block_causal_logits(q_pooled, k_pooled).softmax(dim=-1)
