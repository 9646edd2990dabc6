"""The attention gate: pooled pre-RoPE Q/K → per-head linear → block RoPE → block scores.

Shapes: b batch, s tokens, nb = ceil(s / block_size) blocks, Hq query heads, Hkv key/value
heads, d model head dim, h gate hidden size.
"""

import math
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

RotaryFn = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def block_count(seq_len: int, block_size: int = 64) -> int:
    """Number of blocks covering `seq_len` tokens: ceil(seq_len / block_size)."""
    return -(-seq_len // block_size)


def _pooling_dtype(x: torch.Tensor) -> torch.dtype:
    # Sums over 64 tokens in bf16/fp16 lose precision; float64 inputs stay float64.
    return torch.promote_types(x.dtype, torch.float32)


def _block_reduce(
    x: torch.Tensor, block_size: int, fill: float, reduce: Callable, start: int = 0
) -> torch.Tensor:
    """``reduce(blocks, dim=2)`` over the blocks of tokens of x `[b, s, H, c]` → `[b, nb, H, c]`.

    The first token sits at offset `start` (< block_size) of the first block; partial blocks are
    padded with `fill`. Only those are copied: padding the whole input would copy all of it
    (most of the pooling time on a CPU), and each block reduces alone, so the result is the same.
    """
    if x.dim() != 4:
        raise ValueError(f"expected a [batch, seq, heads, dim] tensor, got {tuple(x.shape)}.")
    b, s, heads, c = x.shape
    # Tokens before the first block edge (a partial first block), then whole blocks, then the rest.
    lead = min(s, (block_size - start) % block_size)
    whole = (s - lead) // block_size
    edges = (lead, lead + whole * block_size)
    parts = []
    if lead:
        padded = F.pad(x[:, :lead], (0, 0, 0, 0, start, block_size - start - lead), value=fill)
        parts.append(padded.view(b, 1, block_size, heads, c))
    if whole:
        parts.append(x[:, edges[0] : edges[1]].reshape(b, whole, block_size, heads, c))
    if edges[1] < s:
        rest = x[:, edges[1] :]
        padded = F.pad(rest, (0, 0, 0, 0, 0, block_size - rest.shape[1]), value=fill)
        parts.append(padded.view(b, 1, block_size, heads, c))
    reduced = [reduce(part, dim=2) for part in parts]
    return reduced[0] if len(reduced) == 1 else torch.cat(reduced, dim=1)


def _block_mean(x: torch.Tensor, block_size: int, start: int = 0) -> torch.Tensor:
    """Mean of x `[b, s, H, c]` over each block of tokens → `[b, nb, H, c]`, in float32+; the
    first token sits at offset `start` of the first block."""
    # Accumulating in float32 directly avoids a float32 copy of the whole input.
    dtype = _pooling_dtype(x)
    sums = _block_reduce(x, block_size, 0.0, partial(torch.sum, dtype=dtype), start)
    edges = torch.arange(sums.shape[1] + 1, device=x.device) * block_size
    edges = edges.clamp(min=start, max=start + x.shape[1])
    counts = edges[1:] - edges[:-1]
    return sums / counts.view(1, -1, 1, 1).to(sums.dtype)


def pool_queries(q: torch.Tensor, block_size: int = 64, start: int = 0) -> torch.Tensor:
    """Average pre-RoPE queries over blocks of tokens.

    q: `[b, s, Hq, d]` → `[b, nb, Hq, d]` (float32, or float64 for float64 input). Blocks lie
    on the grid of positions: with `start` the position of q's first token (queries of a chunk
    that continues a cache), the first block is block ``start // block_size`` and pools only the
    tokens of q in it; the last, partial block averages only the tokens it has.
    """
    return _block_mean(q, block_size, start % block_size)


def pool_keys(k: torch.Tensor, block_size: int = 64) -> torch.Tensor:
    """Max, min and mean of pre-RoPE keys over blocks of tokens, concatenated on channels.

    k: `[b, s, Hkv, d]` → `[b, nb, Hkv, 3d]` (float32, or float64 for float64 input). The last,
    partial block pools only the tokens it has.
    """
    dtype = _pooling_dtype(k)
    # Max and min are exact in any dtype: take them before widening.
    high = _block_reduce(k, block_size, -math.inf, torch.amax).to(dtype)
    low = _block_reduce(k, block_size, math.inf, torch.amin).to(dtype)
    return torch.cat([high, low, _block_mean(k, block_size)], dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE (the convention of transformers' Llama).

    x: `[b, nb, H, h]`; cos, sin: `[b, nb, h]`, broadcast over heads.
    """
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def default_rotary(hidden_size: int, theta: float = 10000.0) -> RotaryFn:
    """Plain RoPE tables of rotary dim `hidden_size`, for models without RoPE scaling.

    Returns a function mapping positions `[b, nb]` (long) to `(cos, sin)`, each `[b, nb, h]`
    float32.
    """
    if hidden_size % 2:
        raise ValueError(f"the rotary dimension must be even, got {hidden_size}.")
    exponents = torch.arange(0, hidden_size, 2, dtype=torch.float64) / hidden_size
    inv_freq = 1.0 / theta**exponents

    def rotary(positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.to(torch.float64).unsqueeze(-1) * inv_freq.to(positions.device)
        angles = torch.cat([freqs, freqs], dim=-1)
        return angles.cos().float(), angles.sin().float()

    return rotary


def block_rope_tables(
    rotary_fn: RotaryFn,
    num_blocks: int,
    block_size: int,
    batch: int,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE tables at block positions: `rotary_fn` called on the first token of each block.

    Positions `[batch, nb]` = 0, block_size, 2·block_size, …; returns `(cos, sin)` each
    `[batch, nb, h]` as `rotary_fn` makes them.
    """
    starts = torch.arange(num_blocks, device=device, dtype=torch.long) * block_size
    return rotary_fn(starts.expand(batch, num_blocks))


def block_causal_logits(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Scaled block logits with -inf above each query block's own (diagonal) key block.

    q: `[b, nq, Hq, h]`, the last nq of the key blocks (nq = nb for a whole prompt, fewer for a
    chunk continuing a cache); k: `[b, nb, Hkv, h]` with Hq a multiple of Hkv (query head i
    reads key head i // (Hq // Hkv)). Returns `[b, Hq, nq, nb]` = q_r · k_j / sqrt(h), -inf for
    j > nb - nq + r.
    """
    num_q, num_kv = q.shape[2], k.shape[2]
    if num_q % num_kv:
        raise ValueError(f"{num_q} query heads cannot share {num_kv} key heads evenly.")
    nq, nb = q.shape[1], k.shape[1]
    if nq > nb:
        raise ValueError(f"{nq} query blocks cannot be the last blocks of {nb} key blocks.")
    k = k.repeat_interleave(num_q // num_kv, dim=2)
    logits = torch.einsum("bihc,bjhc->bhij", q, k) / math.sqrt(q.shape[-1])
    above = torch.ones(nq, nb, dtype=torch.bool, device=q.device).triu(nb - nq + 1)
    return logits.masked_fill(above, -math.inf)


class HeadwiseLinear(nn.Module):
    """One bias-free linear map per head: x `[b, n, H, in]` → `[b, n, H, out]`."""

    def __init__(self, heads: int, in_features: int, out_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(heads, in_features, out_features))
        bound = 1.0 / math.sqrt(in_features)
        nn.init.uniform_(self.weight, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bshi,hio->bsho", x, self.weight.to(x.dtype))


class AttnGate(nn.Module):
    """SeerAttention gate of type `Qavg_Kmaxminavg` for one layer.

    With hidden_size == head_dim and not force_double there is no query linear
    (`mask_linear_q is None`) and the key linear has Hq heads, applied after pooled keys are
    repeated to the query heads; otherwise `mask_linear_q` is `[Hq, d, h]` and `mask_linear_k`
    is `[Hkv, 3d, h]`. Computation runs in float32 (or the weights' dtype if wider).
    """

    def __init__(
        self,
        num_q_heads: int,
        num_kv_heads: int,
        head_dim: int,
        hidden_size: int = 128,
        block_size: int = 64,
        force_double: bool = False,
    ):
        super().__init__()
        if min(num_q_heads, num_kv_heads, head_dim, hidden_size, block_size) < 1:
            raise ValueError("head counts, head_dim, hidden_size and block_size must be positive.")
        if num_q_heads % num_kv_heads:
            raise ValueError(f"{num_q_heads} query heads cannot share {num_kv_heads} KV heads.")
        if hidden_size % 2:
            raise ValueError(f"the gate hidden size must be even for RoPE, got {hidden_size}.")
        self.num_q_heads = num_q_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.hidden_size = hidden_size
        self.block_size = block_size
        self.force_double = force_double
        if hidden_size == head_dim and not force_double:
            self.mask_linear_q = None
            self.mask_linear_k = HeadwiseLinear(num_q_heads, 3 * head_dim, hidden_size)
        else:
            self.mask_linear_q = HeadwiseLinear(num_q_heads, head_dim, hidden_size)
            self.mask_linear_k = HeadwiseLinear(num_kv_heads, 3 * head_dim, hidden_size)

    def _compute_dtype(self) -> torch.dtype:
        return torch.promote_types(self.mask_linear_k.weight.dtype, torch.float32)

    def logits(
        self,
        q_pooled: torch.Tensor,
        k_pooled: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
    ) -> torch.Tensor:
        """Block-causal gate logits from pooled inputs.

        q_pooled: `[b, nq, Hq, d]`, the last nq key blocks (all of them for a whole prompt);
        k_pooled: `[b, nb, Hkv, 3d]`; cos, sin: `[b, nb, h]` at the key blocks' positions.
        Returns `[b, Hq, nq, nb]`, -inf where key block j lies after query row r's block.
        """
        dtype = self._compute_dtype()
        q, k = q_pooled.to(dtype), k_pooled.to(dtype)
        if self.mask_linear_q is None:
            k = k.repeat_interleave(self.num_q_heads // self.num_kv_heads, dim=2)
        else:
            q = self.mask_linear_q(q)
        k = self.mask_linear_k(k)
        cos, sin = cos.to(dtype), sin.to(dtype)
        nq = q.shape[1]
        q = apply_rotary(q, cos[:, -nq:], sin[:, -nq:])
        return block_causal_logits(q, apply_rotary(k, cos, sin))

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        probabilities: bool = True,
    ) -> torch.Tensor:
        """Block scores from raw pre-RoPE q `[b, sq, Hq, d]` and k `[b, s, Hkv, d]`.

        q holds the last sq of the s positions (sq = s for a whole prompt); cos, sin:
        `[b, nb, h]`. Returns `[b, Hq, nq, nb]` (nq: the blocks q touches, the last of the nb):
        each row a softmax over key blocks up to its own, zero after it; with ``probabilities``
        False the logits instead (-inf after it), which rank a row's blocks the same without the
        softmax.
        """
        q_pooled = pool_queries(q, self.block_size, start=k.shape[1] - q.shape[1])
        k_pooled = pool_keys(k, self.block_size)
        logits = self.logits(q_pooled, k_pooled, cos, sin)
        return logits.softmax(dim=-1) if probabilities else logits
