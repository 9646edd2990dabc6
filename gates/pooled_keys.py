"""Pooled keys of every block seen so far, for prompts prefilled in chunks or continuing a cache.

A gate scores a chunk's query blocks against all key blocks up to them, so it needs the pooled
pre-RoPE keys of the whole past; the cache holds only post-RoPE keys. Keeping them pooled costs
a 64th of the keys' memory, and a partial last block is pooled again when the next chunk fills it.
"""

import torch

from .gate import pool_keys


class PooledKeys:
    """``pool_keys`` of a growing sequence of pre-RoPE keys, one chunk at a time.

    Complete blocks are kept pooled: max and min in the keys' dtype (they are keys, so exact in
    it), the mean in float32 — two thirds of the memory of ``pool_keys``' float32 output. The
    tokens of a partial last block are kept as they are, to be pooled with the next ones, so
    ``extend`` returns exactly what ``pool_keys`` of all keys at once would.
    """

    def __init__(self, block_size: int = 64):
        self.block_size = block_size
        self.tokens = 0
        self._extrema: torch.Tensor | None = None  # [b, complete blocks, Hkv, 2d]
        self._means: torch.Tensor | None = None  # [b, complete blocks, Hkv, d] float32+
        self._tail: torch.Tensor | None = None  # [b, < block_size, Hkv, d]

    def extend(self, k: torch.Tensor) -> torch.Tensor:
        """Add the next keys k `[b, s, Hkv, d]`; return the pooled keys of every token so far,
        `[b, nb, Hkv, 3d]` as ``pool_keys`` makes them."""
        self.tokens += k.shape[1]
        if self._tail is not None:
            k = torch.cat([self._tail, k], dim=1)
        complete = k.shape[1] // self.block_size
        pooled = pool_keys(k, self.block_size)
        d = k.shape[-1]
        if complete:
            done = pooled[:, :complete]
            self._extrema = _append(self._extrema, done[..., : 2 * d].to(k.dtype))
            self._means = _append(self._means, done[..., 2 * d :])
        # A copy, so the chunk the tail came from can be freed.
        self._tail = (
            k[:, complete * self.block_size :].clone() if pooled.shape[1] > complete else None
        )
        if self._extrema is None:
            return pooled
        past = torch.cat([self._extrema.to(pooled.dtype), self._means], dim=-1)
        return torch.cat([past, pooled[:, complete:]], dim=1) if self._tail is not None else past


def _append(stored: torch.Tensor | None, new: torch.Tensor) -> torch.Tensor:
    return new if stored is None else torch.cat([stored, new], dim=1)
