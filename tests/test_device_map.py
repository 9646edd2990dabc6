"""Models spread over devices by a device map (accelerate's big-model inference).

On the CPU the split is between the CPU and the disk: layer 1's weights are offloaded and
brought back by accelerate's hooks at every forward (AlignDevicesHook, the path a split over
GPUs takes too), so its weights sit on the meta device while it computes on the CPU. Tests
that need two GPUs split the layers over them.
"""

import json

import pytest
import torch
from seer_gates import save_gates
from tiny_models import (
    CONTEXT,
    gate_config,
    random_ids,
    save_tiny_model,
    tiny_gates,
    tiny_model,
)
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from seer_cli.app import app
from seer_cli.engine import placement
from seer_cli.engine.context import ContextSettings
from seer_cli.engine.generation import GenerationStats, SamplingOptions, generate, prefill
from seer_cli.engine.identity import model_identity
from seer_cli.engine.placement import Placement, layer_devices, random_model
from seer_cli.engine.runtime import Engine, EngineOptions
from seer_cli.measure import profiling
from seer_cli.measure.report import Column, Report, render
from seer_cli.progress import print_stats

# Layer 1 offloaded to the disk; everything else on the CPU.
CPU_DISK = {
    "model.embed_tokens": "cpu",
    "model.rotary_emb": "cpu",
    "model.layers.0": "cpu",
    "model.layers.1": "disk",
    "model.norm": "cpu",
    "lm_head": "cpu",
}
# As accelerate's auto map puts a large model: the rotary module on the last GPU, whose hook
# moves its inputs there from the embeddings' GPU.
TWO_GPUS = {**dict.fromkeys(CPU_DISK, 0), "model.layers.1": 1, "model.rotary_emb": 1, "lm_head": 1}
PROMPT_TOKENS = 300  # five blocks: sparsity has blocks to skip
needs_two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")


@pytest.fixture(scope="module", params=["llama", "qwen3"])
def folder(request, tmp_path_factory):
    """A tiny model folder with a gate file that fits it (``gates.safetensors``)."""
    path = save_tiny_model(request.param, tmp_path_factory.mktemp(request.param))
    model = tiny_model(request.param)
    save_gates(path / "gates.safetensors", tiny_gates(model), gate_config(model))
    return path


def load(folder, mode: str, device_map=None, device: str = "cpu", **options) -> Engine:
    """``mode``: dense, gates (the fitting gate file) or pooled, both at sparsity 0.5."""
    gates = {"gates": str(folder / "gates.safetensors"), "pooled": "pooled"}.get(mode, "auto")
    options = EngineOptions(
        model=str(folder), gates=gates, sparsity=None if mode == "dense" else 0.5,
        device=device, device_map=device_map, **options,
    )  # fmt: skip
    return Engine.load(options)


def outputs(engine: Engine) -> tuple[torch.Tensor, list[int]]:
    """Last-position logits of a prefill and eight greedy tokens, on the CPU."""
    ids = random_ids(PROMPT_TOKENS)
    logits, _ = prefill(engine.model, ids.to(placement.input_device(engine.model)))
    text = generate(engine.model, engine.tokenizer, ids[0].tolist(), SamplingOptions(8)).text
    return logits.cpu(), [ord(c) for c in text]


@pytest.mark.parametrize("mode", ["dense", "gates", "pooled"])
def test_split_model_gives_the_unsplit_output(folder, mode):
    whole = load(folder, mode)
    split = load(folder, mode, device_map=json.dumps(CPU_DISK))
    offloaded = split.model.model.layers[1].self_attn.q_proj.weight
    assert offloaded.device.type == "meta"  # the hooks bring it back for each forward
    expected_logits, expected_tokens = outputs(whole)
    logits, tokens = outputs(split)
    torch.testing.assert_close(logits, expected_logits, rtol=1e-5, atol=1e-5)
    assert tokens == expected_tokens
    if mode != "dense":
        assert split.sparse_prefill.stats.overall() == whole.sparse_prefill.stats.overall() > 0


def test_gates_follow_their_layers(folder):
    engine = load(folder, "gates", device_map=json.dumps(CPU_DISK))
    devices = layer_devices(engine.model)
    assert devices == [torch.device("cpu")] * 2  # the offloaded layer computes on the CPU
    for gate, device in zip(engine.sparse_prefill.gates, devices, strict=True):
        assert {p.device for p in gate.parameters()} == {device}


def test_identity_reads_offloaded_weights(folder):
    """``--gates auto`` matches gates on a fingerprint of weights, some of them offloaded here."""
    whole, split = load(folder, "dense"), load(folder, "dense", device_map=json.dumps(CPU_DISK))
    assert model_identity(split.model) == model_identity(whole.model)


@needs_two_gpus
@pytest.mark.parametrize("mode", ["dense", "gates"])
def test_split_over_two_gpus(folder, mode):
    whole = load(folder, mode, device="cuda")
    split = load(folder, mode, device_map=json.dumps(TWO_GPUS))
    devices = [torch.device("cuda", 0), torch.device("cuda", 1)]
    assert layer_devices(split.model) == devices
    if mode == "gates":
        for gate, device in zip(split.sparse_prefill.gates, devices, strict=True):
            assert {p.device for p in gate.parameters()} == {device}
    expected_logits, expected_tokens = outputs(whole)
    logits, tokens = outputs(split)
    torch.testing.assert_close(logits.float(), expected_logits.float(), rtol=2e-2, atol=2e-2)
    assert tokens == expected_tokens
    stats = split.generate(random_ids(70)[0].tolist(), SamplingOptions(2)).stats
    assert list(stats.peak_memory_gb_per_device) == ["cuda:0", "cuda:1"]
    assert stats.peak_memory_gb == pytest.approx(sum(stats.peak_memory_gb_per_device.values()))


@pytest.mark.parametrize(
    "device_map", [CPU_DISK, pytest.param(TWO_GPUS, marks=needs_two_gpus)], ids=["cpu", "gpus"]
)
def test_scaled_rope_past_the_native_context(folder, device_map):
    """Past the native context a scaled rotary module replaces the hooked one: it must sit where
    its inputs are."""
    context = ContextSettings(ctx_size=2 * CONTEXT)
    device = "cpu" if device_map is CPU_DISK else "cuda"
    whole = load(folder, "gates", device=device, context=context)
    split = load(folder, "gates", json.dumps(device_map), context=context)
    ids = random_ids(CONTEXT + 100)[0].tolist()
    expected, result = (engine.generate(ids, SamplingOptions(4)) for engine in (whole, split))
    assert result.stats.rope_scaling == "yarn"
    assert result.text == expected.text


def test_random_model_is_the_same_split_or_not():
    config = tiny_model("qwen2").config
    config.tie_word_embeddings = True
    logits = []
    for device_map in ({"": "cpu"}, CPU_DISK):
        torch.manual_seed(0)
        model = random_model(config, torch.float32, Placement(device_map))
        assert model.lm_head.weight is model.model.embed_tokens.weight or device_map == CPU_DISK
        assert torch.isfinite(model.model.rotary_emb.inv_freq).all()
        logits.append(prefill(model, random_ids(100))[0])
    torch.testing.assert_close(logits[1], logits[0], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- through the command line


def run(*args: str):
    return CliRunner().invoke(app, list(args))


def json_output(result) -> dict:
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def test_generate_split_through_the_command_line(folder):
    args = ["generate", "-m", str(folder), "-p", "Hello.", "-n", "8", "--json", "--device", "cpu"]
    whole = json_output(run(*args))
    split = json_output(run(*args, "--device-map", json.dumps(CPU_DISK)))
    assert split["text"] == whole["text"]
    assert split["peak_memory_gb_per_device"] == {}  # GPUs only


def test_profile_prefill_with_a_device_map(tmp_path):
    config = tiny_model("llama").config.to_dict()
    (tmp_path / "tiny.json").write_text(json.dumps(config))
    result = run(
        "profile", "prefill", "--device", "cpu", "--config", str(tmp_path / "tiny.json"),
        "--device-map", json.dumps(CPU_DISK), "-l", "256", "-s", "0.5", "-r", "1", "-o", "json",
    )  # fmt: skip
    data = json_output(result)
    assert [row["test"] for row in data["rows"]] == ["pp256 @ dense", "pp256 @ s0.50"]
    assert data["rows"][1]["achieved_sparsity"] > 0


def assert_one_error_line(result, *phrases: str) -> str:
    assert "Traceback" not in result.stdout + result.stderr
    assert not isinstance(result.exception, Exception), repr(result.exception)
    assert result.exit_code == 1, result.stderr
    assert result.stdout == ""
    [line] = [line for line in result.stderr.splitlines() if line.strip()]
    assert line.startswith("error: ")
    for phrase in phrases:
        assert phrase in line, line
    return line


COMMANDS = {
    "generate": ["generate", "-p", "Hello."],
    "batch": ["batch", __file__],
    "profile": ["profile", "prefill", "--device", "cpu", "-l", "64"],
}
BAD_FLAGS = {
    "max-memory-gpu": (["--max-memory", "99=10GiB"], ["--max-memory", "GPU 99"]),
    "map-gpu": (["--device-map", '{"model.layers.0": 99}'], ["--device-map", "GPU 99"]),
    "device-gpu": (["--device-map", "cuda:99"], ["GPU 99"]),
    "nonsense": (["--device-map", "everywhere"], ["--device-map", "everywhere"]),
    "size": (["--max-memory", "cpu=lots"], ["lots"]),
    "pairs": (["--max-memory", "70GiB"], ["DEVICE=SIZE"]),
    "json": (["--device-map", "{model: 0}"], ["not valid JSON"]),
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
@pytest.mark.parametrize("flags, phrases", BAD_FLAGS.values(), ids=BAD_FLAGS.keys())
def test_bad_device_maps_are_one_sentence(command, flags, phrases):
    assert_one_error_line(run(*COMMANDS[command], *flags), *phrases)


def test_missing_gpu_is_named_with_the_gpus_there_are(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(Exception, match="names GPU 3, but this machine has GPUs 0 to 1"):
        Placement.parse(None, "0=70GiB,1=70GiB,3=10GiB")
    parsed = Placement.parse(None, "0=70GiB, cuda:1=70GiB, cpu=1GB")
    assert parsed == Placement("auto", {0: 70 * 2**30, 1: 70 * 2**30, "cpu": 10**9})
    assert parsed.main_device() == torch.device("cuda", 0)
    assert Placement.parse("sequential", None).devices == {0, 1}
    assert Placement.parse("1", None) == Placement({"": 1})


def test_a_map_that_leaves_out_part_of_the_model(folder):
    partial = {name: "cpu" for name in CPU_DISK if name != "lm_head"}
    result = run("generate", "-m", str(folder), "-p", "Hi.", "--device-map", json.dumps(partial))
    assert_one_error_line(result, "lm_head")


def test_device_contradicting_the_map(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    result = run("generate", "-p", "Hi.", "--device", "cpu", "--device-map", "0")
    assert_one_error_line(result, "--device cpu", "--device-map")


# ---------------------------------------------------------------- what is reported


def test_stats_name_each_gpu_when_there_are_several():
    lines = []

    class Lines:
        print = staticmethod(lines.append)

    peaks = {"cuda:0": 75.0, "cuda:1": 72.5}
    stats = GenerationStats(peak_memory_gb=147.5, peak_memory_gb_per_device=peaks)
    print_stats(Lines, stats, requested_sparsity=None)
    assert lines[-1] == "Peak memory: 147.50 GB (cuda:0 75.00 GB, cuda:1 72.50 GB)"


def test_per_gpu_peaks_in_the_table():
    column = Column("peak_memory_gb_per_device", "peak memory GB per GPU")
    report = Report("prefill", {}, [column], rows=[{column.key: {"cuda:0": 75.0, "cuda:1": 72.5}}])
    assert render(report, "md").splitlines()[-1] == "| 75.00 / 72.50 |"
    assert json.loads(render(report, "json"))["rows"][0][column.key]["cuda:1"] == 72.5


def test_llama_70b_config_has_the_published_shapes():
    _, config = profiling.load_config("llama-3.1-70b")
    shapes = dict(
        hidden_size=8192, num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
        intermediate_size=28672, vocab_size=128256, max_position_embeddings=131072,
        tie_word_embeddings=False,
    )  # fmt: skip
    assert {key: getattr(config, key) for key in shapes} == shapes
    assert config.rope_parameters["rope_type"] == "llama3"
    assert config.rope_parameters["factor"] == 8
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert sum(p.numel() for p in model.parameters()) / 1e9 == pytest.approx(70.55, abs=0.01)
