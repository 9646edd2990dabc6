"""Self-distillation of the gates on harvested tensors (SeerAttention, arXiv 2410.13276).

The base model is frozen and distillation uses dense attention, so for one text window every
layer's pooled queries, pooled keys and target block map are fixed: they are harvested once and
the gates train on them for as many steps as wanted. Shapes: L layers, nb blocks.
"""

from dataclasses import dataclass

import torch
from torch import nn

from .policy import MaskPolicy, forced_blocks, select_blocks


@dataclass
class HarvestedWindow:
    """One text window seen by the frozen model.

    pooled_q: [L, nb, Hq, d]; pooled_k: [L, nb, Hkv, 3d]; target: [L, Hq, nb, nb], each row the
    max-pooled attention map normalized to sum 1; cos, sin: [nb, h] block RoPE tables.
    """

    pooled_q: torch.Tensor
    pooled_k: torch.Tensor
    target: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor


def stack_windows(windows: list[HarvestedWindow], device) -> HarvestedWindow:
    """Batch windows of equal length: every field gains a leading batch axis."""
    return HarvestedWindow(
        *(torch.stack([getattr(w, name) for w in windows]).to(device)
          for name in ("pooled_q", "pooled_k", "target", "cos", "sin"))
    )  # fmt: skip


def gate_log_probs(gates: nn.ModuleList, batch: HarvestedWindow) -> torch.Tensor:
    """Log-softmax of every layer's gate logits: [L, B, Hq, nb, nb], -inf above the diagonal."""
    return torch.stack([
        gate.logits(batch.pooled_q[:, layer], batch.pooled_k[:, layer], batch.cos, batch.sin)
        .log_softmax(dim=-1)
        for layer, gate in enumerate(gates)
    ])  # fmt: skip


def distillation_loss(
    gates: nn.ModuleList, batch: HarvestedWindow, skip_rows: float = 0.25, local_blocks: int = 0
):
    """KL(target ‖ gate) per block row, averaged over rows, heads, layers and windows.

    The first ``skip_rows`` share of block rows is left out: with few causal blocks to choose
    from, early rows carry little signal. With ``local_blocks`` the blocks that policy keeps
    whatever the scores (diagonal, sink, that local window) are left out of both distributions,
    each renormalized over the rest: the gates learn to rank only the blocks they choose.
    """
    log_q = gate_log_probs(gates, batch)
    target = batch.target.transpose(0, 1)  # [L, B, Hq, nb, nb]
    if local_blocks:
        target, log_q = _beyond_forced(target, log_q, local_blocks)
    causal = target > 0
    # Where the target is 0 the term is 0; masking first keeps -inf · 0 out of the sum.
    terms = torch.where(causal, target * (target.clamp_min(1e-30).log() - log_q), 0.0)
    per_row = terms.sum(dim=-1)
    first = int(per_row.shape[-1] * skip_rows)
    return per_row[..., first:].mean()


def _beyond_forced(target: torch.Tensor, log_q: torch.Tensor, local_blocks: int):
    """Target and gate log-probabilities renormalized over the blocks a policy with this local
    window does not force; rows with none left get an all-zero target."""
    nb = target.shape[-1]
    policy = MaskPolicy(sparsity=0.0, local_blocks=local_blocks, dense_last_row=False)
    free = ~forced_blocks(nb, policy).to(target.device)
    target = target * free
    mass = target.sum(dim=-1, keepdim=True)
    target = torch.where(mass > 0, target / mass.clamp_min(1e-30), 0.0)
    # A finite stand-in for the forced blocks keeps rows with nothing free out of NaN gradients.
    log_norm = torch.where(free, log_q, -1e4).logsumexp(dim=-1, keepdim=True)
    return target, log_q - log_norm


def attention_recall(target: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean share of each row's target mass inside the kept blocks."""
    return float((target * mask).sum(dim=-1).mean())


@torch.no_grad()
def evaluate(
    gates: nn.ModuleList,
    windows: list[HarvestedWindow],
    sparsity: float,
    device,
    local_blocks: int = 0,
) -> dict:
    """Validation loss, and attention recall of the gates and of the oracle at ``sparsity``
    (with that local window kept too)."""
    batch = stack_windows(windows, device)
    policy = MaskPolicy(sparsity=sparsity, local_blocks=local_blocks)
    target = batch.target.transpose(0, 1)
    scores = gate_log_probs(gates, batch).exp()
    return {
        "loss": float(distillation_loss(gates, batch, local_blocks=local_blocks)),
        "recall": attention_recall(target, select_blocks(scores, policy)),
        "oracle_recall": attention_recall(target, select_blocks(target, policy)),
    }


class Distiller:
    """Trains gate parameters only: AdamW, linear warm-up then cosine decay, seeded batches.

    Everything that a resumed run needs is in ``state_dict``.
    """

    def __init__(self, gates: nn.ModuleList, *, steps: int, lr: float = 1e-3, warmup: int = 20,
                 batch_size: int = 4, seed: int = 0, local_blocks: int = 0):  # fmt: skip
        self.gates = gates
        self.local_blocks = local_blocks
        self.steps = steps
        self.batch_size = batch_size
        self.step = 0
        self.optimizer = torch.optim.AdamW(gates.parameters(), lr=lr, weight_decay=0.0)
        warmup = max(1, min(warmup, steps - 1)) if steps > 1 else 1
        self.scheduler = torch.optim.lr_scheduler.SequentialLR(
            self.optimizer,
            [
                torch.optim.lr_scheduler.LinearLR(self.optimizer, 1 / warmup, total_iters=warmup),
                torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, max(1, steps - warmup)),
            ],
            milestones=[warmup],
        )
        self.generator = torch.Generator().manual_seed(seed)

    def train_step(self, windows: list[HarvestedWindow], device) -> float:
        """One optimizer step on a random batch of windows; returns the loss."""
        picks = torch.randperm(len(windows), generator=self.generator)[: self.batch_size]
        batch = stack_windows([windows[i] for i in picks.tolist()], device)
        loss = distillation_loss(self.gates, batch, local_blocks=self.local_blocks)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        return loss.item()

    def state_dict(self) -> dict:
        return {
            "step": self.step,
            "gates": self.gates.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.step = state["step"]
        self.gates.load_state_dict(state["gates"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.generator.set_state(state["generator"])
