"""SeerAttention inside transformers models, through ``transformers.AttentionInterface``.

During prefill every layer scores its 64×64 blocks — with the trained gates, from the pre-RoPE
queries and keys caught by forward hooks, or with the training-free pooled estimator — keeps
blocks by the mask policy, and computes attention on the kept blocks only. A prefill is a whole
prompt, a chunk of one (``generation.prefill``'s ubatch) or a prompt continuing a cache: its
queries are the last positions of the cached keys, scored against every key block so far.
Decode steps and padded batches go to transformers' own SDPA path.
"""

import copy
import os
from dataclasses import dataclass, field

import torch
from seer_gates import (
    MaskPolicy,
    block_count,
    block_rope_tables,
    gate_block_lists,
    pool_keys,
    pool_queries,
    pooled_block_lists,
    pooled_qk_scores,
    select_block_lists,
    select_blocks,
)
from seer_kernels import (
    BLOCK,
    block_sparse_attention_cpu,
    block_sparse_attention_from_lists,
    block_sparse_attention_reference,
    can_compile_ahead,
    compiling_ahead,
    kept_block_indices,
    rotary_embedding_pair,
)
from torch.nn.attention.bias import causal_lower_right
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, causal_mask_function, sdpa_mask

from .context import rope_parameters_at_width, rotary_module
from .errors import SeerError
from .fused_layers import rotary_is_fused, tap_next_rotary
from .past_keys import PastKeys
from .placement import layer_devices

ATTENTION_NAME = "seer"
KERNELS = ("triton", "cpu", "reference")


def default_min_sparse_tokens(
    device: torch.device, sparsity: float | None, dtype: torch.dtype = torch.float32
) -> int:
    """Shortest prompt prefilled sparsely by default: where sparse attention, gates included,
    starts to beat the dense kernel. Measured on an H100 with ``seer profile kernel``
    (BENCHMARKS.md): at sparsity 0.9–0.95 from 16k tokens, at 0.5 from 32k; threshold mode
    takes the 16k of high sparsity. On the CPU in float32 seer's kernel pays from short prompts
    on; in bfloat16 (a CPU with AMX) the default model's sparse 0.9 prefill tied dense at 2048
    tokens (0.74 s each) and won from 3072 (0.99–1.05 against 1.18–1.22 s; the kernel's
    bfloat16 products, 2-core Xeon)."""
    if device.type != "cuda":
        return 3072 if dtype == torch.bfloat16 else 0
    return 32768 if sparsity is not None and sparsity < 0.8 else 16384


def attention_kernel(device: torch.device) -> str:
    """The one place that picks the sparse attention kernel: ``triton`` on a GPU, ``cpu`` (the
    C++ kernel, built once per machine) on the CPU. ``SEER_ATTENTION_KERNEL`` overrides with
    ``triton`` (tests, on the CPU under the Triton interpreter), ``cpu`` or ``reference`` (the
    plain-PyTorch reference)."""
    forced = os.environ.get("SEER_ATTENTION_KERNEL")
    if forced:
        if forced not in KERNELS:
            raise SeerError(
                f"SEER_ATTENTION_KERNEL must be one of {', '.join(KERNELS)}, got {forced!r}."
            )
        return forced
    return "triton" if device.type == "cuda" else "cpu"


@dataclass
class SparsityStats:
    """Kept and causal block counts per layer, summed over heads.

    Kept counts stay on the device, unsummed, until read: recording one launches nothing and
    never waits for the GPU.
    """

    parts: dict[int, list[tuple[torch.Tensor | int, bool]]] = field(default_factory=dict)
    total: dict[int, int] = field(default_factory=dict)

    def record(
        self, layer: int, kept: torch.Tensor | int, total: int, diagonals: bool = False
    ) -> None:
        """Add a layer's kept and causal blocks. kept: a count, or a tensor of counts (summed when
        read); ``diagonals``: each of its elements is a list row, which keeps its diagonal too."""
        self.parts.setdefault(layer, []).append((kept, diagonals))
        self.total[layer] = self.total.get(layer, 0) + total

    def clear(self) -> None:
        self.parts.clear()
        self.total.clear()

    def kept(self) -> dict[int, int]:
        """Kept blocks per layer."""
        return {layer: sum(_count(*part) for part in parts) for layer, parts in self.parts.items()}

    def overall(self) -> float | None:
        total = sum(self.total.values())
        return 1 - sum(self.kept().values()) / total if total else None

    def per_layer(self) -> list[float]:
        kept = self.kept()
        return [1 - kept[layer] / self.total[layer] for layer in sorted(self.total)]


def _count(kept: torch.Tensor | int, diagonals: bool) -> int:
    if not isinstance(kept, torch.Tensor):
        return kept
    return int(kept.sum()) + (kept.numel() if diagonals else 0)


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
        self._compiled_shapes: set[tuple] = set()
        self._hooks = []
        self._past_keys: PastKeys | None = None
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
            self._past_keys = PastKeys(self.model)
        # The fused RoPE pass reads every query and key: the gates' block pools come from it.
        self._pool_in_rope = rotary_is_fused(self.model)
        self.model.set_attn_implementation(ATTENTION_NAME)

    def use(self, gates: torch.nn.ModuleList | None, policy: MaskPolicy) -> None:
        """Score the next prompts with ``gates`` (None: the pooled estimator) under ``policy``.
        Switching from gates to the estimator keeps the gates' hooks: a later prompt that
        continues the cache with the gates again finds its pooled keys up to date."""
        self.gates, self.policy = gates, policy

    @property
    def scoring(self) -> str:
        return "pooled" if self.gates is None else "gates"

    def detach(self) -> None:
        for hook in self._hooks:
            hook.remove()
        if self._past_keys is not None:
            self._past_keys.remove()
        for layer in self.model.model.layers:
            del layer.self_attn.seer_prefill
        self.model.set_attn_implementation("sdpa")

    def _store(self, layer_idx: int, name: str, x: torch.Tensor) -> None:
        self._captured.setdefault(layer_idx, {})[name] = x
        # The layer's RoPE comes next, after its keys: its pass pools for the gates.
        if (
            name == "k"
            and self.gates is not None
            and self._pool_in_rope
            and attention_kernel(x.device) == "triton"
        ):
            tap_next_rotary(lambda q, k, cos, sin: self._rotate_and_pool(layer_idx, q, k, cos, sin))

    def _rotate_and_pool(self, layer_idx: int, q, k, cos, sin):
        """The fused RoPE of one layer's prompt queries and keys, which also keeps their pre-RoPE
        block pools (blocks of 64 from the first token of this pass) for the gates."""
        q_rotated, k_rotated, q_pooled, k_pooled = rotary_embedding_pair(q, k, cos, sin, pools=True)
        self._store(layer_idx, "q_pooled", q_pooled)
        self._store(layer_idx, "k_pooled", k_pooled)
        return q_rotated, k_rotated

    # --- per layer, during prefill ---

    def attend(
        self, layer_idx: int, q, k, v, scaling: float | None, prompt_end: int | None = None
    ) -> torch.Tensor:
        """Sparse causal attention of one layer. q: [b, Hq, sq, d], the last sq positions of
        k/v: [b, Hkv, s, d] (sq = s for a whole prompt in one pass). prompt_end: the cache length
        once the whole prompt is in, when this is one of its chunks (default s: it ends here),
        for the policy's budgets and its dense last row."""
        b, hq, sq, _ = q.shape
        s = k.shape[2]
        nb, first = block_count(s), (s - sq) // 64
        rows = nb - first
        causal_blocks = b * hq * (nb * (nb + 1) - first * (first + 1)) // 2
        captured = self._captured.pop(layer_idx, None)
        if self.policy.sparsity == 0:
            self.stats.record(layer_idx, causal_blocks, causal_blocks)
            return causal_attention(q, k, v, scaling)
        # Kept up to date even where this call is dense: later chunks score against these keys.
        # A whole prompt in one pass has no later chunk: its gates pool the keys themselves
        # (inside the fused kernels), and a later prompt continuing the cache recovers them.
        one_pass = sq == s and (prompt_end is None or prompt_end == s)
        pooled_keys = (
            None
            if captured is None or one_pass
            else self._past_keys.extend(layer_idx, captured["k"], k)
        )
        if s < self.min_tokens:
            # Too short to pay: dense attention, the dense kernel does it best.
            self.stats.record(layer_idx, causal_blocks, causal_blocks)
            return causal_attention(q, k, v, scaling)
        total_blocks = block_count(prompt_end or s)
        kernel = attention_kernel(q.device)
        if kernel == "triton":
            self._compile_ahead(layer_idx, q, k, v, scaling, captured, pooled_keys, total_blocks)
            # Gate scoring and selection fused into a few launches, straight to the kernel's lists.
            indices, counts = self._block_lists(
                layer_idx, q, k, captured, pooled_keys, total_blocks
            )
            self.stats.record(layer_idx, counts, causal_blocks, diagonals=True)
            return block_sparse_attention_from_lists(q, k, v, indices, counts, scaling)
        scores = self._scores(layer_idx, q, k, captured, pooled_keys, total_blocks)
        if kernel == "cpu":
            indices, counts = kept_lists(scores, self.policy, total_blocks)
            del scores
            self.stats.record(layer_idx, counts, causal_blocks, diagonals=True)
            return block_sparse_attention_cpu(q, k, v, indices, counts, scaling)
        mask = select_blocks(scores, self.policy, total_blocks)
        causal = torch.ones(rows, nb, dtype=torch.bool, device=mask.device).tril(first)
        self.stats.record(layer_idx, mask & causal, causal_blocks)
        return block_sparse_attention_reference(q, k, v, mask, scaling)

    def _compile_ahead(self, layer_idx, q, k, v, scaling, captured, pooled_keys, total_blocks):
        """Once per shape and scoring in this process: a dry run of the Triton path that
        compiles its three kernels side by side, where the real run would compile them one
        after another (a first run after install; seconds on a GPU)."""
        shape = (q.shape, k.shape, q.dtype, q.device, total_blocks, self.scoring, repr(self.policy))
        if shape in self._compiled_shapes or not can_compile_ahead(q.device):
            return
        with compiling_ahead():
            indices, counts = self._block_lists(
                layer_idx, q, k, captured, pooled_keys, total_blocks
            )
            block_sparse_attention_from_lists(q, k, v, indices, counts, scaling)
        self._compiled_shapes.add(shape)

    def _block_lists(self, layer_idx: int, q, k, captured, pooled_keys, total_blocks: int):
        """The Triton path's per-row lists (indices, counts) of the query blocks, from the fused
        gate kernels: the same blocks as ``select_blocks`` on ``_scores``."""
        if self.gates is None:
            return pooled_block_lists(q, k, self.policy, total_blocks)
        cos, sin = self._block_rope(total_blocks, q.shape[0], q.device)
        # Pools from the RoPE pass where they lie on the grid of blocks (queries that start a
        # block; keys of a whole prompt); one pass: raw keys, pooled in the kernel; else the
        # keys pooled so far.
        queries, query_tokens = captured["q"], None
        if "q_pooled" in captured and (k.shape[2] - q.shape[2]) % BLOCK == 0:
            queries, query_tokens = captured["q_pooled"], q.shape[2]
        if pooled_keys is not None:
            keys, key_tokens = pooled_keys, k.shape[2]
        elif "k_pooled" in captured:
            keys, key_tokens = captured["k_pooled"], k.shape[2]
        else:
            keys, key_tokens = captured["k"], None
        return gate_block_lists(
            self.gates[layer_idx], queries, keys, cos, sin, self.policy, total_blocks,
            key_tokens=key_tokens, query_tokens=query_tokens,
        )  # fmt: skip

    def _scores(self, layer_idx: int, q, k, captured, pooled_keys, total_blocks: int):
        """Block scores [b, Hq, rows, nb] of the query blocks against every key block so far
        (the PyTorch path)."""
        if self.gates is None:
            return pooled_qk_scores(q, k)
        # Tables for the whole prompt, built once per prompt; a chunk takes its first blocks.
        cos, sin = self._block_rope(total_blocks, q.shape[0], q.device)
        if pooled_keys is None:  # one pass
            pooled_keys = pool_keys(captured["k"])
        nb = pooled_keys.shape[1]
        q_pooled = pool_queries(captured["q"], start=k.shape[2] - q.shape[2])
        logits = self.gates[layer_idx].logits(q_pooled, pooled_keys, cos[:, :nb], sin[:, :nb])
        return logits.softmax(dim=-1)

    def _block_rope(self, num_blocks: int, batch: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """The tables of the current prompt shape, one copy per device the layers run on."""
        # The rotary module in place tells native from scaled RoPE (ModelContext switches it).
        key = (num_blocks, batch, self.model.model.rotary_emb, device)
        if key not in self._rope_cache:
            tables = block_rope(self.model, self.gates[0].hidden_size, num_blocks, batch, device)
            kept = {k: v for k, v in self._rope_cache.items() if k[:3] == key[:3]}
            self._rope_cache = {**kept, key: tables}
        return self._rope_cache[key]


def kept_lists(scores: torch.Tensor, policy: MaskPolicy, total_blocks: int):
    """The blocks ``select_blocks`` keeps, as the kernels' per-row lists (indices, counts):
    row budgets straight to lists, a layer budget or a threshold through its mask."""
    if policy.sparsity is not None and policy.budget == "row":
        return select_block_lists(scores, policy, total_blocks)
    return kept_block_indices(select_blocks(scores, policy, total_blocks))


def block_rope(model, hidden_size: int, num_blocks: int, batch: int, device):
    """Gate RoPE tables ``(cos, sin)`` ``[batch, nb, h]`` at block positions, from the model's
    rotary module in place (its class, theta and scaling, which ``ModelContext`` switches by
    prompt length) at the gate's width."""
    rotary = model.model.rotary_emb
    config = copy.deepcopy(rotary.config)
    width = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    config.rope_parameters = rope_parameters_at_width(config.rope_parameters, width, hidden_size)
    config.head_dim = hidden_size
    rotary = rotary_module(type(rotary), config, device)
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


def causal_attention(q, k, v, scaling: float | None) -> torch.Tensor:
    """Dense causal attention of queries q [b, Hq, sq, d] that are the last positions of
    k/v [b, Hkv, s, d]. For a chunk (sq < s) the causal mask is aligned to the last key, which
    SDPA's flash kernel applies without building it."""
    q_len, kv_len = q.shape[2], k.shape[2]
    mask = None if q_len == kv_len else causal_lower_right(q_len, kv_len)
    return torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=mask is None, scale=scaling,
        enable_gqa=q.shape[1] != k.shape[1],
    )  # fmt: skip


def seer_attention_forward(
    module, query, key, value, attention_mask, scaling=None, seer_prompt_end=None, **kwargs
):
    """Attention function registered as ``"seer"``: sparse on prefill, SDPA otherwise.

    ``seer_prompt_end`` (passed to the model call by a chunked prefill): the cache length once
    the whole prompt is in.
    """
    q_len, kv_len = query.shape[2], key.shape[2]
    if q_len == 1 or attention_mask is not None:
        # Decode steps and padded batches: transformers' SDPA with its mask.
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, **kwargs
        )
    prefill = getattr(module, "seer_prefill", None)
    if prefill is not None:
        out = prefill.attend(module.layer_idx, query, key, value, scaling, seer_prompt_end)
    elif q_len == kv_len:
        return sdpa_attention_forward(module, query, key, value, None, scaling=scaling, **kwargs)
    else:
        out = causal_attention(query, key, value, scaling)
    return out.transpose(1, 2).contiguous(), None


def seer_mask(*args, mask_function=causal_mask_function, attention_mask=None, **kwargs):
    """Masks as for SDPA, except that an unpadded causal prompt gets none even when it continues
    a (dynamic) cache: the attention function aligns causality to the last key itself, where
    SDPA's mask for a chunk would be a [chunk, cache] tensor. A sliding window (``local_size``)
    wider than every key so far is plain causality too."""
    window, kv_length = kwargs.get("local_size"), kwargs.get("kv_length")
    plain_causal = mask_function is causal_mask_function or (
        window is not None
        and kv_length is not None
        and kwargs.get("kv_offset", 0) == 0
        and kv_length <= window
    )
    if (
        plain_causal
        and kwargs.get("allow_is_causal_skip", True)
        and (attention_mask is None or bool(attention_mask.all()))
    ):
        return None
    return sdpa_mask(*args, mask_function=mask_function, attention_mask=attention_mask, **kwargs)


AttentionInterface.register(ATTENTION_NAME, seer_attention_forward)
# Prefill of an unpadded causal prompt sees attention_mask None, a chunk of one too.
AttentionMaskInterface.register(ATTENTION_NAME, seer_mask)
