"""Block selections measured against the true attention: the block-summed attention mass (an
oracle), recall of each estimator's selection at equal sparsity, and sparse prefills whose scores
come from an estimator other than the gates.

Shapes: b batch, s tokens, nb = ceil(s / 64) blocks, Hq query heads, Hkv key/value heads,
d head dim.
"""

import contextlib
import math
from collections import defaultdict
from collections.abc import Callable

import torch
import torch.nn.functional as F
from seer_gates import (
    MaskPolicy,
    achieved_sparsity,
    block_count,
    pool_keys,
    pooled_qk_scores,
    select_blocks,
)
from seer_gates.baselines import sink_local_scores
from seer_gates.distill import attention_recall
from seer_kernels import BLOCK, kept_block_indices, pooled_attention, pooled_attention_reference

from ..engine.attention import SparsePrefill, attention_kernel

# Attention probabilities held at once (elements) while summing them into blocks (~256 MB fp32).
_CHUNK_ELEMENTS = 1 << 26


def block_attention_mass(
    q: torch.Tensor, k: torch.Tensor, scaling: float | None = None
) -> torch.Tensor:
    """True causal attention summed over key blocks and averaged over the tokens of each query
    block: ``mass[i, j]`` = mean over rows r of block i of Σ_{c in block j} P[r, c].

    q: `[b, Hq, s, d]`, k: `[b, Hkv, s, d]` post-RoPE (query head h reads key head
    h // (Hq // Hkv)); scaling defaults to 1/sqrt(d). Returns float32 `[b, Hq, nb, nb]`, each row
    summing to 1 over j ≤ i. Works through chunks of query blocks, so memory grows with the
    chunk, never with s².
    """
    b, hq, s, d = q.shape
    hkv = k.shape[1]
    nb = block_count(s)
    scale = d**-0.5 if scaling is None else scaling
    keys = k.float().unsqueeze(2).transpose(-1, -2)  # [b, Hkv, 1, d, s]
    positions = torch.arange(s, device=q.device)
    mass = torch.zeros(b, hq, nb, nb, dtype=torch.float32, device=q.device)
    rows_per_chunk = max(1, _CHUNK_ELEMENTS // (hq * BLOCK * nb * BLOCK))
    for first in range(0, nb, rows_per_chunk):
        last = min(first + rows_per_chunk, nb)
        start, stop = first * BLOCK, min(last * BLOCK, s)
        queries = q[:, :, start:stop].float().view(b, hkv, hq // hkv, stop - start, d)
        # [b, Hkv, group, rows, stop]: keys past the chunk's last query are all masked out.
        logits = (queries @ keys[..., :stop]) * scale
        causal = positions[:stop] <= positions[start:stop, None]
        probs = logits.masked_fill(~causal, -math.inf).softmax(dim=-1)
        # Zero-pad queries and keys to whole blocks: [b, Hq, R, BLOCK, last, BLOCK].
        probs = F.pad(probs, (0, last * BLOCK - stop, 0, last * BLOCK - stop))
        probs = probs.reshape(b, hq, last - first, BLOCK, last, BLOCK)
        tokens = (s - positions[start:stop:BLOCK]).clamp(max=BLOCK)  # [R] queries per block
        mass[:, :, first:last, :last] = probs.sum(dim=(3, 5)) / tokens[:, None]
    return mass


def _sink_local(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """``sink_local_scores`` for post-RoPE q `[b, Hq, s, d]`: `[b, Hq, nb, nb]`."""
    nb = block_count(q.shape[2])
    return sink_local_scores(nb, q.device).expand(q.shape[0], q.shape[1], nb, nb)


def selection_recall(
    mass: torch.Tensor, estimates: dict[str, torch.Tensor], sparsities: list[float]
) -> dict[tuple[str, float], float]:
    """Recall of every estimate's block selection at every sparsity.

    mass: `[b, Hq, nb, nb]` from ``block_attention_mass``; estimates: name → scores of the same
    shape (or broadcastable to it). Every selection goes through ``select_blocks`` with
    ``MaskPolicy(sparsity=s)``, so budgets and forced blocks are the same for all. Returns
    (name, sparsity) → the share of the mass inside the kept blocks, averaged over rows and heads.
    """
    return {
        (name, sparsity): attention_recall(
            mass, select_blocks(scores, MaskPolicy(sparsity=sparsity))
        )
        for sparsity in sparsities
        for name, scores in estimates.items()
    }


def topk_sparsity(num_blocks: int, sparsity: float) -> float:
    """Achieved sparsity of top-k selection on an `nb`-block map: the same for any scores."""
    mask = select_blocks(torch.zeros(num_blocks, num_blocks), MaskPolicy(sparsity=sparsity))
    return achieved_sparsity(mask)


# Scores from post-RoPE q, k alone; attention scaling is 1/sqrt(d) in every supported family.
POST_ROPE_SCORES = {"oracle-mass": block_attention_mass, "sink+local": _sink_local}


@contextlib.contextmanager
def attached(prefill: SparsePrefill | None):
    """Yield ``prefill`` (already attached on creation; None for dense) and detach it after."""
    try:
        yield prefill
    finally:
        if prefill is not None:
            prefill.detach()


class ScoredPrefill(SparsePrefill):
    """Sparse prefill whose block scores come from ``score(q, k)`` on the post-RoPE queries and
    keys (`[b, Hq, s, d]`, `[b, Hkv, s, d]` → `[b, Hq, nb, nb]`) instead of gates."""

    def __init__(self, model, policy: MaskPolicy, score: Callable):
        self.score = score
        super().__init__(model, policy, gates=None)

    def _scores(self, layer_idx: int, q, k, *context) -> torch.Tensor:
        return self.score(q, k)

    def _block_lists(self, layer_idx: int, q, k, *context):
        # No fused kernel for these scores: the PyTorch selection, listed for the kernel.
        return kept_block_indices(select_blocks(self.score(q, k), self.policy))


class RecallProbe(SparsePrefill):
    """Dense attention that measures, layer by layer, how much of the true attention mass each
    estimator's block selection keeps at each sparsity, then lets the maps go.

    Attached on creation; run ``window(ids)`` for each window, read ``recall`` (estimator,
    sparsity) → one value per layer and window, and ``detach()`` when done.
    """

    def __init__(self, model, gates: torch.nn.ModuleList, sparsities: list[float]):
        # The policy is not used: ``attend`` applies every sparsity to every estimator.
        super().__init__(model, MaskPolicy(sparsity=0.0), gates)
        self.sparsities = sparsities
        self.recall: dict[tuple[str, float], list[float]] = defaultdict(list)

    @torch.inference_mode()
    def window(self, ids: torch.Tensor) -> None:
        """One dense forward pass over ids `[s]`, measuring every layer."""
        self.model.model(input_ids=ids[None].to(self.model.device), use_cache=False)

    def attend(self, layer_idx: int, q, k, v, scaling: float | None, prompt_end=None):
        if attention_kernel(q.device) == "triton":
            out, maxpool = pooled_attention(q, k, v, scaling)
        else:
            out, maxpool = pooled_attention_reference(q, k, v, scaling)
        mass = block_attention_mass(q, k, scaling)
        # A window is a whole prompt (no cache): its own keys are all the keys.
        captured = self._captured.pop(layer_idx)
        gates = self._scores(layer_idx, q, k, captured, pool_keys(captured["k"]), mass.shape[-1])
        estimates = {
            "gates": gates,
            "oracle-mass": mass,
            "oracle-maxpool": maxpool,
            "pooled": pooled_qk_scores(q, k),
            "sink+local": _sink_local(q, k),
        }
        for key, value in selection_recall(mass, estimates, self.sparsities).items():
            self.recall[key].append(value)
        return out
