"""The cache of the last prompt, kept so that a next prompt with the same beginning (another
question over the same document) prefills only the tokens that differ, as llama.cpp's server
reuses its slot's cache."""

import itertools
from dataclasses import dataclass

from .generation import ATTENTION_BLOCK


@dataclass
class _Kept:
    ids: list[int]
    cache: object  # a transformers cache holding ids' keys and values (and the answer's after)
    scaling: object  # the RoPE it was filled under: another one's positions do not match


class PromptCache:
    """Holds one prompt's cache between ``Engine.generate`` calls."""

    def __init__(self):
        self._kept: _Kept | None = None

    def take(self, prompt_ids: list[int], scaling):
        """The kept cache cropped to the whole attention blocks it shares with ``prompt_ids``
        (so a sparse prefill of the rest keeps the blocks the whole prompt would), or None.
        Either way the cache is no longer kept: a prompt that shares nothing does not prefill
        beside it."""
        kept, self._kept = self._kept, None
        if kept is None or kept.scaling != scaling:
            return None
        # At least one token is left to prefill, for its logits.
        pairs = zip(kept.ids, prompt_ids[:-1], strict=False)
        shared = sum(1 for _ in itertools.takewhile(lambda pair: pair[0] == pair[1], pairs))
        shared -= shared % ATTENTION_BLOCK
        if shared == 0:
            return None
        surplus = kept.cache.get_seq_length() - shared
        if surplus:
            kept.cache.crop(-surplus)
        return kept.cache

    def keep(self, prompt_ids: list[int], cache, scaling) -> None:
        self._kept = _Kept(list(prompt_ids), cache, scaling)

    def clear(self) -> None:
        self._kept = None
