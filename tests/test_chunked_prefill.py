"""Prefill in chunks (``--ubatch-size``) and prompts that continue a cache, on tiny models of
every supported family: chunked equals one pass, dense and sparse, on the CPU path and through
the Triton kernel where it can run."""

import copy
import json

import pytest
import torch
from conftest import KERNEL_DEVICE, needs_kernel_device
from seer_gates import MaskPolicy, pool_keys, save_gates
from tiny_models import (
    FAMILIES,
    HEAD_DIM,
    NUM_KV_HEADS,
    gate_config,
    random_ids,
    save_tiny_model,
    tiny_gates,
    tiny_model,
)
from transformers import DynamicCache

from seer_cli.engine.attention import ATTENTION_NAME, SparsePrefill
from seer_cli.engine.errors import SeerError
from seer_cli.engine.generation import (
    SamplingOptions,
    cache_argument,
    chunk_bounds,
    decode_one_token,
    prefill,
)
from seer_cli.engine.past_keys import undo_rope
from seer_cli.engine.runtime import Engine, EngineOptions
from seer_cli.measure.report import Stat

# Prompt lengths around block edges, chunk sizes that split them several times.
LENGTHS = [300, 449]
UBATCHES = [64, 192]


@pytest.fixture
def attached():
    """Attach SparsePrefill (sparse from the shortest prompt) and take it off after the test."""
    prefills = []

    def attach(model, policy, gates=None):
        prefills.append(SparsePrefill(model, policy, gates, min_tokens=0))
        return prefills[-1]

    yield attach
    for sparse in prefills:
        sparse.detach()


def last_logits(model, ids, ubatch_size=0, cache=None):
    return prefill(model, ids, cache=cache, ubatch_size=ubatch_size)[0]


# ---------------------------------------------------------------- chunk boundaries


def test_chunks_end_on_block_edges_of_the_cache():
    assert chunk_bounds(0, 300, 0) == [(0, 300)]
    assert chunk_bounds(0, 300, 512) == [(0, 300)]
    assert chunk_bounds(0, 300, 128) == [(0, 128), (128, 256), (256, 300)]
    # A prompt continuing 70 cached tokens: the first chunk ends at position 128.
    assert chunk_bounds(70, 300, 64) == [(0, 58), (58, 122), (122, 186), (186, 250), (250, 300)]
    # No chunk of one token, which would be taken for a decode step.
    assert chunk_bounds(0, 449, 64)[-1] == (384, 449)
    assert chunk_bounds(63, 200, 64)[0] == (0, 65)


@pytest.mark.parametrize("ubatch_size", [-64, 100])
def test_chunk_size_must_be_a_multiple_of_the_block(ubatch_size):
    with pytest.raises(ValueError, match="multiple of 64"):
        chunk_bounds(0, 300, ubatch_size)


# ---------------------------------------------------------------- dense


@pytest.mark.parametrize("implementation", ["sdpa", ATTENTION_NAME])
@pytest.mark.parametrize("family", FAMILIES)
def test_dense_in_chunks_equals_one_pass(family, implementation):
    model = tiny_model(family)
    model.set_attn_implementation(implementation)
    ids = random_ids(LENGTHS[1])
    whole = last_logits(model, ids)
    for ubatch_size in UBATCHES:
        torch.testing.assert_close(last_logits(model, ids, ubatch_size), whole)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_prompt_continuing_a_cache_equals_one_pass(family):
    """A second question over the same document: its prompt extends the document's cache, at
    a position inside a block, with decode steps in between."""
    model = tiny_model(family)
    model.set_attn_implementation(ATTENTION_NAME)
    ids = random_ids(400)
    with torch.inference_mode():
        _, cache = prefill(model, ids[:, :250])
        decode_one_token(model, ids[:, 250:251], cache)
        continued = last_logits(model, ids[:, 251:], ubatch_size=64, cache=cache)
    torch.testing.assert_close(continued, last_logits(model, ids))


# ---------------------------------------------------------------- sparse


def everything_kept():
    """Every causal block through the sparse path: a gate's probabilities are all above 0."""
    return MaskPolicy(threshold=0.0, dense_last_row=False)


@pytest.mark.parametrize("family", FAMILIES)
def test_sparse_in_chunks_with_every_block_kept_equals_dense(family, attached):
    model = tiny_model(family)
    ids = random_ids(LENGTHS[0])
    dense = last_logits(model, ids)
    sparse = attached(model, everything_kept(), tiny_gates(model))
    for ubatch_size in UBATCHES:
        torch.testing.assert_close(last_logits(model, ids, ubatch_size), dense)
    assert sparse.stats.overall() == 0.0


@pytest.mark.parametrize("gates", ["trained", "pooled"])
@pytest.mark.parametrize("length", LENGTHS)
def test_sparse_in_chunks_equals_one_pass(length, gates, attached):
    """Chunks on block edges score, keep and compute exactly the tiles of one pass."""
    model = tiny_model("llama")
    ids = random_ids(length)
    policy = MaskPolicy(sparsity=0.6)
    sparse = attached(model, policy, tiny_gates(model) if gates == "trained" else None)
    whole = last_logits(model, ids)
    whole_kept, total = sparse.stats.kept(), dict(sparse.stats.total)
    for ubatch_size in UBATCHES:
        sparse.stats.clear()
        torch.testing.assert_close(last_logits(model, ids, ubatch_size), whole)
        assert sparse.stats.total == total
        assert sparse.stats.kept() == whole_kept
    assert sparse.stats.overall() > 0.15  # blocks were skipped


@needs_kernel_device
@pytest.mark.parametrize("policy", [MaskPolicy(sparsity=0.6), everything_kept()], ids=str)
def test_triton_kernel_in_chunks_matches_the_reference_path(policy, attached, monkeypatch):
    # float16: a dtype the kernels take on a GPU and under the interpreter alike.
    model = tiny_model("qwen2").to(KERNEL_DEVICE, torch.float16)
    ids = random_ids(LENGTHS[1]).to(KERNEL_DEVICE)
    attached(model, policy, tiny_gates(model))
    monkeypatch.setenv("SEER_ATTENTION_KERNEL", "reference")
    reference = last_logits(model, ids, ubatch_size=128)
    monkeypatch.setenv("SEER_ATTENTION_KERNEL", "triton")
    triton_logits = last_logits(model, ids, ubatch_size=128)
    torch.testing.assert_close(triton_logits, reference, rtol=1e-2, atol=1e-2)


def test_sparse_continuation_after_decode_steps_with_every_block_kept(attached):
    """Keys of decode steps were never seen by the gate; they are recovered from the cache."""
    model = tiny_model("qwen3")
    ids = random_ids(400)
    dense = last_logits(model, ids)
    attached(model, everything_kept(), tiny_gates(model))
    with torch.inference_mode():
        _, cache = prefill(model, ids[:, :250])
        decode_one_token(model, ids[:, 250:251], cache)
        # A copy of the cache has no pooled keys of its own: all are recovered.
        copied = last_logits(model, ids[:, 251:], cache=copy.deepcopy(cache))
        continued = last_logits(model, ids[:, 251:], ubatch_size=64, cache=cache)
    torch.testing.assert_close(continued, dense)
    torch.testing.assert_close(copied, dense)


@pytest.mark.parametrize("family", FAMILIES)
def test_undoing_rope_recovers_the_pre_rope_keys(family):
    model = tiny_model(family)
    attention = model.model.layers[0].self_attn
    pre_rope = {}
    source = attention.k_norm if hasattr(attention, "k_norm") else attention.k_proj
    source.register_forward_hook(lambda module, inputs, output: pre_rope.setdefault("k", output))
    cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        model(input_ids=random_ids(200), use_cache=True, **{cache_argument(model): cache})
    keys = pre_rope["k"].view(1, 200, NUM_KV_HEADS, HEAD_DIM)
    recovered = undo_rope(model, cache.layers[0].keys[:, :, 70:], start=70)
    torch.testing.assert_close(recovered, keys[:, 70:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pool_keys(recovered), pool_keys(keys[:, 70:]))


# ---------------------------------------------------------------- engine


def test_only_long_sparse_prompts_are_chunked_by_default():
    from seer_cli.engine.generation import (
        DEFAULT_UBATCH_SIZE,
        ONE_PASS_MAX_TOKENS,
        default_ubatch_size,
    )

    assert default_ubatch_size(ONE_PASS_MAX_TOKENS, sparse=True) == 0
    assert default_ubatch_size(ONE_PASS_MAX_TOKENS + 1, sparse=True) == DEFAULT_UBATCH_SIZE
    assert default_ubatch_size(4 * ONE_PASS_MAX_TOKENS, sparse=False) == 0


def test_engine_generates_the_same_in_chunks(tmp_path):
    folder = save_tiny_model("mistral", tmp_path / "tiny-mistral")
    model = tiny_model("mistral")
    gate_file = tmp_path / "gates.safetensors"
    save_gates(gate_file, tiny_gates(model), gate_config(model, base_model="tiny-mistral"))
    prompt = random_ids(500)[0].tolist()
    results = {}
    for ubatch_size in (0, 128):
        for sparsity in (None, 0.7):
            options = EngineOptions(
                model=str(folder), gates=str(gate_file), sparsity=sparsity,
                ubatch_size=ubatch_size, sparse_min_tokens=0,
            )  # fmt: skip
            result = Engine.load(options).generate(prompt, SamplingOptions(max_tokens=6))
            results[ubatch_size, sparsity] = (result.text, result.stats.sparsity)
    assert results[128, None] == results[0, None]
    assert results[128, 0.7] == results[0, 0.7]
    assert results[0, 0.7][1] > 0.3


@pytest.mark.parametrize("sparsity", [None, 0.7])
def test_engine_prefills_only_what_a_prompt_does_not_share_with_the_last(tmp_path, sparsity):
    folder = save_tiny_model("llama", tmp_path / "tiny-llama")
    model = tiny_model("llama")
    gate_file = tmp_path / "gates.safetensors"
    save_gates(gate_file, tiny_gates(model), gate_config(model, base_model="tiny-llama"))
    document, question, other = random_ids(300)[0].tolist(), [5, 6, 7], [8, 9]
    options = EngineOptions(
        model=str(folder), gates=str(gate_file), sparsity=sparsity, sparse_min_tokens=0
    )
    engine = Engine.load(options)
    first = engine.generate(document + question, SamplingOptions(max_tokens=4))
    second = engine.generate(document + other, SamplingOptions(max_tokens=4))
    unrelated = engine.generate(other + document, SamplingOptions(max_tokens=4))
    fresh = Engine.load(options).generate(document + other, SamplingOptions(max_tokens=4))

    assert first.stats.cache_n == 0 and unrelated.stats.cache_n == 0
    # The 300 shared tokens, cut to whole blocks: 256 come from the cache, the rest is prefilled.
    assert (second.stats.cache_n, second.stats.prompt_n) == (256, 46)
    assert second.text == fresh.text


@pytest.mark.parametrize("ubatch_size", [-64, 100])
def test_engine_refuses_a_chunk_size_off_the_block(ubatch_size):
    with pytest.raises(SeerError, match="multiple of 64"):
        Engine.load(EngineOptions(ubatch_size=ubatch_size))


# ---------------------------------------------------------------- command line


def test_generate_takes_a_ubatch_size(tmp_path):
    from typer.testing import CliRunner

    from seer_cli.app import app

    folder = save_tiny_model("llama", tmp_path / "tiny-llama")
    document = tmp_path / "doc.txt"
    document.write_text("All work and no play. " * 20)

    def generate(*flags):
        args = ["generate", "--model", str(folder), "-f", str(document), "-p", "Go on."]
        return CliRunner().invoke(app, [*args, "-n", "4", "--json", *flags])

    one_pass, chunked = generate("-ub", "0"), generate("--ubatch-size", "128")
    assert one_pass.exit_code == chunked.exit_code == 0, chunked.stderr
    assert json.loads(chunked.stdout)["text"] == json.loads(one_pass.stdout)["text"]
    refused = generate("-ub", "100")
    assert refused.exit_code == 1 and not refused.stdout
    assert "--ubatch-size must be 0 (one pass) or a multiple of 64" in refused.stderr


# ---------------------------------------------------------------- seer profile prefill


def test_profile_rows_per_ubatch_size(monkeypatch):
    from seer_cli.measure import prefill_profile, profiling

    model = tiny_model("llama")
    subject = prefill_profile.PrefillSubject("tiny", model, tiny_gates(model), "random", "random")
    real_prefill = prefill_profile.prefill

    def out_of_memory_in_one_pass(model, ids, on_layer=None, *, cache=None, ubatch_size=0):
        if ubatch_size == 0 and ids.shape[1] > 256:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return real_prefill(model, ids, on_layer, cache=cache, ubatch_size=ubatch_size)

    monkeypatch.setattr(prefill_profile, "prefill", out_of_memory_in_one_pass)
    report = profiling.profile_prefill(subject, [256, 300], [0.5], 1, ubatch_sizes=(0, 128))
    rows = {(row["n_prompt"], row["sparsity"], row["ubatch"]): row for row in report.rows}
    assert list(rows) == [
        (length, sparsity, ubatch)
        for length in (256, 300)
        for ubatch in (0, 128)
        for sparsity in (None, 0.5)
    ]
    assert rows[256, None, 128]["speedup"] == Stat(1.0, 0.0)
    assert rows[256, 0.5, 128]["achieved_sparsity"] == rows[256, 0.5, 0]["achieved_sparsity"]
    # The one pass at 300 tokens "ran out of memory": rows without times, and a note each.
    for sparsity in (None, 0.5):
        assert rows[300, sparsity, 0]["ttft_ms"] is None
        assert rows[300, sparsity, 0]["speedup"] is None
        assert rows[300, sparsity, 128]["ttft_ms"].mean > 0
    assert "pp300 @ dense ubatch 0: out of GPU memory" in report.notes
    assert "pp300 @ s0.50 ubatch 0: out of GPU memory" in report.notes


@pytest.mark.parametrize("text", ["100", "0,x", "-64"])
def test_profile_ubatch_sizes_are_checked(text):
    from seer_cli.measure.settings import parse_ubatch_sizes

    with pytest.raises(SeerError, match="--ubatch-size takes auto, 0"):
        parse_ubatch_sizes(text)
    assert parse_ubatch_sizes("8192, 0,8192") == [8192, 0]
    assert parse_ubatch_sizes("auto,0") == [None, 0]


def test_profile_chunks_as_generate_by_default(monkeypatch):
    from seer_cli.engine import generation
    from seer_cli.measure import prefill_profile

    model = tiny_model("llama")
    subject = prefill_profile.PrefillSubject("tiny", model, tiny_gates(model), "random", "random")
    monkeypatch.setattr(generation, "DEFAULT_UBATCH_SIZE", 128)
    monkeypatch.setattr(generation, "ONE_PASS_MAX_TOKENS", 256)
    report = prefill_profile.profile_prefill(subject, [256, 300], [0.5], 1)
    assert [(row["n_prompt"], row["sparsity"], row["ubatch"]) for row in report.rows] == [
        (256, None, 0),
        (256, 0.5, 0),
        (300, None, 0),
        (300, 0.5, 128),
    ]


def test_profile_breakdown_sums_the_chunks(monkeypatch):
    """Scoring sleeps 20 ms per layer and call: two chunks count twice."""
    import time

    from seer_cli.engine import attention
    from seer_cli.measure import profiling

    scores = attention.pooled_qk_scores

    def slow_scores(*args):
        time.sleep(0.02)
        return scores(*args)

    monkeypatch.delenv("SEER_ATTENTION_KERNEL", raising=False)
    monkeypatch.setattr(attention, "pooled_qk_scores", slow_scores)
    model = tiny_model("llama")
    sparse = profiling.TimedSparsePrefill(model, MaskPolicy(sparsity=0.5), gates=None)
    try:
        breakdown = profiling.instrumented_prefill(sparse, random_ids(256), ubatch_size=128)
    finally:
        sparse.detach()
    assert 2 * 20 * len(model.model.layers) <= breakdown.gates_ms < breakdown.total_ms


def test_pooled_keys_go_with_their_cache(attached):
    """Nothing keeps a finished prompt's pooled keys alive once its cache is gone."""
    import gc

    model = tiny_model("llama")
    sparse = attached(model, MaskPolicy(sparsity=0.5), tiny_gates(model))
    _, cache = prefill(model, random_ids(300), ubatch_size=128)
    assert len(sparse._past_keys._by_cache) == 1
    del cache
    gc.collect()
    assert len(sparse._past_keys._by_cache) == 0
