"""Turning block scores into a block mask: threshold or top-k sparsity, plus forced blocks."""

import math
from dataclasses import dataclass

import torch

# Guards ceil() against products like 3.0000000000000004 that should be exactly 3.
_CEIL_SLACK = 1e-9


@dataclass
class MaskPolicy:
    """How to keep blocks: give exactly one of `sparsity` or `threshold`.

    sparsity: target fraction of causal blocks to skip, in [0, 1).
    threshold: keep blocks whose score is above it, in [0, 1).
    keep_sink: always keep the first key block of every row.
    dense_last_row: always keep every causal block of the last query row.
    The diagonal block is always kept.
    """

    sparsity: float | None = None
    threshold: float | None = None
    keep_sink: bool = True
    dense_last_row: bool = True

    def __post_init__(self):
        if (self.sparsity is None) == (self.threshold is None):
            raise ValueError("give either a sparsity or a threshold, not both or neither.")
        if self.sparsity is not None and not 0.0 <= self.sparsity < 1.0:
            raise ValueError(f"sparsity must be in [0, 1), got {self.sparsity}.")
        if self.threshold is not None and not 0.0 <= self.threshold < 1.0:
            raise ValueError(f"threshold must be in [0, 1), got {self.threshold}.")


def _causal(nb: int, device: torch.device) -> torch.Tensor:
    return torch.ones(nb, nb, dtype=torch.bool, device=device).tril()


def _forced(nb: int, policy: MaskPolicy) -> torch.Tensor:
    """Blocks kept whatever the scores: `[nb, nb]` bool, on the CPU."""
    forced = torch.eye(nb, dtype=torch.bool)
    if policy.keep_sink:
        forced[:, 0] = True
    if policy.dense_last_row:
        forced[-1, :] = True
    return forced


def _row_budgets(forced: torch.Tensor, policy: MaskPolicy) -> torch.Tensor:
    """Blocks to keep in each query row under top-k sparsity: `[nb]` long, on the CPU.

    Row i keeps max(forced_i, ceil(r·(i+1))) blocks. With a dense last row, r is lowered so
    that the whole map, last row included, reaches the requested sparsity.
    """
    nb = forced.shape[0]
    density = 1.0 - policy.sparsity
    total = nb * (nb + 1) // 2
    if policy.dense_last_row and nb > 1:
        density = min(max((density * total - nb) / (total - nb), 0.0), 1.0)
    lengths = torch.arange(1, nb + 1, dtype=torch.float64)
    wanted = torch.ceil(density * lengths - _CEIL_SLACK).long()
    return torch.maximum(wanted, forced.sum(dim=-1)).minimum(lengths.long())


def select_blocks(scores: torch.Tensor, policy: MaskPolicy) -> torch.Tensor:
    """Block mask from block-causal scores.

    scores: `[b, H, nb, nb]` (any leading dims), entries above the diagonal ignored.
    Returns bool `[b, H, nb, nb]`: the forced blocks, plus the blocks scoring above the
    threshold or, under sparsity, each row's highest-scoring blocks up to its budget (forced
    blocks count inside the budget). Nothing above the diagonal is kept.
    """
    if scores.dim() < 2 or scores.shape[-1] != scores.shape[-2]:
        raise ValueError(f"scores must end in two equal block axes, got {tuple(scores.shape)}.")
    nb, device = scores.shape[-1], scores.device
    causal = _causal(nb, device)
    forced_cpu = _forced(nb, policy)
    forced = forced_cpu.to(device)
    if policy.threshold is not None:
        return (scores > policy.threshold) & causal | forced

    # Budgets depend only on nb and the policy; on the CPU, reading their max needs no sync.
    budgets = _row_budgets(forced_cpu, policy)
    mask = torch.zeros(scores.shape, dtype=torch.bool, device=device)
    # A dense last row needs no ranking, and leaving it out keeps topk's k small.
    rows = nb - 1 if policy.dense_last_row else nb
    if rows:
        ranked = scores[..., :rows, :].float()
        ranked = ranked.masked_fill(~causal[:rows], -math.inf).masked_fill(forced[:rows], math.inf)
        top = ranked.topk(int(budgets[:rows].max()), dim=-1).indices
        keep = (torch.arange(top.shape[-1]) < budgets[:rows, None]).to(device)
        mask[..., :rows, :].scatter_(-1, top, keep.expand_as(top))
    # A -inf causal score can tie with the masked upper triangle; causality wins.
    return mask & causal | forced


def select_block_lists(
    scores: torch.Tensor, policy: MaskPolicy
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k selection straight into the kernel's input: per-row lists of kept key blocks.

    The same blocks as ``select_blocks`` under a sparsity policy, without the diagonal (the
    kernel always computes it) and without building a mask. scores: `[b, H, nb, nb]`.
    Returns (indices `[b, H, nb, w]` int32, counts `[b, H, nb]` int32): row i keeps
    ``indices[..., i, :counts[..., i]]``, in no particular order.
    """
    if policy.sparsity is None:
        raise ValueError("block lists come from a sparsity policy, not a threshold.")
    *lead, nb, _ = scores.shape
    device = scores.device
    forced = _forced(nb, policy)
    off_diagonal_budget = _row_budgets(forced, policy) - 1
    rows = nb - 1 if policy.dense_last_row else nb
    k = int(off_diagonal_budget[:rows].max()) if rows else 0
    width = max(k, nb - 1 if policy.dense_last_row else 0, 1)
    indices = torch.zeros(*lead, nb, width, dtype=torch.int32, device=device)
    if k:
        strictly_below = torch.ones(nb, nb, dtype=torch.bool, device=device).tril(-1)
        ranked = scores[..., :rows, :].float().masked_fill(~strictly_below[:rows], -math.inf)
        ranked = ranked.masked_fill(
            (forced & ~torch.eye(nb, dtype=torch.bool))[:rows].to(device), math.inf
        )
        indices[..., :rows, :k] = ranked.topk(k, dim=-1).indices.int()
    if policy.dense_last_row and nb > 1:
        indices[..., nb - 1, : nb - 1] = torch.arange(nb - 1, dtype=torch.int32, device=device)
    counts = off_diagonal_budget.to(device=device, dtype=torch.int32).expand(*lead, nb)
    return indices, counts.contiguous()


def kept_causal_blocks(mask: torch.Tensor) -> tuple[int, int]:
    """(kept, total) causal blocks of a block mask `[..., nb, nb]`, for summing over layers."""
    nb = mask.shape[-1]
    per_map = nb * (nb + 1) // 2
    total = per_map * (mask.numel() // (nb * nb)) if nb else 0
    kept = int((mask & _causal(nb, mask.device)).sum())
    return kept, total


def achieved_sparsity(mask: torch.Tensor) -> float:
    """1 − kept causal blocks / causal blocks over the whole mask `[..., nb, nb]`."""
    kept, total = kept_causal_blocks(mask)
    return 1.0 - kept / total if total else 0.0
