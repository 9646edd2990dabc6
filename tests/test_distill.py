"""The distillation loss: KL between the harvested block attention map and the gates', and its
local-window form, where the blocks a policy keeps anyway are left out of both."""

import pytest
import torch
from seer_gates import GateConfig, block_rope_tables, build_gates, default_rotary
from seer_gates.distill import HarvestedWindow, distillation_loss, stack_windows

LAYERS, HQ, HKV, HEAD_DIM, HIDDEN, NB = 2, 4, 2, 16, 16, 11


def gates():
    torch.manual_seed(0)
    config = GateConfig(
        base_model="tiny", num_layers=LAYERS, num_q_heads=HQ, num_kv_heads=HKV,
        head_dim=HEAD_DIM, hidden_size=HIDDEN,
    )  # fmt: skip
    return build_gates(config)


def window(seed: int) -> HarvestedWindow:
    generator = torch.Generator().manual_seed(seed)
    causal = torch.ones(NB, NB, dtype=torch.bool).tril()
    raw = torch.rand(LAYERS, HQ, NB, NB, generator=generator) * causal
    cos, sin = block_rope_tables(default_rotary(HIDDEN), NB, 64, 1)
    return HarvestedWindow(
        pooled_q=torch.randn(LAYERS, NB, HQ, HEAD_DIM, generator=generator),
        pooled_k=torch.randn(LAYERS, NB, HKV, 3 * HEAD_DIM, generator=generator),
        target=raw / raw.sum(-1, keepdim=True),
        cos=cos[0],
        sin=sin[0],
    )


def with_mass_moved_to(batch: HarvestedWindow, blocks: torch.Tensor) -> HarvestedWindow:
    """The same window with extra target mass on ``blocks`` ([nb, nb] bool), rows renormalized."""
    target = batch.target + 3.0 * blocks
    target = target / target.sum(-1, keepdim=True)
    return HarvestedWindow(batch.pooled_q, batch.pooled_k, target, batch.cos, batch.sin)


@pytest.mark.parametrize("local_blocks", [1, 3])
def test_the_windowed_loss_ignores_the_blocks_kept_anyway(local_blocks):
    batch = stack_windows([window(1), window(2)], "cpu")
    rows, cols = torch.arange(NB)[:, None], torch.arange(NB)
    forced = (cols == rows) | (cols == 0) | ((cols < rows) & (cols >= rows - local_blocks))
    moved = with_mass_moved_to(batch, forced)
    model = gates()
    loss = distillation_loss(model, batch, local_blocks=local_blocks)
    assert torch.allclose(distillation_loss(model, moved, local_blocks=local_blocks), loss)
    # Without the window the same change matters.
    assert not torch.allclose(distillation_loss(model, moved), distillation_loss(model, batch))


def test_the_windowed_loss_has_finite_gradients_even_with_nothing_left_to_choose():
    model = gates()
    batch = stack_windows([window(3)], "cpu")
    for local_blocks in (2, NB):
        model.zero_grad()
        loss = distillation_loss(model, batch, local_blocks=local_blocks)
        loss.backward()
        assert torch.isfinite(loss)
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert distillation_loss(model, batch, local_blocks=NB) == 0
