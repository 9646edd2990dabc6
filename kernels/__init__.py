"""Attention kernels of seer (import name ``seer_kernels``).

- :func:`block_sparse_attention`: causal FlashAttention over the kept 64×64 tiles only (Triton).
- :func:`pooled_attention`: dense causal FlashAttention that also returns the row-normalized,
  max-pooled block attention map used as the self-distillation target (Triton).
- ``*_reference``: the same functions in plain PyTorch, for tests and for machines without a GPU.
"""

from ._common import BLOCK, interpreting, num_blocks
from .block_sparse import (
    block_sparse_attention,
    block_sparse_attention_from_lists,
    kept_block_indices,
)
from .pooled import pooled_attention
from .reference import block_sparse_attention_reference, pooled_attention_reference

__all__ = [
    "BLOCK",
    "block_sparse_attention",
    "block_sparse_attention_from_lists",
    "block_sparse_attention_reference",
    "interpreting",
    "kept_block_indices",
    "num_blocks",
    "pooled_attention",
    "pooled_attention_reference",
]
