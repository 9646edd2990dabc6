"""The generation cache: decode steps write into reserved room, and everything a cache does —
decode, crop, a prompt continuing it — gives what transformers' own DynamicCache gives."""

import pytest
import torch
from tiny_models import FAMILIES, random_ids, tiny_model
from transformers import DynamicCache

from seer_cli.engine import kv_cache
from seer_cli.engine.generation import decode_one_token, prefill
from seer_cli.engine.kv_cache import DecodeReserveLayer, new_cache


def run(model, cache, ids: torch.Tensor, steps: int) -> list[torch.Tensor]:
    """Prefill ``ids`` into ``cache``, then ``steps`` greedy decode steps; every step's logits."""
    logits, cache = prefill(model, ids, cache=cache)
    found = [logits]
    for _ in range(steps):
        logits = decode_one_token(model, logits.argmax(-1, keepdim=True), cache)
        found.append(logits)
    return found


@pytest.mark.parametrize("family", FAMILIES)
def test_decoding_matches_transformers_dynamic_cache(family, monkeypatch):
    # A small reserve, so that decoding outgrows it and moves to new room twice.
    monkeypatch.setattr(kv_cache, "DECODE_RESERVE", 4)
    model = tiny_model(family)
    ids = random_ids(150)
    ours, theirs = new_cache(model), DynamicCache(config=model.config)
    # Sliding-window layers (the tiny Mistral's) stay transformers' own.
    assert all(isinstance(layer, DecodeReserveLayer) != layer.is_sliding for layer in ours.layers)
    for mine, reference in zip(run(model, ours, ids, 10), run(model, theirs, ids, 10), strict=True):
        torch.testing.assert_close(mine, reference)
    assert ours.get_seq_length() == theirs.get_seq_length() == 160
    torch.testing.assert_close(ours.layers[0].keys, theirs.layers[0].keys)


def test_decode_steps_write_into_reserved_room(monkeypatch):
    monkeypatch.setattr(kv_cache, "DECODE_RESERVE", 8)
    model = tiny_model("llama")
    cache = new_cache(model)
    run(model, cache, random_ids(100), 5)
    layer = cache.layers[0]
    # One room since the prompt: its first positions are the keys the attention reads.
    assert layer._key_room.shape[-2] == 100 + 8
    assert layer.keys.data_ptr() == layer._key_room.data_ptr()
    assert layer.keys.shape[-2] == 105


def test_crop_and_a_continuing_prompt_match_transformers(monkeypatch):
    """The prompt cache crops a kept cache and prefills the rest of the next prompt on it."""
    monkeypatch.setattr(kv_cache, "DECODE_RESERVE", 4)
    model = tiny_model("qwen3")
    ids, more = random_ids(130), random_ids(70, seed=1)
    caches = new_cache(model), DynamicCache(config=model.config)
    results = []
    for cache in caches:
        run(model, cache, ids, 6)
        cache.crop(-10)  # into the prompt: the room's last positions are stale
        results.append(run(model, cache, more, 3))
    for mine, reference in zip(*results, strict=True):
        torch.testing.assert_close(mine, reference)
    assert caches[0].layers[0]._key_room is not None  # decoding after the new prompt reserved again


@pytest.mark.parametrize("device", ["meta", "cpu"])
def test_a_first_pass_off_the_cpu_is_kept_as_given_and_later_chunks_concatenate(device):
    layer = DecodeReserveLayer()
    # Laid out as attention layers hand them over: [b, s, H, d] seen as [b, H, s, d].
    keys, values = (torch.randn(1, 70, 2, 8, device=device).transpose(1, 2) for _ in range(2))
    kept_keys, kept_values = layer.update(keys, values)
    if device == "cpu":  # copied: the CPU kernel reads contiguous rows faster
        assert kept_keys.is_contiguous() and kept_values.is_contiguous()
    else:
        assert kept_keys is keys and kept_values is values
    assert layer.get_seq_length() == 70
    more_keys, more_values = (torch.randn(1, 2, 30, 8, device=device) for _ in range(2))
    all_keys, all_values = layer.update(more_keys, more_values)
    assert all_keys.shape == all_values.shape == (1, 2, 100, 8)
    if device == "cpu":
        torch.testing.assert_close(all_keys, torch.cat([keys, more_keys], -2))
        torch.testing.assert_close(all_values, torch.cat([values, more_values], -2))


@pytest.mark.parametrize("device", ["meta", "cpu"])
def test_a_one_token_first_pass_starts_the_cache(device):
    layer = DecodeReserveLayer()
    keys, values = (torch.randn(1, 2, 1, 8, device=device) for _ in range(2))
    layer.update(keys, values)
    assert layer.get_seq_length() == 1
    layer.update(keys, values)
    assert layer.get_seq_length() == 2
