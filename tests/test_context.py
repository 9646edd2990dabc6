"""Context extension: llama.cpp's flags, transformers' own rope types switched per prompt, the
gates' block RoPE following the switch, and what generate, eval and distill say about it.

Tiny random models read CONTEXT (1024) tokens natively; the tests extend them to 4096.
"""

import copy
import json
import math
import re
from dataclasses import replace

import pytest
import torch
from seer_gates import MaskPolicy, block_count, load_gates, save_gates
from tiny_models import (
    CONTEXT,
    FAMILIES,
    char_tokenizer,
    gate_config,
    random_ids,
    save_tiny_model,
    tiny_gates,
    tiny_model,
)
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from seer_cli.app import app
from seer_cli.engine import attention, identity
from seer_cli.engine import context as context_module
from seer_cli.engine.attention import SparsePrefill
from seer_cli.engine.context import (
    ContextSettings,
    MeasuredFactors,
    ModelContext,
    RopeScaling,
    measured_factors,
    plan_context,
    rope_parameters_at_width,
    scaling_fields,
)
from seer_cli.engine.errors import SeerError
from seer_cli.engine.generation import SamplingOptions, generate
from seer_cli.engine.identity import model_identity
from seer_cli.engine.models import DEFAULT_MODEL
from seer_cli.engine.runtime import Engine, EngineOptions
from seer_cli.measure.evaluation import Evaluation
from seer_cli.measure.harvest import Harvester

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
EXTENDED = 4096


def reference_model(model, rope_parameters: dict):
    """A copy of ``model`` built by transformers from a config with ``rope_parameters``."""
    config = copy.deepcopy(model.config)
    config.rope_parameters = {**config.rope_parameters, **rope_parameters}
    config.max_position_embeddings = EXTENDED
    reference = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    reference.load_state_dict(model.state_dict())
    reference.generation_config.eos_token_id = None
    return reference.float().eval()


FACTOR = EXTENDED / CONTEXT
YARN = {"rope_type": "yarn", "factor": FACTOR, "original_max_position_embeddings": CONTEXT}
LINEAR = {"rope_type": "linear", "factor": FACTOR}


def logits_of(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=ids).logits


# ---------------------------------------------------------------- settings


def test_default_model_reads_32k_scaled_others_their_native_context():
    config = tiny_model("llama").config
    plan = plan_context(config, DEFAULT_MODEL, ContextSettings())
    assert (plan.native, plan.size) == (CONTEXT, 32768)
    # The measured factors serve the default model's own 8192-token config only, so YaRN here,
    # with its betas as measured best for the default model (MEASURED_YARN_BETAS).
    assert plan.scaling == RopeScaling("yarn", 32768 / CONTEXT, CONTEXT, beta_fast=128, beta_slow=2)
    other = plan_context(config, "tiny", ContextSettings())
    assert (other.size, other.scaling) == (CONTEXT, None)
    native_only = plan_context(config, DEFAULT_MODEL, ContextSettings(rope_scaling="none"))
    assert (native_only.size, native_only.scaling) == (CONTEXT, None)


@pytest.mark.parametrize(
    "settings, scaling",
    [
        (ContextSettings(ctx_size=EXTENDED), RopeScaling("yarn", 4.0, CONTEXT)),
        (
            ContextSettings(ctx_size=3000, rope_scaling="linear"),
            RopeScaling("linear", 3000 / CONTEXT, CONTEXT),
        ),
        (ContextSettings(ctx_size=EXTENDED, rope_scale=8), RopeScaling("yarn", 8, CONTEXT)),
        (ContextSettings(ctx_size=EXTENDED, yarn_orig_ctx=512), RopeScaling("yarn", 8.0, 512)),
        (ContextSettings(ctx_size=CONTEXT, rope_scaling="yarn"), None),
    ],
    ids=["yarn-default-scale", "linear", "larger-scale", "smaller-original", "fits-natively"],
)
def test_scale_defaults_to_the_size_over_the_original_context(settings, scaling):
    assert plan_context(tiny_model("llama").config, "tiny", settings).scaling == scaling


def test_yarn_knobs_not_given_keep_their_defaults_and_show_when_given():
    settings = ContextSettings(ctx_size=EXTENDED, yarn_attn_factor=1.1, yarn_beta_slow=2)
    scaling = plan_context(tiny_model("llama").config, "tiny", settings).scaling
    assert scaling == RopeScaling("yarn", 4.0, CONTEXT, attn_factor=1.1, beta_slow=2)
    assert scaling.beta_fast == 32
    assert str(scaling) == f"YaRN ×4 from {CONTEXT}, attn factor 1.1, beta slow 2"


def test_measured_yarn_betas_give_way_to_either_beta_given():
    config = tiny_model("llama").config

    def betas(**knobs):
        scaling = plan_context(config, DEFAULT_MODEL, ContextSettings(**knobs)).scaling
        return scaling.beta_fast, scaling.beta_slow

    assert betas(yarn_beta_fast=64) == (64, 1)
    assert betas(yarn_beta_slow=4) == (32, 4)


NONSENSE = [
    (ContextSettings(ctx_size=0), ["--ctx-size", "at least 1"]),
    (ContextSettings(ctx_size=-5), ["--ctx-size", "-5"]),
    (ContextSettings(rope_scaling="ntk"), ["--rope-scaling", "none, linear, yarn"]),
    (ContextSettings(rope_scale=0), ["--rope-scale", "at least 1"]),
    (ContextSettings(rope_scale=float("nan")), ["--rope-scale"]),
    (ContextSettings(yarn_orig_ctx=0), ["--yarn-orig-ctx", "at least 1"]),
    (ContextSettings(rope_scaling="none", rope_scale=2), ["need --rope-scaling linear or yarn"]),
    (ContextSettings(rope_scaling="linear", yarn_orig_ctx=512), ["yarn only"]),
    (ContextSettings(ctx_size=EXTENDED, rope_scale=2), ["stretches 1024 tokens to 2048", "4096"]),
    (ContextSettings(ctx_size=EXTENDED, rope_scaling="none"), ["none does not extend"]),
    (ContextSettings(ctx_size=EXTENDED, yarn_orig_ctx=2048), ["longer than the native"]),
    (ContextSettings(yarn_attn_factor=0), ["--yarn-attn-factor must be a positive number"]),
    (ContextSettings(yarn_beta_fast=-8), ["--yarn-beta-fast must be a positive number", "-8"]),
    (ContextSettings(yarn_beta_slow=float("inf")), ["--yarn-beta-slow must be a positive"]),
    (ContextSettings(yarn_beta_fast=4, yarn_beta_slow=4), ["slow 4 must be below --yarn-beta"]),
    (ContextSettings(yarn_beta_slow=40), ["--yarn-beta-slow 40 must be below --yarn-beta-fast 32"]),
    (ContextSettings(yarn_beta_fast=0.5), ["slow 1 must be below --yarn-beta-fast 0.5"]),
    (ContextSettings(rope_scaling="linear", yarn_attn_factor=2), ["--yarn-attn-factor applies to"]),
    (ContextSettings(rope_scaling="none", yarn_beta_fast=16), ["--yarn-beta-fast applies to"]),
]


@pytest.mark.parametrize("settings, phrases", NONSENSE, ids=[str(s) for s, _ in NONSENSE])
def test_nonsense_settings_are_one_sentence(settings, phrases):
    with pytest.raises(SeerError) as error:
        plan_context(tiny_model("llama").config, "tiny", settings)
    message = str(error.value)
    assert message.endswith(".") and message.count(". ") == 0
    for phrase in phrases:
        assert phrase in message


def test_a_model_that_scales_its_rope_already_is_not_extended():
    model = reference_model(tiny_model("llama"), LINEAR)
    model.config.max_position_embeddings = CONTEXT
    with pytest.raises(SeerError, match="already scales its RoPE"):
        plan_context(model.config, "tiny", ContextSettings(ctx_size=EXTENDED))


# ---------------------------------------------------------------- measured LongRoPE factors


def shipped_default_model_config():
    """The tiny model's config with the default model's native context (its head_dim, 64, is
    the default model's too)."""
    config = copy.deepcopy(tiny_model("llama").config)
    config.max_position_embeddings = 8192
    return config


def test_the_default_model_ships_factors_for_its_extended_context():
    factors = measured_factors(DEFAULT_MODEL)
    assert (factors.original_ctx, factors.ctx_size) == (8192, 32768)
    assert len(factors.long_factor) == 32 and min(factors.long_factor) >= 1
    assert factors.attention_factor > 1 and "pg2641" in factors.measured
    assert measured_factors("tiny") is None


def test_measured_factors_are_the_default_where_they_serve_the_model():
    config = shipped_default_model_config()
    default = plan_context(config, DEFAULT_MODEL, ContextSettings()).scaling
    assert default == RopeScaling("longrope", 4.0, 8192, factors=measured_factors(DEFAULT_MODEL))
    assert str(default) == "LongRoPE ×4, factors measured for the model"
    # Past the factors' context, or with a YaRN setting given, YaRN with the measured betas.
    longer = plan_context(config, DEFAULT_MODEL, ContextSettings(ctx_size=65536)).scaling
    assert longer == RopeScaling("yarn", 8.0, 8192, beta_fast=128, beta_slow=2)
    for settings in (
        ContextSettings(rope_scaling="yarn"),
        ContextSettings(rope_scale=4),
        ContextSettings(yarn_orig_ctx=8192),
        ContextSettings(yarn_beta_fast=64),
    ):
        assert plan_context(config, DEFAULT_MODEL, settings).scaling.kind == "yarn"
    # Asked for past the factors' context, they refuse.
    with pytest.raises(SeerError, match="serve 8192-token models up to 32768 tokens"):
        plan_context(config, DEFAULT_MODEL, ContextSettings(65536, rope_scaling="longrope"))


TINY_FACTORS = MeasuredFactors(
    "tiny", CONTEXT, EXTENDED, tuple(1 + 0.1 * i for i in range(32)), 1.05, "by the test"
)
LONGROPE = {
    "rope_type": "longrope",
    "long_factor": list(TINY_FACTORS.long_factor),
    "short_factor": [1.0] * 32,
    "original_max_position_embeddings": CONTEXT,
    "attention_factor": 1.05,
}


LONGROPE_SETTINGS = ContextSettings(EXTENDED, rope_scaling="longrope")


@pytest.fixture
def tiny_factors(monkeypatch):
    monkeypatch.setattr(context_module, "measured_factors", lambda name: TINY_FACTORS)


@pytest.mark.parametrize("family", FAMILIES)
def test_long_prompts_run_transformers_own_longrope(family, tiny_factors):
    model = tiny_model(family)
    context = ModelContext(model, "tiny", LONGROPE_SETTINGS)
    long_ids, short_ids = random_ids(1500), random_ids(300)
    unscaled = logits_of(model, short_ids)
    assert context.apply(1500).kind == "longrope"
    # transformers' longrope reads the long factors past the original context.
    expected = logits_of(reference_model(model, LONGROPE), long_ids)
    torch.testing.assert_close(logits_of(model, long_ids), expected)
    assert context.apply(300) is None
    torch.testing.assert_close(logits_of(model, short_ids), unscaled, rtol=0, atol=0)


def test_a_rescaled_context_runs_the_new_scaling(tiny_factors):
    # benchmarks/longrope_attention_factor.py compares variants of the extension on one model.
    model = tiny_model("llama")
    context = ModelContext(model, "tiny", LONGROPE_SETTINGS)
    long_ids = random_ids(1500)
    context.apply(1500)
    measured = logits_of(model, long_ids)
    scaling = context.plan.scaling
    context.rescale(replace(scaling, factors=replace(scaling.factors, attention_factor=1.2)))
    assert context.apply(1500).factors.attention_factor == 1.2
    expected = logits_of(reference_model(model, {**LONGROPE, "attention_factor": 1.2}), long_ids)
    torch.testing.assert_close(logits_of(model, long_ids), expected)
    assert not torch.allclose(logits_of(model, long_ids), measured)


def test_longrope_tables_do_not_depend_on_the_positions_asked_for(tiny_factors):
    # Chunks of a long prompt and the gates' block positions start below the original context:
    # they must get the same frequencies as the rest of the prompt.
    model = tiny_model("llama")
    ModelContext(model, "tiny", LONGROPE_SETTINGS).apply(2000)
    rotary, x = model.model.rotary_emb, torch.zeros(1, 1, 8)
    positions = torch.arange(2000)[None]
    whole_cos, _ = rotary(x, positions)
    first_cos, _ = rotary(x, positions[:, :100])
    torch.testing.assert_close(first_cos, whole_cos[:, :100], rtol=0, atol=0)


def test_longrope_frequencies_are_computed_once_not_on_every_call(tiny_factors, monkeypatch):
    from transformers import modeling_rope_utils

    model = tiny_model("llama")
    ModelContext(model, "tiny", LONGROPE_SETTINGS).apply(2000)
    calls = []
    longrope = modeling_rope_utils.ROPE_INIT_FUNCTIONS["longrope"]
    monkeypatch.setitem(
        modeling_rope_utils.ROPE_INIT_FUNCTIONS,
        "longrope",
        lambda *args, **kwargs: calls.append(1) or longrope(*args, **kwargs),
    )
    expected = logits_of(reference_model(model, LONGROPE), random_ids(1500))
    calls.clear()  # the reference's own
    torch.testing.assert_close(logits_of(model, random_ids(1500)), expected)
    assert calls == []
    # The gates' block RoPE: computed when its module is built, not again when called.
    attention.block_rope(model, 64, block_count(2000), 1, "cpu")
    assert calls == [1]


def test_gate_block_rope_reads_the_measured_factors_at_its_width(tiny_factors):
    model = tiny_model("llama")
    ModelContext(model, "tiny", LONGROPE_SETTINGS).apply(2000)
    nb = block_count(2000)
    # At the model's own width the gates' tables are the model's, at block positions.
    positions = (torch.arange(nb) * 64)[None]
    cos, sin = model.model.rotary_emb(torch.zeros(1, 1, 8), positions)
    tables = attention.block_rope(model, 64, nb, 1, "cpu")
    torch.testing.assert_close(tables[0][0], cos[0])
    torch.testing.assert_close(tables[1][0], sin[0])
    # Twice as wide: every other frequency is one of the model's, with its factor.
    wide_cos, _ = attention.block_rope(model, 128, nb, 1, "cpu")
    torch.testing.assert_close(wide_cos[0, :, 0:64:2], cos[0, :, :32])


def test_rope_parameters_at_another_width_keep_each_frequency_factor():
    params = {"rope_type": "longrope", "long_factor": [1.0, 2.0, 4.0], "short_factor": [1.0] * 3}
    wide = rope_parameters_at_width(params, 6, 12)
    assert wide["long_factor"] == [1.0, 1.5, 2.0, 3.0, 4.0, 4.0]
    assert rope_parameters_at_width(params, 6, 6) is params
    yarn = {"rope_type": "yarn", "factor": 4.0}
    assert rope_parameters_at_width(yarn, 6, 12) is yarn


LONGROPE_NONSENSE = [
    (ContextSettings(ctx_size=16384, rope_scaling="longrope"), "tiny",
     ["no measured LongRoPE factors for tiny", "--rope-scaling yarn"]),
    (ContextSettings(rope_scaling="longrope", rope_scale=4), "tiny",
     ["need --rope-scaling linear or yarn"]),
    (ContextSettings(rope_scaling="longrope", yarn_beta_slow=2), "tiny",
     ["--yarn-beta-slow applies to --rope-scaling yarn only"]),
    (ContextSettings(ctx_size=65536, rope_scaling="longrope"), DEFAULT_MODEL,
     ["serve 8192-token models up to 32768 tokens", "not --ctx-size 65536"]),
]  # fmt: skip


@pytest.mark.parametrize(
    "settings, name, phrases", LONGROPE_NONSENSE, ids=["no-factors", "scale", "beta", "too-long"]
)
def test_longrope_nonsense_is_one_sentence(settings, name, phrases):
    with pytest.raises(SeerError) as error:
        plan_context(shipped_default_model_config(), name, settings)
    message = str(error.value)
    assert message.endswith(".") and message.count(". ") == 0
    for phrase in phrases:
        assert phrase in message


# ---------------------------------------------------------------- the RoPE switch


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kind, parameters", [("yarn", YARN), ("linear", LINEAR)])
def test_long_prompts_run_transformers_own_scaled_rope(family, kind, parameters):
    model = tiny_model(family)
    context = ModelContext(model, "tiny", ContextSettings(EXTENDED, rope_scaling=kind))
    long_ids, short_ids = random_ids(1500), random_ids(300)
    unscaled = logits_of(model, short_ids)

    assert context.apply(1500) == RopeScaling(kind, 4.0, CONTEXT)
    expected = logits_of(reference_model(model, parameters), long_ids)
    torch.testing.assert_close(logits_of(model, long_ids), expected)
    # Back to a short prompt: the model's own RoPE again.
    assert context.apply(300) is None
    torch.testing.assert_close(logits_of(model, short_ids), unscaled, rtol=0, atol=0)


YARN_KNOBS = {"yarn_attn_factor": 1.2, "yarn_beta_fast": 16.0, "yarn_beta_slow": 2.0}


def scaled_rotary(model, **knobs):
    """The rotary module ``model`` runs a 2000-token prompt with, YaRN ×4 with ``knobs``."""
    ModelContext(model, "tiny", ContextSettings(EXTENDED, **knobs)).apply(2000)
    return model.model.rotary_emb


def test_without_yarn_knobs_the_rope_config_is_transformers_default_yarn():
    model = tiny_model("llama")
    rotary = scaled_rotary(model)
    assert rotary.config.rope_parameters == {**model.config.rope_parameters, **YARN}


def test_yarn_knobs_reach_transformers_rope_parameters():
    model, ids = tiny_model("llama"), random_ids(2000)
    parameters = scaled_rotary(model, **YARN_KNOBS).config.rope_parameters
    knobs = {key: parameters[key] for key in ("attention_factor", "beta_fast", "beta_slow")}
    assert (knobs["beta_fast"], knobs["beta_slow"]) == (16.0, 2.0)
    expected = logits_of(reference_model(model, {**YARN, **knobs}), ids)
    torch.testing.assert_close(logits_of(model, ids), expected)
    default = tiny_model("llama")
    scaled_rotary(default)
    assert not torch.allclose(logits_of(model, ids), logits_of(default, ids))


def test_yarn_attn_factor_multiplies_transformers_default_attention_scaling():
    default = scaled_rotary(tiny_model("llama")).attention_scaling
    assert default == pytest.approx(0.1 * math.log(FACTOR) + 1)  # transformers' YaRN default
    scaled = scaled_rotary(tiny_model("llama"), yarn_attn_factor=1.2)
    assert scaled.config.rope_parameters["attention_factor"] == pytest.approx(1.2 * default)
    assert scaled.attention_scaling == pytest.approx(1.2 * default)
    torch.testing.assert_close(scaled.inv_freq, scaled_rotary(tiny_model("llama")).inv_freq)


def test_the_whole_sequence_decides_and_too_long_is_refused():
    context = ModelContext(tiny_model("llama"), "tiny", ContextSettings(EXTENDED))
    assert context.scaling_for(CONTEXT) is None
    assert context.scaling_for(CONTEXT + 1) is not None
    too_long = f"{EXTENDED + 1} tokens do not fit the context of {EXTENDED}"
    with pytest.raises(SeerError, match=too_long):
        context.apply(EXTENDED + 1)


def test_decoding_continues_with_the_prefill_scaling():
    model = tiny_model("llama")
    engine = Engine(model, char_tokenizer(), "tiny",
                    context=ModelContext(model, "tiny", ContextSettings(EXTENDED)))  # fmt: skip
    prompt = random_ids(CONTEXT - 20)[0].tolist()
    options = SamplingOptions(max_tokens=40)  # prompt + answer pass the native context
    result = engine.generate(prompt, options)
    expected = generate(reference_model(model, YARN), char_tokenizer(), prompt, options).text
    assert result.text == expected
    stats = result.stats.to_dict()
    assert (stats["n_ctx"], stats["n_ctx_train"]) == (EXTENDED, CONTEXT)
    assert scaling_fields(RopeScaling("yarn", 4.0, CONTEXT)).items() <= stats.items()
    short = engine.generate(prompt[:200], options).stats
    assert (short.rope_scaling, short.rope_scale, short.yarn_orig_ctx) == ("none", None, None)


def test_gate_block_rope_follows_the_scaling():
    model = tiny_model("llama")
    context = ModelContext(model, "tiny", ContextSettings(EXTENDED))
    nb = block_count(2000)
    native = attention.block_rope(model, 128, nb, 1, "cpu")
    context.apply(2000)
    scaled = attention.block_rope(model, 128, nb, 1, "cpu")
    expected = attention.block_rope(reference_model(model, YARN), 128, nb, 1, "cpu")
    torch.testing.assert_close(scaled, expected)
    assert not torch.allclose(scaled[0], native[0])


@pytest.mark.parametrize("length", [CONTEXT - 100, 2000], ids=["native-length", "long"])
def test_sparse_prefill_under_scaling_matches_the_scaled_model(length):
    model, ids = tiny_model("llama"), random_ids(length)
    gates = tiny_gates(model)
    reference = reference_model(model, YARN)
    policy = MaskPolicy(sparsity=0.7)
    prefills = [SparsePrefill(m, policy, gates) for m in (model, reference)]
    context = ModelContext(model, "tiny", ContextSettings(EXTENDED))
    try:
        # Native first: the gates' RoPE tables of this length are cached, and must not be
        # reused once the same length runs scaled (as eval's context task runs it).
        unscaled = logits_of(model, ids)
        context.use(context.plan.scaling)
        scaled = logits_of(model, ids)
        torch.testing.assert_close(scaled, logits_of(reference, ids))
        assert not torch.allclose(scaled, unscaled)
    finally:
        for prefill in prefills:
            prefill.detach()


# ---------------------------------------------------------------- the commands


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("context")
    save_tiny_model("llama", folder / "tiny-llama")
    model = tiny_model("llama")
    save_gates(folder / "gates.safetensors", tiny_gates(model), gate_config(model, "tiny-llama"))
    (folder / "long.txt").write_text("The cat sat on the mat. " * 100, encoding="utf-8")  # 2400
    (folder / "short.txt").write_text("The cat sat on the mat. " * 10, encoding="utf-8")
    return folder


def run(*args: str, env: dict | None = None):
    return CliRunner().invoke(app, list(args), env=env)


def one_error_line(result) -> str:
    assert "Traceback" not in result.stdout + result.stderr
    assert result.exit_code == 1, result.stderr
    assert result.stdout == ""
    lines = [line for line in ANSI.sub("", result.stderr).splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def yarn_knobs(fields: dict) -> tuple:
    """YaRN's knobs as JSON output and gate metadata record them."""
    return tuple(fields[f"yarn_{name}"] for name in ("attn_factor", "beta_fast", "beta_slow"))


def generate_args(folder, document: str, *extra: str) -> list[str]:
    return ["generate", "--model", str(folder / "tiny-llama"), "-f", str(folder / document),
            "-p", "Sum.", "-n", "4", "--device", "cpu", *extra]  # fmt: skip


def test_generate_says_which_rope_it_used(tiny_folder):
    result = run(*generate_args(tiny_folder, "long.txt", "--ctx-size", "4096", "--json"))
    assert result.exit_code == 0, result.stderr
    stats = json.loads(result.stdout)
    assert stats["prompt_n"] > CONTEXT
    assert (stats["n_ctx"], stats["n_ctx_train"], stats["rope_scaling"]) == (4096, CONTEXT, "yarn")
    assert (stats["rope_scale"], stats["yarn_orig_ctx"]) == (4.0, CONTEXT)
    assert yarn_knobs(stats) == (1, 32, 1)

    result = run(*generate_args(tiny_folder, "short.txt", "--ctx-size", "4096"))
    assert result.exit_code == 0, result.stderr
    assert f"Context: 4096 tokens, RoPE unscaled (prompt and answer fit the native {CONTEXT})" in (
        ANSI.sub("", result.stderr)
    )
    result = run(*generate_args(tiny_folder, "long.txt", "--rope-scaling", "linear"),
                 env={"SEER_CTX_SIZE": "3072"})  # fmt: skip
    assert result.exit_code == 0, result.stderr
    assert f"Context: 3072 tokens, RoPE linear ×3 (past the native {CONTEXT})" in (
        ANSI.sub("", result.stderr)
    )


def test_generate_says_it_read_measured_factors(tiny_folder, tiny_factors):
    args = generate_args(tiny_folder, "long.txt", "--ctx-size", "4096", "--rope-scaling")
    args = [*args, "longrope"]
    result = run(*args, "--json")
    assert result.exit_code == 0, result.stderr
    stats = json.loads(result.stdout)
    assert (stats["rope_scaling"], stats["rope_scale"], stats["yarn_orig_ctx"]) == (
        "longrope",
        4.0,
        None,
    )
    result = run(*args)
    assert "RoPE LongRoPE ×4, factors measured for the model (past the native 1024)" in (
        ANSI.sub("", result.stderr)
    )


def test_shipped_gates_for_the_extended_context_score_prompts_past_the_native_one(
    tiny_folder, tmp_path, monkeypatch
):
    """With two shipped files for a model, one distilled at the native context and one under a
    scaled RoPE, --gates auto scores each prompt with the file for its context (told apart here
    by the windows they name) if the prompt runs under the extension that file was distilled
    under, else the training-free estimator; --local-blocks overrides every window; --gates FILE
    serves everywhere."""
    model = tiny_model("llama")
    files = {}
    for name, local_blocks, scaling in (("native", 2, "none"), ("extended", 1, "yarn")):
        config = gate_config(model, "tiny-llama")
        config.metadata = {"model_identity": model_identity(model), "local_blocks": local_blocks,
                           "rope_scaling": scaling}  # fmt: skip
        files[name] = tmp_path / f"{name}.safetensors"
        save_gates(files[name], tiny_gates(model), config)
    monkeypatch.setattr(identity, "shipped_gate_files", lambda: sorted(files.values()))
    long, short = ((tiny_folder / name).read_text() for name in ("long.txt", "short.txt"))

    def windows(*documents: str, rope_scaling=None, **options) -> list[tuple]:
        context = ContextSettings(ctx_size=EXTENDED, rope_scaling=rope_scaling)
        engine = Engine.load(EngineOptions(
            model=str(tiny_folder / "tiny-llama"), sparsity=0.5, sparse_min_tokens=0,
            device="cpu", context=context, **options,
        ))  # fmt: skip
        found = []
        for document in documents:
            prompt = engine.prompt(document=document, instruction="Sum.", max_tokens=4)
            stats = engine.generate(prompt.ids, SamplingOptions(max_tokens=4)).stats
            found.append((stats.rope_scaling, stats.scoring, stats.local_blocks))
        return found

    assert windows(long, short, long) == [
        ("yarn", "gates", 1),
        ("none", "gates", 2),
        ("yarn", "gates", 1),
    ]
    assert windows(long, short, local_blocks=3) == [("yarn", "gates", 3), ("none", "gates", 3)]
    assert windows(long, gates=str(files["native"])) == [("yarn", "gates", 2)]
    # Without a file distilled under the prompt's extension, the training-free estimator.
    assert windows(long, short, rope_scaling="linear") == [
        ("linear", "pooled", 0),
        ("none", "gates", 2),
    ]
    monkeypatch.setattr(identity, "shipped_gate_files", lambda: [files["native"]])
    assert windows(long, short) == [("yarn", "pooled", 0), ("none", "gates", 2)]
    assert windows(long, local_blocks=3) == [("yarn", "pooled", 3)]


def test_context_keys_in_the_config_file(tiny_folder, tmp_path, monkeypatch):
    config = tmp_path / "config.toml"
    config.write_text('ctx-size = 4096\n[generate]\nrope_scaling = "linear"\n', encoding="utf-8")
    monkeypatch.setenv("SEER_CONFIG", str(config))
    result = run(*generate_args(tiny_folder, "long.txt", "--json"))
    assert result.exit_code == 0, result.stderr
    stats = json.loads(result.stdout)
    assert (stats["n_ctx"], stats["rope_scaling"], stats["rope_scale"]) == (4096, "linear", 4.0)


def test_yarn_knobs_from_flags_environment_and_config_file(tiny_folder, tmp_path, monkeypatch):
    config = tmp_path / "config.toml"
    config.write_text("yarn-beta-fast = 16\n", encoding="utf-8")
    monkeypatch.setenv("SEER_CONFIG", str(config))
    args = generate_args(tiny_folder, "long.txt", "--ctx-size", "4096", "--yarn-attn-factor", "1.1")
    result = run(*args, "--json", env={"SEER_YARN_BETA_SLOW": "2"})
    assert result.exit_code == 0, result.stderr
    stats = json.loads(result.stdout)
    assert yarn_knobs(stats) == (1.1, 16, 2)
    result = run(*args)
    assert result.exit_code == 0, result.stderr
    line = f"RoPE YaRN ×4 from {CONTEXT}, attn factor 1.1, beta fast 16 (past the native {CONTEXT})"
    assert line in ANSI.sub("", result.stderr)


CLI_NONSENSE = [
    (["--ctx-size", "0"], "--ctx-size must be at least 1"),
    (["--ctx-size", "-1"], "--ctx-size must be at least 1"),
    (["--rope-scale", "-2"], "--rope-scale must be a factor of at least 1"),
    (["--ctx-size", "4096", "--rope-scale", "2"], "short of --ctx-size 4096"),
    (["--ctx-size", "4096", "--rope-scaling", "none"], "does not extend it"),
    (["--rope-scaling", "dynamic"], "--rope-scaling must be one of none, linear, yarn"),
    (["--yarn-attn-factor", "0"], "--yarn-attn-factor must be a positive number, got 0.0"),
    (["--yarn-beta-fast", "-1"], "--yarn-beta-fast must be a positive number, got -1.0"),
    (["--yarn-beta-slow", "32"], "--yarn-beta-slow 32 must be below --yarn-beta-fast 32"),
    (["--rope-scaling", "linear", "--yarn-beta-fast", "16"], "applies to --rope-scaling yarn only"),
    (["--ctx-size", "2048"], "pass --truncate"),
]


@pytest.mark.parametrize("args, phrase", CLI_NONSENSE, ids=[" ".join(a) for a, _ in CLI_NONSENSE])
def test_nonsense_flags_are_one_error_line(tiny_folder, args, phrase):
    assert phrase in one_error_line(run(*generate_args(tiny_folder, "long.txt", *args)))


@pytest.mark.parametrize(
    "command",
    [["batch", "doc.txt"], ["eval", "--data", "doc.txt"], ["profile", "prefill"],
     ["distill", "--data", "doc.txt", "--out", "gates.safetensors"]],
    ids=["batch", "eval", "profile", "distill"],
)  # fmt: skip
def test_every_command_with_context_flags_checks_the_yarn_knobs(command):
    error = one_error_line(run(*command, "--yarn-beta-fast", "0.5"))
    assert "--yarn-beta-slow 1 must be below --yarn-beta-fast 0.5" in error


def test_truncate_fits_the_extended_context(tiny_folder):
    args = generate_args(tiny_folder, "long.txt", "--ctx-size", "1500", "--truncate", "end",
                         "--json")  # fmt: skip
    result = run(*args)
    assert result.exit_code == 0, result.stderr
    stats = json.loads(result.stdout)
    assert stats["prompt_n"] + 4 <= 1500 < stats["prompt_n"] + 4 + 8
    assert stats["truncated_tokens"] > 0 and stats["rope_scaling"] == "yarn"


def eval_args(folder, *extra: str) -> list[str]:
    return ["eval", "--model", str(folder / "tiny-llama"), "--gates",
            str(folder / "gates.safetensors"), "--data", str(folder / "long.txt"),
            "--ctx-size", "4096", "--max-windows", "1", "--device", "cpu", *extra]  # fmt: skip


def test_eval_measures_the_extension_against_the_native_context(tiny_folder):
    result = run(*eval_args(tiny_folder, "--seq-len", "2048", "--tasks", "context,perplexity",
                            "--sparsities", "0.5", "--thresholds", "", "--tail", "500",
                            "--json"))  # fmt: skip
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert (report["rope"], report["tail_tokens"]) == ("YaRN ×4 from 1024", 500)
    assert report["scaling"] == scaling_fields(RopeScaling("yarn", 4.0, CONTEXT))
    rows = report["context"]
    assert [(row["tokens"], row["rope"]) for row in rows] == [
        (CONTEXT, "native"),
        (CONTEXT, "YaRN ×4 from 1024"),
        (2048, "YaRN ×4 from 1024"),
    ]
    assert rows[0]["delta_percent"] is None and rows[2]["delta_percent"] is not None
    assert [row["policy"] for row in report["perplexity"]][0] == "dense"


def test_eval_reports_the_yarn_knobs(tiny_folder):
    result = run(*eval_args(tiny_folder, "--seq-len", "2048", "--tasks", "context", "--tail",
                            "500", "--yarn-attn-factor", "0.9", "--yarn-beta-slow", "2",
                            "--json"))  # fmt: skip
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    rope = f"YaRN ×4 from {CONTEXT}, attn factor 0.9, beta slow 2"
    assert report["rope"] == rope == report["context"][-1]["rope"]
    assert yarn_knobs(report["scaling"]) == (0.9, 32, 2)


def test_eval_auto_gates_are_those_for_the_windows_context(tiny_folder, tmp_path, monkeypatch):
    """--gates auto scores windows past the native context with the file distilled under their
    extension, as `seer generate` scores such a prompt, and shorter ones with the native file."""
    model = tiny_model("llama")
    files = {}
    for name, scaling in (("native", "none"), ("extended", "yarn")):
        config = gate_config(model, "tiny-llama")
        config.metadata = {"model_identity": model_identity(model), "rope_scaling": scaling}
        files[name] = tmp_path / f"{name}.safetensors"
        save_gates(files[name], tiny_gates(model), config)
    monkeypatch.setattr(identity, "shipped_gate_files", lambda: sorted(files.values()))
    args = [a for a in eval_args(tiny_folder) if a != str(tiny_folder / "gates.safetensors")]
    args.remove("--gates")
    for seq_len, expected in (("2048", "extended"), ("512", "native")):
        result = run(*args, "--seq-len", seq_len, "--tasks", "perplexity", "--sparsities", "0.5",
                     "--thresholds", "", "--json")  # fmt: skip
        assert result.exit_code == 0, result.stderr
        assert json.loads(result.stdout)["gates"] == str(files[expected])


def test_evaluation_tail_perplexity_counts_the_last_tokens():
    model = tiny_model("llama")
    windows = [random_ids(600, seed=i)[0] for i in range(2)]
    whole = Evaluation(model, char_tokenizer(), tiny_gates(model), windows)
    tail = Evaluation(model, char_tokenizer(), tiny_gates(model), windows, tail=599)
    assert tail.perplexity([0.5], [])[0].perplexity == pytest.approx(
        whole.perplexity([0.5], [])[0].perplexity, rel=1e-6
    )


EVAL_NONSENSE = [
    (["--seq-len", "512", "--tasks", "context"], "--seq-len 512 is not longer"),
    (["--seq-len", "2048", "--tail", "1024"], "--tail 1024 must be shorter than the native"),
    (["--seq-len", "2048", "--tail", "0"], "--tail must be in [1, --seq-len)"),
    (["--seq-len", "8192"], "longer than the context of tiny-llama (4096 tokens, --ctx-size)"),
]


@pytest.mark.parametrize("args, phrase", EVAL_NONSENSE, ids=[" ".join(a) for a, _ in EVAL_NONSENSE])
def test_eval_nonsense_is_one_error_line(tiny_folder, args, phrase):
    assert phrase in one_error_line(run(*eval_args(tiny_folder, *args)))


def test_distilled_gates_record_their_scaling(tiny_folder, tmp_path):
    out = tmp_path / "gates.safetensors"
    result = run("distill", "--model", str(tiny_folder / "tiny-llama"), "--data",
                 str(tiny_folder / "long.txt"), "--data", str(tiny_folder / "long.txt"),
                 "--seq-len", "1100", "--ctx-size", "2048", "--steps", "2", "--batch-size", "1",
                 "--local-blocks", "2", "--out", str(out), "--device", "cpu",
                 "--quiet")  # fmt: skip
    assert result.exit_code == 0, result.stderr
    metadata = load_gates(out)[0].metadata
    assert metadata["local_blocks"] == 2
    assert metadata["n_ctx_train"] == CONTEXT
    assert (metadata["rope_scaling"], metadata["rope_scale"]) == ("yarn", 2.0)
    assert metadata["yarn_orig_ctx"] == CONTEXT
    assert yarn_knobs(metadata) == (1, 32, 1)
    assert metadata["harvest_minutes"] >= 0


def test_distill_learns_the_attention_mass_when_asked(tiny_folder, tmp_path):
    out = tmp_path / "mass.safetensors"
    result = run("distill", "--model", str(tiny_folder / "tiny-llama"), "--data",
                 str(tiny_folder / "long.txt"), "--data", str(tiny_folder / "long.txt"),
                 "--seq-len", "600", "--steps", "2", "--batch-size", "1", "--target", "mass",
                 "--out", str(out), "--device", "cpu", "--quiet")  # fmt: skip
    assert result.exit_code == 0, result.stderr
    assert load_gates(out)[0].metadata["target"] == "mass"
    nonsense = run("distill", "--model", str(tiny_folder / "tiny-llama"), "--data",
                   str(tiny_folder / "long.txt"), "--target", "sum", "--out",
                   str(tmp_path / "x.safetensors"), "--device", "cpu")  # fmt: skip
    assert "--target must be one of maxpool, mass, got 'sum'" in one_error_line(nonsense)
    assert not (tmp_path / "x.safetensors").exists()


def test_harvested_mass_is_each_block_row_share_of_the_attention():
    model, ids = tiny_model("llama"), random_ids(600)
    with Harvester(model, 64, "mass") as harvester:
        mass = harvester.window(ids).target  # [L, Hq, nb, nb]
    with Harvester(model, 64) as harvester:
        peak = harvester.window(ids).target
    nb = block_count(600)
    causal = torch.ones(nb, nb, dtype=torch.bool).tril()
    for target in (mass, peak):
        torch.testing.assert_close(target.sum(-1), torch.ones(target.shape[:-1]))
        assert (target[..., ~causal] == 0).all()
    assert not torch.allclose(mass, peak, atol=1e-3)
    # The first query block attends only to itself; in the mass map it holds everything.
    torch.testing.assert_close(mass[..., 0, 0], torch.ones(mass.shape[:2]))


def test_frequencies_cast_to_bfloat16_are_rebuilt_in_float32():
    model = tiny_model("llama")
    expected = model.model.rotary_emb.inv_freq.clone()
    model.to(torch.bfloat16)
    ModelContext(model, "tiny", ContextSettings(EXTENDED))
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32
    torch.testing.assert_close(model.model.rotary_emb.inv_freq, expected, rtol=0, atol=0)


def test_profile_prefill_runs_long_prompts_scaled():
    from seer_cli.measure.prefill_profile import PrefillSubject, profile_prefill

    model = tiny_model("llama")
    context = ModelContext(model, "tiny", ContextSettings(EXTENDED))
    subject = PrefillSubject("tiny", model, None, "random", "pooled", context)
    report = profile_prefill(subject, [300, 2000], [], repeats=1)
    assert [row["n_prompt"] for row in report.rows] == [300, 2000]
    assert f"prompts past the native {CONTEXT} tokens: RoPE YaRN ×4 from {CONTEXT}" in report.notes
    with pytest.raises(SeerError, match=f"{EXTENDED + 1} tokens do not fit"):
        profile_prefill(subject, [EXTENDED + 1], [], repeats=1)
