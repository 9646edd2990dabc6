"""Turning block scores into a block mask: threshold or top-k sparsity, plus forced blocks."""

import functools
import math
from dataclasses import dataclass

import torch

# Guards ceil() against products like 3.0000000000000004 that should be exactly 3.
_CEIL_SLACK = 1e-9


@dataclass
class MaskPolicy:
    """How to keep blocks: give exactly one of `sparsity` or `threshold`.

    sparsity: target fraction of causal blocks to skip, in [0, 1).
    threshold: keep blocks whose score is above `threshold` times the row's average score, 0 or
        more. Scores are a softmax over the row's causal blocks, so the average of row i is
        1 / (i + 1): τ = 1 keeps the blocks above average, at any prompt length (an absolute
        score threshold keeps ever fewer blocks as rows grow longer).
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
        if self.threshold is not None and not 0.0 <= self.threshold < math.inf:
            raise ValueError(f"threshold must be finite and 0 or more, got {self.threshold}.")


@functools.lru_cache(maxsize=16)
def _causal(nb: int, device: torch.device) -> torch.Tensor:
    return torch.ones(nb, nb, dtype=torch.bool, device=device).tril()


@functools.lru_cache(maxsize=16)
def _forced_on(nb: int, keep_sink: bool, dense_last_row: bool, device) -> torch.Tensor:
    policy = MaskPolicy(sparsity=0.0, keep_sink=keep_sink, dense_last_row=dense_last_row)
    return _forced(nb, policy).to(device)


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


@dataclass(frozen=True)
class _TopkPlan:
    """Row budgets of a top-k selection, built once per shape and policy.

    rows: ranked rows (all but a dense last row); budgets [rows] int32 on the device: blocks to
    take per ranked row; k: the largest budget.
    """

    rows: int
    k: int
    budgets: torch.Tensor


@functools.lru_cache(maxsize=16)
def _topk_plan(
    nb: int, sparsity: float, keep_sink: bool, dense_last_row: bool, device, with_diagonal: bool
) -> _TopkPlan:
    """``with_diagonal`` False leaves the diagonal out of the budgets (the kernel computes it
    anyway). Cached: no host-to-device copy, and so no wait for the GPU, on every layer."""
    policy = MaskPolicy(sparsity=sparsity, keep_sink=keep_sink, dense_last_row=dense_last_row)
    budgets = _row_budgets(_forced(nb, policy), policy) - (0 if with_diagonal else 1)
    rows = nb - 1 if dense_last_row else nb
    k = int(budgets[:rows].max()) if rows else 0
    return _TopkPlan(rows, k, budgets[:rows].to(device=device, dtype=torch.int32))


def _ranking_bias(rows: int, nb: int, keep_sink: bool, with_diagonal: bool, device):
    """[rows, nb] float32 added to scores before top-k: -inf where a block is never ranked,
    +inf where it is forced (sink, and the diagonal when ranked), 0 elsewhere. Built on the
    device each call rather than cached, so that it holds no memory between prefills."""
    never = torch.ones(rows, nb, dtype=torch.bool, device=device).triu(1 if with_diagonal else 0)
    bias = torch.zeros(rows, nb, device=device).masked_fill_(never, -math.inf)
    if with_diagonal:
        bias.diagonal().fill_(math.inf)
    if keep_sink:
        bias[0 if with_diagonal else 1 :, 0] = math.inf
    return bias


def _plan_for(nb: int, policy: MaskPolicy, device, with_diagonal: bool) -> _TopkPlan:
    return _topk_plan(
        nb, policy.sparsity, policy.keep_sink, policy.dense_last_row, device, with_diagonal
    )


def _row_thresholds(threshold: float, nb: int, rows: int, device) -> torch.Tensor:
    """`[rows, 1]` float32: the score threshold of each of the last `rows` block rows, τ times
    the row's average score; row i (of nb) has i + 1 causal blocks."""
    causal_blocks = torch.arange(nb - rows + 1, nb + 1, dtype=torch.float32, device=device)
    return (threshold / causal_blocks).unsqueeze(-1)


def select_blocks(scores: torch.Tensor, policy: MaskPolicy) -> torch.Tensor:
    """Block mask from block-causal scores.

    scores: `[b, H, nb, nb]` (any leading dims), entries above the diagonal ignored.
    Returns bool `[b, H, nb, nb]`: the forced blocks, plus the blocks scoring above τ times
    their row's average (the scores then being each row's softmax) or, under sparsity, each
    row's highest-scoring blocks up to its budget (forced blocks count inside the budget).
    Nothing above the diagonal is kept.
    """
    if scores.dim() < 2 or scores.shape[-1] != scores.shape[-2]:
        raise ValueError(f"scores must end in two equal block axes, got {tuple(scores.shape)}.")
    nb, device = scores.shape[-1], scores.device
    causal = _causal(nb, device)
    forced = _forced_on(nb, policy.keep_sink, policy.dense_last_row, device)
    if policy.threshold is not None:
        return (scores > _row_thresholds(policy.threshold, nb, nb, device)) & causal | forced

    plan = _plan_for(nb, policy, device, with_diagonal=True)
    mask = torch.zeros(scores.shape, dtype=torch.bool, device=device)
    if plan.k:
        bias = _ranking_bias(plan.rows, nb, policy.keep_sink, True, device)
        top = (scores[..., : plan.rows, :].float() + bias).topk(plan.k, dim=-1).indices
        keep = torch.arange(plan.k, device=device) < plan.budgets[:, None]
        mask[..., : plan.rows, :].scatter_(-1, top, keep.expand_as(top))
    # A -inf causal score can tie with the masked upper triangle; causality wins.
    return mask & causal | forced


def select_block_lists(
    scores: torch.Tensor, policy: MaskPolicy
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k selection straight into the kernel's input: per-row lists of kept key blocks.

    The same blocks as ``select_blocks`` under a sparsity policy, without the diagonal (the
    kernel always computes it) and without building a mask. scores: `[b, H, nb, nb]`, any
    per-row monotonic transform of probabilities (e.g. gate logits) ranks the same.
    Returns (indices `[b, H, nb, w]` int32, counts `[b, H, nb]` int32): row i keeps
    ``indices[..., i, :counts[..., i]]``, in no particular order; slots past a row's count
    are unspecified.
    """
    if policy.sparsity is None:
        raise ValueError("block lists come from a sparsity policy, not a threshold.")
    *lead, nb, _ = scores.shape
    device = scores.device
    plan = _plan_for(nb, policy, device, with_diagonal=False)
    width = max(plan.k, nb - 1 if policy.dense_last_row else 0, 1)
    indices = torch.empty(*lead, nb, width, dtype=torch.int32, device=device)
    counts = torch.empty(nb, dtype=torch.int32, device=device)
    counts[: plan.rows] = plan.budgets
    if plan.k:
        bias = _ranking_bias(plan.rows, nb, policy.keep_sink, False, device)
        ranked = scores[..., : plan.rows, :].float() + bias
        indices[..., : plan.rows, : plan.k] = ranked.topk(plan.k, dim=-1).indices
    if policy.dense_last_row and nb > 1:
        indices[..., nb - 1, : nb - 1] = torch.arange(nb - 1, dtype=torch.int32, device=device)
    if plan.rows < nb:
        counts[plan.rows :] = nb - 1
    return indices, counts.expand(*lead, nb)


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
