"""Gates are matched to a model by what it is (shapes, vocabulary, a few weights), not its name."""

import json

import pytest
import torch
from conftest import BOOK
from seer_gates import GateConfig, build_gates, read_gate_config, save_gates
from tiny_models import tiny_model
from typer.testing import CliRunner

from seer_cli.app import app
from seer_cli.engine.identity import (
    describe,
    find_shipped_gates,
    model_identity,
    same_model,
    shipped_gate_files,
    trained_rope_scaling,
)
from seer_cli.engine.models import DEFAULT_MODEL, default_model_source
from seer_cli.engine.runtime import model_shape


def test_a_model_is_itself_in_any_precision():
    model = tiny_model("llama", seed=0)
    identity = model_identity(model)
    assert same_model(identity, identity)
    assert same_model(identity, model_identity(model.to(torch.bfloat16)))


@pytest.mark.parametrize("other", ["seed", "family", "vocabulary"])
def test_another_model_is_not_this_one(other):
    model = tiny_model("llama", seed=0)
    identity = model_identity(model)
    if other == "seed":
        theirs = model_identity(tiny_model("llama", seed=1))
    elif other == "family":
        theirs = model_identity(tiny_model("qwen2", seed=0))
    else:
        theirs = {**identity, "vocab_size": identity["vocab_size"] + 1}
    assert not same_model(identity, theirs)


def test_identity_names_the_shapes():
    text = describe(model_identity(tiny_model("llama")))
    assert text.startswith("llama, ") and "layers" in text and "vocabulary" in text


def test_shipped_gates_are_found_by_identity_whatever_the_file_is_called(tmp_path, monkeypatch):
    model = tiny_model("llama", seed=0)
    config = GateConfig(
        base_model="a-name-nobody-passes",
        metadata={"model_identity": model_identity(model)},
        **model_shape(model.config),
    )
    ours = tmp_path / "renamed.safetensors"
    save_gates(ours, build_gates(config), config)
    other = tmp_path / "other.safetensors"
    theirs = {**model_identity(tiny_model("llama", seed=1))}
    config.metadata = {"model_identity": theirs}
    save_gates(other, build_gates(config), config)

    monkeypatch.setattr("seer_cli.engine.identity.shipped_gate_files", lambda: [other, ours])
    assert find_shipped_gates(model) == (ours, [])
    monkeypatch.setattr("seer_cli.engine.identity.shipped_gate_files", lambda: [other])
    path, described = find_shipped_gates(model)
    assert path is None and described == [f"other ({describe(theirs)})"]


def test_every_shipped_gate_file_records_its_model():
    for path in shipped_gate_files():
        identity = read_gate_config(path).metadata.get("model_identity")
        assert identity and len(identity["fingerprint"]) > 0, path


def test_the_default_models_shipped_gates_run_with_a_local_window_of_8():
    [path] = [path for path in shipped_gate_files() if path.stem == DEFAULT_MODEL]
    assert read_gate_config(path).local_blocks == 8
    assert read_gate_config(path).layer_rank_power == 1.0  # a layer budget's rank at 8k
    assert read_gate_config(path).budget == "row"  # layer budgets did not help at 8k / 0.9
    assert trained_rope_scaling(path) == "none"


def test_the_default_model_ships_gates_distilled_for_its_extended_context():
    """Learned at 32768 tokens under the model's measured LongRoPE factors, on the attention
    mass; they run with a window of 4 blocks, which beat none at 0.9, 0.95 and 0.97 on the
    held-out novel, and a sparsity is spent per layer, ranking their scores by row length
    squared (measured there too); --gates auto picks them for prompts past the native context."""
    [path] = [path for path in shipped_gate_files() if path.stem == f"{DEFAULT_MODEL}-32k"]
    config = read_gate_config(path)
    assert trained_rope_scaling(path) == "longrope" and config.base_model == DEFAULT_MODEL
    assert config.metadata["seq_len"] == 32768
    assert (config.metadata["target"], config.local_blocks) == ("mass", 4)
    assert (config.budget, config.layer_rank_power) == ("layer", 2.0)


@pytest.mark.model
def test_the_bundled_gguf_named_by_path_gets_the_shipped_gates(tmp_path):
    source = default_model_source()
    notes = tmp_path / "notes.txt"
    notes.write_text(BOOK.read_text(encoding="utf-8")[:800], encoding="utf-8")
    args = ["generate", "-m", str(source.folder / source.gguf_file), "-f", str(notes)]
    args += ["-p", "x", "--sparsity", "0.5", "-n", "4", "--json", "-q"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    # Recognised as the bundled model, it also gets the bundled model's extended context, and
    # its gates run with the local window their file names.
    data = json.loads(result.stdout)
    assert data["n_ctx"] == 32768
    assert data["local_blocks"] == 8
