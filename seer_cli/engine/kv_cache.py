"""The key/value cache of a generation: transformers' ``DynamicCache``, with a prompt's first
pass kept without a copy and decode steps on the CPU that write into reserved room instead of
copying the whole cache.

``DynamicLayer.update`` concatenates even onto an empty layer: every prompt's first pass copied
each layer's keys and values once, 2.4 ms of the default model's 32k prefill on an H100 (60
copies; 5 % of a sparse prefill). Here an empty layer on a GPU keeps the states it is given:
views laid out as the projections wrote them ([b, s, H, d] seen as [b, H, s, d]), which seer's
kernel and PyTorch's attention read through their strides. The CPU keeps the copy: its attention
kernel reads contiguous rows faster than the copy costs (a 16k bf16 prefill 14.0–14.6 s with it,
15.6–16.7 s without, on the 2-core Xeon).

``DynamicLayer.update`` concatenates, so every decode step copies each layer's keys and values
in full: on the CPU at 8192 tokens of context a quarter of the step's time, growing with the
context. Here a one-token update on the CPU writes into room reserved ``DECODE_RESERVE``
positions at a time, and the cache's keys and values are views of it. On a GPU the copy is
negligible and a decode step is bound by its launches: writing in place, a few more operations
per layer, made the default model's steps slower (33–37 against 22–25 ms per token on an H100),
so GPU layers concatenate as before. Later prompt chunks concatenate everywhere.
"""

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

DECODE_RESERVE = 256  # positions reserved at a time for decode steps


def new_cache(model) -> DynamicCache:
    """An empty cache for ``model`` whose full-attention layers reserve room for CPU decode steps
    (sliding-window layers stay transformers' own)."""
    cache = DynamicCache(config=model.config)
    cache.layers = [
        DecodeReserveLayer() if type(layer) is DynamicLayer else layer for layer in cache.layers
    ]
    return cache


class DecodeReserveLayer(DynamicLayer):
    """A ``DynamicLayer`` that keeps a first pass on a GPU as given and whose one-token updates
    on the CPU write in place (see the module doc)."""

    _key_room: torch.Tensor | None = None
    _value_room: torch.Tensor | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        length = self.get_seq_length()
        if length == 0 and key_states.device.type != "cpu":
            # super() initialises the layer as its transformers version does, on empty slices.
            super().update(key_states[..., :0, :], value_states[..., :0, :], *args, **kwargs)
            self._key_room = self._value_room = None
            self.keys, self.values = key_states, value_states
            return self.keys, self.values
        if key_states.shape[-2] != 1 or length == 0 or key_states.device.type != "cpu":
            self._key_room = self._value_room = None
            return super().update(key_states, value_states, *args, **kwargs)
        if not self._room_left(length):
            self._key_room = _reserve(self.keys, length)
            self._value_room = _reserve(self.values, length)
        self._key_room[..., length, :] = key_states[..., 0, :]
        self._value_room[..., length, :] = value_states[..., 0, :]
        self.keys = self._key_room[..., : length + 1, :]
        self.values = self._value_room[..., : length + 1, :]
        return self.keys, self.values

    def _room_left(self, length: int) -> bool:
        """Whether the keys are still the start of the room (not replaced since, by a prefill or
        a batch operation) and it has a free position after them."""
        room = self._key_room
        return (
            room is not None
            and length < room.shape[-2]
            and self.keys.data_ptr() == room.data_ptr()
            and self.keys.stride() == room.stride()
        )

    def reset(self) -> None:
        self._key_room = self._value_room = None
        super().reset()


def _reserve(states: torch.Tensor, length: int) -> torch.Tensor:
    """Room for ``length`` cached positions and ``DECODE_RESERVE`` more, the first filled."""
    room = states.new_empty(*states.shape[:-2], length + DECODE_RESERVE, states.shape[-1])
    room[..., :length, :] = states
    return room
