"""Training-free block score estimate: attention between mean-pooled queries and keys."""

import torch

from .gate import block_causal_logits, pool_queries


def pooled_qk_scores(q: torch.Tensor, k: torch.Tensor, block_size: int = 64) -> torch.Tensor:
    """Block-causal softmax of mean-pooled q · mean-pooled k / sqrt(d).

    q: `[b, Hq, s, d]`, k: `[b, Hkv, s, d]` post-RoPE, heads first; query head i reads key head
    i // (Hq // Hkv). Returns float32 `[b, Hq, nb, nb]`, each row summing to 1 over j ≤ i.
    """
    if q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} differ beyond the head axis.")
    q_pooled = pool_queries(q.transpose(1, 2), block_size).float()
    k_pooled = pool_queries(k.transpose(1, 2), block_size).float()
    return block_causal_logits(q_pooled, k_pooled).softmax(dim=-1)
