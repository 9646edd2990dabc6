"""Turning block scores into a block mask: threshold or top-k sparsity, plus forced blocks."""

import functools
import math
from dataclasses import dataclass

import torch

# Guards ceil() against products like 3.0000000000000004 that should be exactly 3.
_CEIL_SLACK = 1e-9
# How a sparsity is spent (MaskPolicy.budget).
BUDGETS = ("row", "layer")


@dataclass
class MaskPolicy:
    """How to keep blocks: give exactly one of `sparsity` or `threshold`.

    sparsity: target fraction of causal blocks to skip, in [0, 1).
    threshold: keep blocks whose score is above `threshold` times the row's average score, 0 or
        more. Scores are a softmax over the row's causal blocks, so the average of row i is
        1 / (i + 1): τ = 1 keeps the blocks above average, at any prompt length (an absolute
        score threshold keeps ever fewer blocks as rows grow longer).
    keep_sink: always keep the first key block of every row.
    local_blocks: always keep the key blocks just before each row's diagonal, this many (a
        local window; in row i, blocks max(0, i - local_blocks) … i - 1).
    dense_last_row: always keep every causal block of the last query row.
    budget: how a sparsity is spent. ``row``: each query row keeps its own share of its causal
        blocks, the highest scores among them. ``layer``: the scored map of each sequence keeps
        as many blocks in all as the rows' shares add up to, forced ones first, the rest going
        to the highest ranks across every head and row — rows and heads that spread their
        attention get more, sharp ones fewer. Scores must then be each row's softmax.
    rank_power: a layer budget ranks block j of row i by score · (i + 1)^rank_power. 1 is the
        threshold's measure (the score against its row's average); a higher power gives long
        rows more of the budget. Gate files name theirs (``GateConfig.layer_rank_power``),
        measured: 2 for the default model's 32k gates, 1 at 8k (EVAL.md).
    The diagonal block is always kept.
    """

    sparsity: float | None = None
    threshold: float | None = None
    keep_sink: bool = True
    dense_last_row: bool = True
    local_blocks: int = 0
    budget: str = "row"
    rank_power: float = 1.0

    def __post_init__(self):
        if (self.sparsity is None) == (self.threshold is None):
            raise ValueError("give either a sparsity or a threshold, not both or neither.")
        if self.sparsity is not None and not 0.0 <= self.sparsity < 1.0:
            raise ValueError(f"sparsity must be in [0, 1), got {self.sparsity}.")
        if self.threshold is not None and not 0.0 <= self.threshold < math.inf:
            raise ValueError(f"threshold must be finite and 0 or more, got {self.threshold}.")
        local = self.local_blocks
        if isinstance(local, bool) or not isinstance(local, int) or local < 0:
            raise ValueError(f"local_blocks must be an integer, 0 or more, got {local!r}.")
        if self.budget not in BUDGETS:
            raise ValueError(f"budget must be one of {', '.join(BUDGETS)}, got {self.budget!r}.")
        if not 0 <= self.rank_power < math.inf:
            raise ValueError(f"rank_power must be finite and 0 or more, got {self.rank_power}.")
        if self.budget == "layer" and self.sparsity is None:
            raise ValueError("a layer budget spends a sparsity; a threshold has no budget.")


@functools.lru_cache(maxsize=16)
def _causal(nb: int, device: torch.device, rows: int | None = None) -> torch.Tensor:
    """`[rows, nb]` bool: the causal blocks of the last `rows` block rows (default all nb)."""
    rows = nb if rows is None else rows
    return torch.ones(rows, nb, dtype=torch.bool, device=device).tril(nb - rows)


@functools.lru_cache(maxsize=16)
def _forced_on(nb: int, keep_sink: bool, local: int, dense_last_row: bool, device, rows=None):
    policy = MaskPolicy(
        sparsity=0.0, keep_sink=keep_sink, local_blocks=local, dense_last_row=dense_last_row
    )
    return _forced(nb, policy, rows).to(device)


def _window(rows: int, nb: int, local_blocks: int, first: int, device=None) -> torch.Tensor:
    """`[rows, nb]` bool: in block row first + r, the ``local_blocks`` key blocks before its
    diagonal (fewer near the start)."""
    row = torch.arange(first, first + rows, device=device)[:, None]
    col = torch.arange(nb, device=device)
    return (col < row) & (col >= row - local_blocks)


def _forced(nb: int, policy: MaskPolicy, rows: int | None = None) -> torch.Tensor:
    """Blocks kept whatever the scores: `[rows, nb]` bool for the last `rows` block rows
    (default all nb), on the CPU. The dense last row is block nb - 1's."""
    rows = nb if rows is None else rows
    forced = _window(rows, nb, policy.local_blocks, nb - rows)
    forced[:, nb - rows :].fill_diagonal_(True)
    if policy.keep_sink:
        forced[:, 0] = True
    if policy.dense_last_row and rows:
        forced[-1, :] = True
    return forced


def forced_blocks(nb: int, policy: MaskPolicy) -> torch.Tensor:
    """`[nb, nb]` bool, on the CPU: the blocks ``policy`` keeps whatever the scores."""
    return _forced(nb, policy)


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
    """Row budgets of a top-k selection over a prompt's whole block map, built once per shape
    and policy.

    rows: ranked rows (all but a dense last row); budgets [rows] int32 on the device: blocks to
    take per ranked row (host_budgets: the same on the CPU); k: the largest budget.
    """

    rows: int
    k: int
    budgets: torch.Tensor
    host_budgets: torch.Tensor


@functools.lru_cache(maxsize=16)
def _topk_plan(
    nb: int,
    sparsity: float,
    keep_sink: bool,
    local_blocks: int,
    dense_last_row: bool,
    device,
    with_diagonal: bool,
) -> _TopkPlan:
    """``with_diagonal`` False leaves the diagonal out of the budgets (the kernel computes it
    anyway). Cached: no host-to-device copy, and so no wait for the GPU, on every layer."""
    policy = MaskPolicy(
        sparsity=sparsity, keep_sink=keep_sink, local_blocks=local_blocks,
        dense_last_row=dense_last_row,
    )  # fmt: skip
    budgets = _row_budgets(_forced(nb, policy), policy) - (0 if with_diagonal else 1)
    rows = nb - 1 if dense_last_row else nb
    k = int(budgets[:rows].max()) if rows else 0
    host = budgets[:rows].to(torch.int32)
    return _TopkPlan(rows, k, host.to(device), host)


def _ranking_bias(
    rows: int, nb: int, policy: MaskPolicy, with_diagonal: bool, device, first: int = 0
) -> torch.Tensor:
    """[rows, nb] float32 added to the scores of block rows first, first + 1, … before top-k:
    -inf where a block is never ranked, +inf where it is forced (sink, local window, and the
    diagonal when ranked), 0 elsewhere. Built on the device each call rather than cached, so
    that it holds no memory between prefills."""
    never = torch.ones(rows, nb, dtype=torch.bool, device=device)
    never = never.triu(first + (1 if with_diagonal else 0))
    bias = torch.zeros(rows, nb, device=device).masked_fill_(never, -math.inf)
    bias.masked_fill_(_window(rows, nb, policy.local_blocks, first, device), math.inf)
    if with_diagonal:
        bias[:, first:].diagonal().fill_(math.inf)
    if policy.keep_sink:
        # Block row 0 has no sink to rank apart from its diagonal.
        bias[max((0 if with_diagonal else 1) - first, 0) :, 0] = math.inf
    return bias


def _plan_for(nb: int, policy: MaskPolicy, device, with_diagonal: bool) -> _TopkPlan:
    return _topk_plan(
        nb, policy.sparsity, policy.keep_sink, policy.local_blocks, policy.dense_last_row,
        device, with_diagonal,
    )  # fmt: skip


def _block_rows(scores: torch.Tensor, total_blocks: int | None) -> tuple[int, int]:
    """``(first, total)`` for scores `[..., rows, nb]`: their rows are block rows first … nb - 1
    (the last rows, as the kernel takes them) of a prompt of ``total`` blocks (default nb)."""
    if scores.dim() < 2 or scores.shape[-2] > scores.shape[-1]:
        raise ValueError(
            "scores must end in [query block rows, key blocks], the rows being the last key "
            f"blocks, got {tuple(scores.shape)}."
        )
    rows, nb = scores.shape[-2:]
    total = nb if total_blocks is None else total_blocks
    if total < nb:
        raise ValueError(f"a prompt of {total} blocks cannot have {nb} key blocks scored.")
    return nb - rows, total


def _ranked_rows(plan: _TopkPlan, first: int, rows: int) -> tuple[int, int]:
    """``(ranked, k)``: how many of the rows from block row ``first`` on are ranked (all but a
    dense last row) and the largest budget among them."""
    ranked = max(min(rows, plan.rows - first), 0)
    k = int(plan.host_budgets[first : first + ranked].max()) if ranked else 0
    return ranked, k


def _row_thresholds(threshold: float, nb: int, rows: int, device) -> torch.Tensor:
    """`[rows, 1]` float32: the score threshold of each of the last `rows` block rows, τ times
    the row's average score; row i (of nb) has i + 1 causal blocks."""
    causal_blocks = torch.arange(nb - rows + 1, nb + 1, dtype=torch.float32, device=device)
    return (threshold / causal_blocks).unsqueeze(-1)


def select_blocks(
    scores: torch.Tensor, policy: MaskPolicy, total_blocks: int | None = None
) -> torch.Tensor:
    """Block mask from block-causal scores.

    scores: `[b, H, nq, nb]` (any leading dims): the scores of block rows nb - nq … nb - 1 (all
    of them for a whole prompt; a prompt prefilled in chunks, or continuing a cache, scores
    its last rows), entries after each row's own block ignored. total_blocks: blocks of the
    whole prompt (default nb, this call ends it): budgets are those of the prompt's rows, and
    its last row is the dense one.
    Returns bool `[b, H, nq, nb]`: the forced blocks, plus the blocks scoring above τ times
    their row's average (the scores then being each row's softmax) or, under sparsity, each
    row's highest-scoring blocks up to its budget (forced blocks count inside the budget).
    Nothing after a row's own block is kept.
    """
    first, total = _block_rows(scores, total_blocks)
    rows, nb = scores.shape[-2:]
    device = scores.device
    causal = _causal(nb, device, rows)
    dense_row = policy.dense_last_row and nb == total
    forced = _forced_on(nb, policy.keep_sink, policy.local_blocks, dense_row, device, rows)
    if policy.threshold is not None:
        return (scores > _row_thresholds(policy.threshold, nb, rows, device)) & causal | forced

    if policy.budget == "layer":
        return _layer_budget_mask(scores, policy, total, causal, forced)
    plan = _plan_for(total, policy, device, with_diagonal=True)
    ranked, k = _ranked_rows(plan, first, rows)
    mask = torch.zeros(scores.shape, dtype=torch.bool, device=device)
    if k:
        bias = _ranking_bias(ranked, nb, policy, True, device, first)
        top = (scores[..., :ranked, :].float() + bias).topk(k, dim=-1).indices
        keep = torch.arange(k, device=device) < plan.budgets[first : first + ranked, None]
        mask[..., :ranked, :].scatter_(-1, top, keep.expand_as(top))
    # A -inf causal score can tie with the masked upper triangle; causality wins.
    return mask & causal | forced


@functools.lru_cache(maxsize=16)
def _forced_count(nb: int, keep_sink: bool, local: int, dense_last_row: bool, rows: int) -> int:
    """Forced blocks of the last ``rows`` block rows, counted on the CPU (no wait for a GPU)."""
    return int(_forced_on(nb, keep_sink, local, dense_last_row, torch.device("cpu"), rows).sum())


def layer_ranked_count(policy: MaskPolicy, total: int, nb: int, rows: int, device) -> int:
    """Blocks a layer budget keeps by rank in each map of block rows nb - rows … nb - 1 (keys
    so far: nb blocks) of a prompt of ``total`` blocks: the rows' budgets added up (a dense
    row's every block), less the forced blocks, at most the other causal blocks."""
    first = nb - rows
    plan = _plan_for(total, policy, device, with_diagonal=True)
    ranked, _ = _ranked_rows(plan, first, rows)
    dense_row = policy.dense_last_row and nb == total
    forced = _forced_count(nb, policy.keep_sink, policy.local_blocks, dense_row, rows)
    kept = int(plan.host_budgets[first : first + ranked].sum()) + (rows - ranked) * nb
    causal = rows * (2 * first + rows + 1) // 2  # rows first … first + rows - 1
    return min(max(kept - forced, 0), causal - forced)


@functools.lru_cache(maxsize=16)
def layer_rank_scale(total: int, power: float, device) -> torch.Tensor:
    """float32 [total] on the device: block row i's factor (i + 1)^power in a layer budget's
    rank, score · (i + 1)^power. Cached: no copy to the device on every layer."""
    return torch.arange(1, total + 1, dtype=torch.float32, device=device) ** power


def _layer_budget_mask(scores, policy: MaskPolicy, total: int, causal, forced):
    """:func:`select_blocks` under a layer budget: per sequence (the first dim of 4-d scores),
    every map keeps its forced blocks, and the blocks its rows' budgets add up to beyond them go
    to the highest ranks, score · (i + 1)^power, over all the sequence's maps."""
    rows, nb = scores.shape[-2:]
    keep = layer_ranked_count(policy, total, nb, rows, scores.device)
    sequences = scores.shape[0] if scores.dim() == 4 else 1
    scale = layer_rank_scale(total, policy.rank_power, scores.device)[nb - rows : nb]
    relative = scores.float() * scale[:, None]
    relative = relative.masked_fill(forced | ~causal, -math.inf).reshape(sequences, -1)
    maps = relative.shape[1] // (rows * nb)
    mask = forced.expand(scores.shape).reshape(sequences, -1).clone()
    if keep:
        top = relative.topk(keep * maps, dim=-1, sorted=False).indices
        mask.scatter_(-1, top, True)
    return mask.view(scores.shape)


def select_block_lists(
    scores: torch.Tensor, policy: MaskPolicy, total_blocks: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k selection straight into the kernel's input: per-row lists of kept key blocks.

    The same blocks as ``select_blocks`` under a sparsity policy (same arguments), without the
    diagonal (the kernel always computes it) and without building a mask. Any per-row monotonic
    transform of probabilities (e.g. gate logits) ranks the same.
    Returns (indices `[b, H, nq, w]` int32, counts `[b, H, nq]` int32): row r keeps
    ``indices[..., r, :counts[..., r]]``, in no particular order; slots past a row's count
    are unspecified.
    """
    if policy.sparsity is None or policy.budget != "row":
        raise ValueError("block lists come from a sparsity policy with row budgets; "
                         "select_blocks takes the others.")  # fmt: skip
    first, total = _block_rows(scores, total_blocks)
    *lead, rows, nb = scores.shape
    device = scores.device
    plan = _plan_for(total, policy, device, with_diagonal=False)
    ranked, k = _ranked_rows(plan, first, rows)
    dense_row = ranked < rows  # these rows end the prompt, whose last row is dense
    width = max(k, nb - 1 if dense_row else 0, 1)
    indices = torch.empty(*lead, rows, width, dtype=torch.int32, device=device)
    counts = torch.empty(rows, dtype=torch.int32, device=device)
    counts[:ranked] = plan.budgets[first : first + ranked]
    if k:
        bias = _ranking_bias(ranked, nb, policy, False, device, first)
        scored = scores[..., :ranked, :].float() + bias
        indices[..., :ranked, :k] = scored.topk(k, dim=-1).indices
    if dense_row:
        indices[..., rows - 1, : nb - 1] = torch.arange(nb - 1, dtype=torch.int32, device=device)
        counts[rows - 1] = nb - 1
    return indices, counts.expand(*lead, rows)


def kept_causal_blocks(mask: torch.Tensor) -> tuple[int, int]:
    """(kept, total) causal blocks of a block mask `[..., nq, nb]` (rows: the last nq blocks),
    for summing over layers."""
    rows, nb = mask.shape[-2:]
    first = nb - rows
    per_map = (nb * (nb + 1) - first * (first + 1)) // 2
    total = per_map * (mask.numel() // (rows * nb)) if rows * nb else 0
    kept = int((mask & _causal(nb, mask.device, rows)).sum())
    return kept, total


def achieved_sparsity(mask: torch.Tensor) -> float:
    """1 − kept causal blocks / causal blocks over the whole mask `[..., nq, nb]`."""
    kept, total = kept_causal_blocks(mask)
    return 1.0 - kept / total if total else 0.0
