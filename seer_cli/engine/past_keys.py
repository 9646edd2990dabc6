"""The pooled pre-RoPE keys a gate needs when a prompt does not start an empty cache.

A prompt prefilled in chunks, or a second prompt continuing a cache, has its query blocks scored
against every key block so far. The gates read keys before RoPE, the cache holds them after, so
each layer keeps its keys pooled as they go by (``seer_gates.pooled_keys.PooledKeys``), per cache:
a forward pre-hook notes the cache each forward call runs on. Keys the gate never saw — decode
steps, a copied or cropped cache — are recovered from the cache by undoing RoPE.
"""

import weakref

import torch
from seer_gates.pooled_keys import PooledKeys


class PastKeys:
    """Per cache and layer, the pooled pre-RoPE keys of every position in the cache."""

    def __init__(self, model):
        self.model = model
        # Dropped with their cache: nothing here holds a cache or its keys alive. A forward
        # without a cache object (one pass, nothing to continue) keeps no record.
        self._by_cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._cache: weakref.ref | None = None
        self._hook = model.model.register_forward_pre_hook(self._note_cache, with_kwargs=True)

    def remove(self) -> None:
        self._hook.remove()

    def _note_cache(self, module, args, kwargs) -> None:
        # transformers 5.25 renamed the argument.
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        self._cache = None if cache is None else weakref.ref(cache)

    def extend(self, layer_idx: int, new_keys: torch.Tensor, cached: torch.Tensor) -> torch.Tensor:
        """Pooled pre-RoPE keys ``[b, nb, Hkv, 3d]`` of every cached position.

        new_keys: ``[b, sq, Hkv, d]`` pre-RoPE, the keys of this forward call; cached:
        ``[b, Hkv, s, d]`` post-RoPE, the cache with them last.
        """
        past = cached.shape[2] - new_keys.shape[1]
        cache = self._cache() if self._cache is not None else None
        layers = {} if cache is None else self._by_cache.setdefault(cache, {})
        pooled = layers.get(layer_idx)
        if pooled is None or pooled.tokens > past:
            pooled = layers[layer_idx] = PooledKeys()
        if pooled.tokens < past:
            pooled.extend(undo_rope(self.model, cached[:, :, pooled.tokens : past], pooled.tokens))
        return pooled.extend(new_keys)


def undo_rope(model, keys: torch.Tensor, start: int) -> torch.Tensor:
    """Pre-RoPE keys ``[b, n, Hkv, d]`` from post-RoPE keys ``[b, Hkv, n, d]`` at positions
    ``start`` on, through the model's rotary module in place.

    RoPE turns each channel pair (i, i + d/2) by an angle, times a scale for some RoPE types:
    y = x·cos + rotate_half(x)·sin. Turning back gives x·(cos² + sin²), divided out. Exact up to
    the rounding of the cached keys.
    """
    positions = torch.arange(start, start + keys.shape[2], device=keys.device)[None]
    x = keys.float()
    cos, sin = (table[:, None] for table in model.model.rotary_emb(x, positions))
    x1, x2 = x.chunk(2, dim=-1)
    rotated_half = torch.cat([-x2, x1], dim=-1)
    pre_rope = (x * cos - rotated_half * sin) / (cos * cos + sin * sin)
    return pre_rope.to(keys.dtype).transpose(1, 2)
