"""SeerAttention inside transformers models, through ``transformers.AttentionInterface``.

During prefill (a prompt processed in one pass, no cache yet) every layer scores its 64×64
blocks — with the trained gates, from the pre-RoPE queries and keys caught by forward hooks, or
with the training-free pooled estimator — keeps blocks by the mask policy, and computes attention
on the kept blocks only. Decode steps, and anything else, go to transformers' own SDPA path.
"""

import copy
import os
from dataclasses import dataclass, field

import torch
from seer_gates import (
    MaskPolicy,
    block_count,
    block_rope_tables,
    pooled_qk_scores,
    select_block_lists,
    select_blocks,
)
from seer_kernels import (
    block_sparse_attention,
    block_sparse_attention_from_lists,
    block_sparse_attention_reference,
)
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .placement import layer_devices

ATTENTION_NAME = "seer"


def default_min_sparse_tokens(device: torch.device, sparsity: float | None) -> int:
    """Shortest prompt prefilled sparsely by default: where sparse attention, gates included,
    starts to beat the dense kernel. Measured on an H100 with ``seer profile kernel``
    (BENCHMARKS.md): at sparsity 0.9–0.95 from 16k tokens, at 0.5 from 32k; threshold mode
    takes the 16k of high sparsity. On the CPU the sparse reference pays from short prompts on.
    """
    if device.type != "cuda":
        return 0
    return 32768 if sparsity is not None and sparsity < 0.8 else 16384


def attention_kernel(device: torch.device) -> str:
    """The one place that picks the sparse attention kernel: ``triton`` on a GPU, else
    ``reference``; ``SEER_ATTENTION_KERNEL`` overrides (tests force ``triton`` on the CPU
    under the Triton interpreter)."""
    forced = os.environ.get("SEER_ATTENTION_KERNEL")
    if forced:
        return forced
    return "triton" if device.type == "cuda" else "reference"


@dataclass
class SparsityStats:
    """Kept and causal block counts per layer, summed over heads.

    Kept counts stay on the device until read, so recording them never waits for the GPU.
    """

    kept: dict[int, torch.Tensor | int] = field(default_factory=dict)
    total: dict[int, int] = field(default_factory=dict)

    def record(self, layer: int, kept: torch.Tensor | int, total: int) -> None:
        self.kept[layer] = self.kept.get(layer, 0) + kept
        self.total[layer] = self.total.get(layer, 0) + total

    def clear(self) -> None:
        self.kept.clear()
        self.total.clear()

    def overall(self) -> float | None:
        total = sum(self.total.values())
        return 1 - sum(int(kept) for kept in self.kept.values()) / total if total else None

    def per_layer(self) -> list[float]:
        return [1 - int(self.kept[layer]) / self.total[layer] for layer in sorted(self.total)]


class SparsePrefill:
    """Sparse prefill for one loaded model.

    Args:
        model: a transformers causal LM of the Llama, Mistral, Qwen2 or Qwen3 family.
        policy: how gate scores become block masks.
        gates: one AttnGate per layer, or None for the training-free pooled estimator.
        min_tokens: prompts shorter than this are prefilled densely (where sparsity does not pay).
    """

    def __init__(
        self, model, policy: MaskPolicy, gates: torch.nn.ModuleList | None, min_tokens: int = 0
    ):
        self.model = model
        self.min_tokens = min_tokens
        self.policy = policy
        self.gates = gates
        self.stats = SparsityStats()
        self._captured: dict[int, dict[str, torch.Tensor]] = {}
        self._rope_cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self._hooks = []
        self._attach()

    # --- set-up ---

    def _attach(self) -> None:
        for layer in self.model.model.layers:
            layer.self_attn.seer_prefill = self
        if self.gates is not None:
            # On a model spread over devices, each gate lives where its layer computes.
            for gate, device in zip(self.gates, layer_devices(self.model), strict=True):
                gate.to(device)
            self._hooks = catch_pre_rope(self.model, self._store)
        self.model.set_attn_implementation(ATTENTION_NAME)

    def detach(self) -> None:
        for hook in self._hooks:
            hook.remove()
        for layer in self.model.model.layers:
            del layer.self_attn.seer_prefill
        self.model.set_attn_implementation("sdpa")

    def _store(self, layer_idx: int, name: str, x: torch.Tensor) -> None:
        self._captured.setdefault(layer_idx, {})[name] = x

    # --- per layer, during prefill ---

    def attend(self, layer_idx: int, q, k, v, scaling: float | None) -> torch.Tensor:
        """Sparse causal attention of one layer. q: [b, Hq, s, d], k/v: [b, Hkv, s, d]."""
        b, hq, s, _ = q.shape
        nb = block_count(s)
        causal_blocks = b * hq * nb * (nb + 1) // 2
        if self.policy.sparsity == 0 or s < self.min_tokens:
            # Nothing to skip, or too short to pay: dense attention, the dense kernel does it best.
            self._captured.pop(layer_idx, None)
            self.stats.record(layer_idx, causal_blocks, causal_blocks)
            return torch.nn.functional.scaled_dot_product_attention(
                q, k, v, is_causal=True, scale=scaling, enable_gqa=hq != k.shape[1]
            )
        if attention_kernel(q.device) == "triton" and self.policy.sparsity is not None:
            # Top-k straight to the kernel's block lists: no mask to build and list again.
            indices, counts = select_block_lists(
                self._scores(layer_idx, q, k, probabilities=False), self.policy
            )
            self.stats.record(layer_idx, counts.sum() + b * hq * nb, causal_blocks)
            return block_sparse_attention_from_lists(q, k, v, indices, counts, scaling)
        mask = select_blocks(self._scores(layer_idx, q, k), self.policy)
        causal = torch.ones(nb, nb, dtype=torch.bool, device=mask.device).tril()
        self.stats.record(layer_idx, (mask & causal).sum(), causal_blocks)
        if attention_kernel(q.device) == "triton":
            return block_sparse_attention(q, k, v, mask, scaling)
        return block_sparse_attention_reference(q, k, v, mask, scaling)

    def _scores(self, layer_idx: int, q, k, probabilities: bool = True) -> torch.Tensor:
        """Block scores [b, Hq, nb, nb]; with ``probabilities`` False the gates may return
        logits, which rank the blocks of a row the same and save a softmax."""
        if self.gates is None:
            return pooled_qk_scores(q, k)
        captured = self._captured.pop(layer_idx)
        cos, sin = self._block_rope(block_count(q.shape[2]), q.shape[0], q.device)
        return self.gates[layer_idx](
            captured["q"], captured["k"], cos, sin, probabilities=probabilities
        )

    def _block_rope(self, num_blocks: int, batch: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """The tables of the current prompt shape, one copy per device the layers run on."""
        # The rotary module in place tells native from scaled RoPE (ModelContext switches it).
        key = (num_blocks, batch, self.model.model.rotary_emb, device)
        if key not in self._rope_cache:
            tables = block_rope(self.model, self.gates[0].hidden_size, num_blocks, batch, device)
            kept = {k: v for k, v in self._rope_cache.items() if k[:3] == key[:3]}
            self._rope_cache = {**kept, key: tables}
        return self._rope_cache[key]


def block_rope(model, hidden_size: int, num_blocks: int, batch: int, device):
    """Gate RoPE tables ``(cos, sin)`` ``[batch, nb, h]`` at block positions, from the model's
    rotary module in place (its class, theta and scaling, which ``ModelContext`` switches by
    prompt length) at the gate's width."""
    rotary = model.model.rotary_emb
    config = copy.deepcopy(rotary.config)
    config.head_dim = hidden_size
    rotary = type(rotary)(config=config).to(device)
    probe = torch.empty(1, device=device, dtype=torch.float32)
    return block_rope_tables(
        lambda positions: rotary(probe, positions), num_blocks, 64, batch, device
    )


def catch_pre_rope(model, store) -> list:
    """Forward hooks that pass each layer's pre-RoPE queries and keys of a prompt (more than
    one token) to ``store(layer_idx, "q" | "k", x [b, s, H, d])``. Returns the hook handles."""
    handles = []
    for layer_idx, layer in enumerate(model.model.layers):
        attn = layer.self_attn
        # Qwen3 normalizes q and k per head before RoPE: the gates read the normalized ones.
        q_mod, k_mod = (
            (attn.q_norm, attn.k_norm) if hasattr(attn, "q_norm") else (attn.q_proj, attn.k_proj)
        )
        for name, module in (("q", q_mod), ("k", k_mod)):

            def hook(
                module, inputs, output, layer_idx=layer_idx, name=name, head_dim=attn.head_dim
            ):
                if output.shape[1] > 1:
                    store(layer_idx, name, output.view(*output.shape[:2], -1, head_dim))

            handles.append(module.register_forward_hook(hook))
    return handles


def seer_attention_forward(module, query, key, value, attention_mask, scaling=None, **kwargs):
    """Attention function registered as ``"seer"``: sparse on prefill, SDPA otherwise."""
    prefill = getattr(module, "seer_prefill", None)
    q_len, kv_len = query.shape[2], key.shape[2]
    if prefill is None or q_len == 1 or q_len != kv_len or attention_mask is not None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, **kwargs
        )
    out = prefill.attend(module.layer_idx, query, key, value, scaling)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(ATTENTION_NAME, seer_attention_forward)
# Masks as for SDPA: none at all for an unpadded causal prompt, so prefill sees attention_mask None.
AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
