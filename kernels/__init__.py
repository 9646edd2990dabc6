"""Attention kernels of seer (import name ``seer_kernels``).

- :func:`block_sparse_attention`: causal FlashAttention over the kept 64×64 tiles only (Triton).
- :func:`gate_block_features` / :func:`pooled_block_features` and
  :func:`block_lists_from_features`: gate scoring and block selection straight to the lists the
  block-sparse kernel takes, in two launches (Triton); :func:`layer_block_lists_from_features`
  the same under a layer budget, in three and a top-k.
- :func:`block_sparse_attention_cpu`: the same on CPU tensors, a C++ kernel built once per
  machine (falls back to the reference where it cannot be built).
- :func:`pooled_attention`: dense causal FlashAttention that also returns the row-normalized,
  max-pooled block attention map used as the self-distillation target (Triton).
- :func:`rotary_embedding` and :func:`silu_gate_`: the element-wise work around attention (RoPE,
  the MLP's SiLU gate) in one pass each (Triton); :func:`rotary_embedding_pooled` also pools the
  pre-RoPE blocks the gates score, in the same pass; :func:`rotary_embedding_pair` rotates a
  layer's queries and keys (pooling them or not) in one launch; :func:`add_rms_norm` the residual
  add and the RMSNorm after it, in one pass.
- :func:`compiling_ahead`: a dry run of launches that compiles their kernels side by side.
- ``*_reference``: the same functions in plain PyTorch, for tests and for machines without a GPU.
"""

from ._common import (
    BLOCK,
    can_compile_ahead,
    compiling_ahead,
    interpreting,
    num_blocks,
    only_compiling,
)
from .block_sparse import (
    block_sparse_attention,
    block_sparse_attention_from_lists,
    kept_block_indices,
)
from .block_sparse_cpu import block_sparse_attention_cpu
from .gate_features import gate_block_features, pooled_block_features
from .gate_select import block_lists_from_features, layer_block_lists_from_features
from .layer_ops import (
    add_rms_norm,
    compile_add_rms_norm,
    compile_rotary,
    rotary_embedding,
    rotary_embedding_pair,
    rotary_embedding_pooled,
    silu_gate_,
)
from .pooled import pooled_attention
from .reference import (
    block_sparse_attention_reference,
    pooled_attention_reference,
    rotary_embedding_reference,
    silu_gate_reference,
)

__all__ = [
    "BLOCK",
    "add_rms_norm",
    "block_lists_from_features",
    "layer_block_lists_from_features",
    "block_sparse_attention",
    "block_sparse_attention_cpu",
    "block_sparse_attention_from_lists",
    "block_sparse_attention_reference",
    "can_compile_ahead",
    "compile_add_rms_norm",
    "compile_rotary",
    "compiling_ahead",
    "gate_block_features",
    "interpreting",
    "kept_block_indices",
    "num_blocks",
    "only_compiling",
    "pooled_attention",
    "pooled_attention_reference",
    "pooled_block_features",
    "rotary_embedding",
    "rotary_embedding_pair",
    "rotary_embedding_pooled",
    "rotary_embedding_reference",
    "silu_gate_",
    "silu_gate_reference",
]
