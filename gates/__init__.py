"""SeerAttention gates: per-layer modules that pool a layer's pre-RoPE queries and keys into
64-token blocks, project them per head, apply RoPE at block positions and score which key
blocks each query block needs; policies that turn those scores into block masks (threshold or
top-k sparsity, with forced diagonal, sink and last-row blocks); a training-free estimator from
pooled post-RoPE attention; and gate files in the project's safetensors format or the published
SeerAttention folder format.
"""

from .estimators import pooled_qk_scores
from .files import (
    GateConfig,
    GateFileError,
    GateMismatchError,
    build_gates,
    check_fits,
    load_gates,
    read_gate_config,
    save_gates,
)
from .fused import gate_block_lists, pooled_block_lists
from .gate import (
    AttnGate,
    apply_rotary,
    block_count,
    block_rope_tables,
    default_rotary,
    pool_keys,
    pool_queries,
)
from .policy import (
    MaskPolicy,
    achieved_sparsity,
    kept_causal_blocks,
    select_block_lists,
    select_blocks,
)

__all__ = [
    "AttnGate",
    "GateConfig",
    "GateFileError",
    "GateMismatchError",
    "MaskPolicy",
    "achieved_sparsity",
    "apply_rotary",
    "block_count",
    "block_rope_tables",
    "build_gates",
    "check_fits",
    "default_rotary",
    "gate_block_lists",
    "kept_causal_blocks",
    "load_gates",
    "read_gate_config",
    "pool_keys",
    "pool_queries",
    "pooled_block_lists",
    "pooled_qk_scores",
    "save_gates",
    "select_block_lists",
    "select_blocks",
]
