"""Fixed block patterns that learned gates are measured against, written as block scores so that
they go through the same ``select_blocks`` policies (budgets, forced blocks) as the gates."""

import torch


def sink_local_scores(num_blocks: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Scores `[nb, nb]` (float32) that rank, in every row, the sink block first and then the key
    blocks from the most recent (the diagonal) backwards.

    Under ``select_blocks(scores, MaskPolicy(sparsity=s))`` each row keeps the sink and a local
    window of its most recent blocks, as wide as the row's budget allows. Broadcast or expand
    to `[b, H, nb, nb]` where a per-head map is needed.
    """
    scores = torch.arange(num_blocks, dtype=torch.float32, device=device).repeat(num_blocks, 1)
    scores[:, 0] = num_blocks
    return scores
