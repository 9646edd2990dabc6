"""Harvesting what gate distillation learns from: one frozen, dense forward pass per window.

An attention function registered as ``"seer_harvest"`` computes exact dense attention together
with the block attention map the gates learn: the max-pooled map of SeerAttention
(``pooled_attention`` on a GPU, its reference on the CPU), or the attention mass of each block
(``block_attention_mass``, the oracle that ``seer eval`` measures as oracle-mass); hooks pool
each layer's pre-RoPE queries and keys.
"""

import torch
from seer_gates import block_count, pool_keys, pool_queries
from seer_gates.distill import HarvestedWindow
from seer_kernels import pooled_attention, pooled_attention_reference
from transformers import AttentionInterface

from ..engine.attention import attention_kernel, block_rope, catch_pre_rope, causal_attention
from .selection import block_attention_mass

HARVEST_NAME = "seer_harvest"
# The block attention maps a harvest can take as the gates' target.
TARGETS = ("maxpool", "mass")


class Harvester:
    """Attach to a model for the duration of a ``with`` block; call ``window(input_ids)``.

    Harvested tensors stay on the model's device, where training then reads them."""

    def __init__(self, model, gate_hidden_size: int, target: str = "maxpool"):
        if target not in TARGETS:
            raise ValueError(f"unknown target {target!r}; one of {', '.join(TARGETS)}.")
        self.model = model
        self.gate_hidden_size = gate_hidden_size
        self.target = target
        self._pooled: dict[tuple[int, str], torch.Tensor] = {}
        self._targets: dict[int, torch.Tensor] = {}

    def __enter__(self):
        self._previous = self.model.config._attn_implementation
        self._hooks = catch_pre_rope(self.model, self._pool)
        for layer in self.model.model.layers:
            layer.self_attn.seer_harvester = self
        self.model.set_attn_implementation(HARVEST_NAME)
        return self

    def __exit__(self, *exc):
        for hook in self._hooks:
            hook.remove()
        for layer in self.model.model.layers:
            del layer.self_attn.seer_harvester
        self.model.set_attn_implementation(self._previous)

    def _pool(self, layer_idx: int, name: str, x: torch.Tensor) -> None:
        pool = pool_queries if name == "q" else pool_keys
        self._pooled[layer_idx, name] = pool(x)[0].float()

    def record_target(self, layer_idx: int, target: torch.Tensor) -> None:
        self._targets[layer_idx] = target[0]

    @torch.inference_mode()
    def window(self, input_ids: torch.Tensor) -> HarvestedWindow:
        """input_ids [1, s] → the window's pooled inputs and targets for every layer."""
        self.model(input_ids=input_ids.to(self.model.device), use_cache=False, logits_to_keep=1)
        layers = range(len(self.model.model.layers))
        nb = block_count(input_ids.shape[1])
        cos, sin = block_rope(self.model, self.gate_hidden_size, nb, 1, self.model.device)
        window = HarvestedWindow(
            pooled_q=torch.stack([self._pooled[i, "q"] for i in layers]),
            pooled_k=torch.stack([self._pooled[i, "k"] for i in layers]),
            target=torch.stack([self._targets[i] for i in layers]),
            cos=cos[0].float(),
            sin=sin[0].float(),
        )
        self._pooled.clear()
        self._targets.clear()
        return window


def harvest_attention_forward(module, query, key, value, attention_mask, scaling=None, **kwargs):
    """Dense causal attention that also hands the block attention map to the harvester."""
    harvester = module.seer_harvester
    if harvester.target == "mass":
        out, target = (
            causal_attention(query, key, value, scaling),
            block_attention_mass(query, key, scaling),
        )
    elif attention_kernel(query.device) == "triton":
        out, target = pooled_attention(query, key, value, scaling)
    else:
        out, target = pooled_attention_reference(query, key, value, scaling)
    harvester.record_target(module.layer_idx, target)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(HARVEST_NAME, harvest_attention_forward)
