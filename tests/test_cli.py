"""``seer generate`` through its command line: stdout holds only the product, stats go to
stderr, and every user error ends in one ``error:`` line with exit code 1.

Runs that are not about loading use engines loaded once for the module (``Engine.load`` is
patched to hand them out); the gate-file errors, one JSON run and the closed-pipe run load
the real default model for real.
"""

import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import BOOK, long_book
from seer_gates import (
    GateConfig,
    block_count,
    build_gates,
    load_gates,
    read_gate_config,
    save_gates,
)
from tiny_models import gate_config, save_tiny_model, tiny_gates, tiny_model, topk_sparsity
from typer.testing import CliRunner

from seer_cli.app import app
from seer_cli.engine.generation import SamplingOptions
from seer_cli.engine.models import DEFAULT_MODEL
from seer_cli.engine.runtime import Engine, EngineOptions

REPO = Path(__file__).resolve().parents[1]
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
STATS = ("Prompt:", "Generation:", "Peak memory:")
INSTRUCTION = "Name three colours."
LLAMA_CPP_FIELDS = (
    "prompt_n",
    "prompt_ms",
    "prompt_per_second",
    "predicted_n",
    "predicted_ms",
    "predicted_per_second",
    "ttft_ms",
    "sparsity",
    "peak_memory_gb",
)
# The default model's attention shape, for gate files that fit it or not.
SMOLLM2_SHAPE = dict(num_q_heads=9, num_kv_heads=3, head_dim=64)

_load = Engine.load


def seer(*args: str, input: str | bytes | None = None):
    # An explicit input, even empty, makes stdin a pipe as in `… | seer generate`.
    return CliRunner().invoke(app, ["generate", *args], input=input)


def stderr_lines(result) -> list[str]:
    return [line for line in ANSI.sub("", result.stderr).splitlines() if line.strip()]


def assert_user_error(result, *phrases: str) -> str:
    """Exit code 1, nothing on stdout, one `error:` line on stderr; returns that line."""
    assert "Traceback" not in result.stdout + result.stderr
    assert not isinstance(result.exception, Exception), repr(result.exception)
    assert result.exit_code == 1, result.stderr
    assert result.stdout == ""
    [line] = stderr_lines(result)
    assert line.startswith("error: ")
    for phrase in phrases:
        assert phrase in line
    return line


@pytest.fixture(scope="module")
def engine_cache() -> dict:
    return {}


@pytest.fixture
def engines(engine_cache, monkeypatch):
    """Patch Engine.load to hand out one engine per option set, loaded once per module."""

    def load(options: EngineOptions) -> Engine:
        key = dataclasses.astuple(options)
        if key not in engine_cache:
            engine_cache[key] = _load(options)
        # As in a fresh process: nothing kept from an earlier test's prompt.
        engine_cache[key].prompt_cache.clear()
        return engine_cache[key]

    monkeypatch.setattr("seer_cli.engine.runtime.Engine.load", load)
    return load


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def greedy_text(engine: Engine, max_tokens: int, **prompt) -> str:
    ids = engine.prompt(max_tokens=max_tokens, **prompt).ids
    return engine.generate(ids, SamplingOptions(max_tokens=max_tokens)).text


@pytest.fixture(scope="module")
def excerpt(tmp_path_factory) -> Path:
    """About 400 tokens of a book: 7 blocks, enough for sparsity to skip some."""
    path = tmp_path_factory.mktemp("docs") / "excerpt.txt"
    path.write_text(BOOK.read_text(encoding="utf-8")[:1500], encoding="utf-8")
    return path


# ---------------------------------------------------------------- stdout is the product


@pytest.mark.model
@pytest.mark.parametrize("stream", [[], ["--no-stream"]], ids=["streamed", "no-stream"])
def test_stdout_holds_only_the_text_and_stats_go_to_stderr(engines, stream):
    result = seer("-p", INSTRUCTION, "-n", "5", *stream)
    assert result.exit_code == 0, result.stderr
    expected = greedy_text(engines(EngineOptions()), 5, instruction=INSTRUCTION)
    assert expected.strip()
    assert result.stdout == expected + "\n"
    lines = stderr_lines(result)
    for label in STATS:
        assert any(line.startswith(label) for line in lines), lines
    assert not any(line.startswith("Sparsity:") for line in lines)


@pytest.mark.model
def test_quiet_hides_the_stats(engines):
    result = seer("-p", INSTRUCTION, "-n", "3", "--quiet")
    assert result.exit_code == 0, result.stderr
    assert result.stdout.strip()
    assert stderr_lines(result) == []


@pytest.mark.model
def test_json_is_one_object_with_llama_cpp_fields(engines):
    result = seer("-p", INSTRUCTION, "-n", "3", "--json")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)  # fails on anything besides one JSON value
    assert isinstance(data, dict)
    assert result.stdout.endswith("}\n") and result.stdout.count("\n") == 1
    assert data["model"] == DEFAULT_MODEL
    assert data["text"] == greedy_text(engines(EngineOptions()), 3, instruction=INSTRUCTION)
    assert set(LLAMA_CPP_FIELDS) <= data.keys()
    assert data["predicted_n"] == 3
    assert data["sparsity"] is None  # dense
    assert not any(line.startswith(STATS) for line in stderr_lines(result))


@pytest.mark.model
def test_sparse_json_end_to_end(excerpt):
    """No patching: the command loads the model, attaches sparse prefill and reports it."""
    result = seer("-f", str(excerpt), "-p", "Summarise.", "-n", "3", "--json",
                  "--sparsity", "0.5", "--gates", "pooled")  # fmt: skip
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["text"].strip()
    assert data["predicted_n"] == 3
    nb = block_count(data["prompt_n"])
    assert nb >= 6
    # Top-k keeps exactly the policy's budget per row, so the sparsity is known in advance.
    assert data["sparsity"] == pytest.approx(topk_sparsity(nb, 0.5), abs=1e-12)
    assert data["sparsity"] > 0.2
    assert 0 < data["prompt_per_second"] and 0 < data["predicted_per_second"]


# ---------------------------------------------------------------- where the input comes from

DOCUMENT = "The lighthouse keeper counted ships every night and wrote their names in a book."


def json_run(*args: str, input: str | bytes | None = None) -> dict:
    result = seer(*args, "-n", "1", "--json", input=input)
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def prompt_length(engine: Engine, **prompt) -> int:
    return len(engine.prompt(max_tokens=1, **prompt).ids)


@pytest.mark.model
@pytest.mark.parametrize("args", [["-f", "-"], []], ids=["dash", "pipe"])
def test_document_from_stdin(engines, args):
    data = json_run(*args, "-p", "Who counted?", input=DOCUMENT)
    engine = engines(EngineOptions())
    assert data["prompt_n"] == prompt_length(engine, document=DOCUMENT, instruction="Who counted?")


@pytest.mark.model
def test_stdin_alone_is_the_prompt(engines):
    data = json_run(input=DOCUMENT)
    assert data["prompt_n"] == prompt_length(engines(EngineOptions()), document=DOCUMENT)


@pytest.mark.model
def test_invalid_utf8_is_replaced_with_a_warning(engines, tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("Café au lait, crème brûlée. ".encode("latin-1") * 5)
    result = seer("-f", str(path), "-p", "Translate.", "-n", "2")
    assert result.exit_code == 0, result.stderr
    assert result.stdout.strip()
    warnings = [line for line in stderr_lines(result) if line.startswith("warning:")]
    assert len(warnings) == 1
    assert str(path) in warnings[0] and "UTF-8" in warnings[0]


def test_truncate_warns_how_much_was_cut(tmp_path):
    folder = save_tiny_model("llama", tmp_path / "tiny-llama")
    document = write(tmp_path / "long.txt", b"All work and no play. " * 100)
    result = seer("--model", str(folder), "-f", str(document), "-p", "Go on.", "-n", "2",
                  "--truncate", "end")  # fmt: skip
    assert result.exit_code == 0, result.stderr
    warnings = [line for line in stderr_lines(result) if line.startswith("warning:")]
    assert len(warnings) == 1
    assert re.search(r"cut \d+ tokens from the end of the document", warnings[0]), warnings


# ---------------------------------------------------------------- the local window


@pytest.fixture(scope="module")
def tiny_with_gates(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny model folder and a gate file for it that names a local window of 2 blocks."""
    folder = tmp_path_factory.mktemp("tiny")
    model = save_tiny_model("llama", folder / "tiny-llama")
    loaded = tiny_model("llama")
    config = dataclasses.replace(gate_config(loaded), metadata={"local_blocks": 2})
    save_gates(folder / "gates.safetensors", tiny_gates(loaded), config)
    return model, folder / "gates.safetensors"


def given_elsewhere(monkeypatch, tmp_path, env: dict, config: str) -> None:
    """Settings given through the environment and a config file rather than flags."""
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    if config:
        (tmp_path / "config.toml").write_text(config)
        monkeypatch.setenv("SEER_CONFIG", str(tmp_path / "config.toml"))


@pytest.mark.parametrize(
    "flag, env, config, used",
    [
        ([], {}, "", 2),
        (["--local-blocks", "0"], {}, "", 0),
        (["--local-blocks", "3"], {}, "", 3),
        ([], {"SEER_LOCAL_BLOCKS": "0"}, "", 0),
        ([], {}, "local-blocks = 1", 1),
    ],
    ids=["from-the-file", "flag-0", "flag-3", "environment-0", "config-file-1"],
)
def test_the_local_window_comes_from_the_gate_file_unless_given(
    tiny_with_gates, tmp_path, monkeypatch, flag, env, config, used
):
    given_elsewhere(monkeypatch, tmp_path, env, config)
    model, gates = tiny_with_gates
    args = ["--model", str(model), "--gates", str(gates), "-p", "x" * 600, "-n", "1",
            "--sparsity", "0.5", *flag]  # fmt: skip
    assert json_run(*args)["local_blocks"] == used
    result = seer(*args)
    assert result.exit_code == 0, result.stderr
    [sparsity] = [line for line in stderr_lines(result) if line.startswith("Sparsity:")]
    assert sparsity.endswith(f", gate scores, local window {used} blocks, budget per row")


@pytest.mark.parametrize(
    "flag, env, config, used",
    [
        ([], {}, "", "layer"),
        (["--budget", "row"], {}, "", "row"),
        ([], {"SEER_BUDGET": "row"}, "", "row"),
        ([], {}, 'budget = "row"', "row"),
        (["--threshold", "1"], {}, "", None),
    ],
    ids=["from-the-file", "flag-row", "environment-row", "config-file-row", "threshold"],
)
def test_the_budget_comes_from_the_gate_file_unless_given(
    tiny_with_gates, tmp_path, monkeypatch, flag, env, config, used
):
    """A gate file naming a layer budget spends --sparsity per layer unless a budget is given;
    a threshold has no budget, whatever the file names."""
    given_elsewhere(monkeypatch, tmp_path, env, config)
    model, gates = tiny_with_gates
    settings = read_gate_config(gates)
    layered = tmp_path / "layered.safetensors"
    settings.metadata = {**settings.metadata, "budget": "layer"}
    save_gates(layered, load_gates(gates)[1], settings)
    sparsity = [] if "--threshold" in flag else ["--sparsity", "0.5"]
    args = ["--model", str(model), "--gates", str(layered), "-p", "x" * 600, "-n", "1",
            *sparsity, *flag]  # fmt: skip
    assert json_run(*args)["budget"] == used


@pytest.mark.parametrize(
    "device, amx, interpreter, expected",
    [
        ("cuda", False, "0", torch.bfloat16),
        ("cpu", True, "0", torch.bfloat16),
        ("cpu", False, "0", torch.float32),
        ("cpu", True, "1", torch.float32),  # the interpreter's kernels take float32 or float16
    ],
    ids=["gpu", "cpu-with-amx", "cpu-without-amx", "cpu-interpreter"],
)
def test_auto_dtype_is_bfloat16_where_it_is_multiplied_in_hardware(
    monkeypatch, device, amx, interpreter, expected
):
    from seer_cli.engine.runtime import pick_dtype

    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", interpreter)
    assert pick_dtype("auto", torch.device(device)) is expected
    assert pick_dtype("float32", torch.device(device)) is torch.float32


def test_a_bfloat16_model_prefills_sparsely_on_the_cpu(tiny_with_gates):
    """bfloat16 on the CPU (auto on CPUs with AMX): the C++ kernel computes in float32 and hands
    bfloat16 back."""
    model, gates = tiny_with_gates
    args = ("--model", str(model), "--gates", str(gates), "-p", "x" * 600, "--sparsity", "0.5",
            "--device", "cpu")  # fmt: skip
    low, full = (json_run(*args, "--dtype", dtype, "--sparse-min-tokens", "0")
                 for dtype in ("bfloat16", "float32"))  # fmt: skip
    assert low["predicted_n"] == 1 and 0 < low["sparsity"] == full["sparsity"]
    # By default a bfloat16 prompt this short is prefilled densely on the CPU.
    assert json_run(*args, "--dtype", "bfloat16")["sparsity"] == 0


def test_where_sparse_prefill_starts_by_default():
    from seer_cli.engine.attention import default_min_sparse_tokens

    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert default_min_sparse_tokens(cpu, 0.9) == 0
    assert default_min_sparse_tokens(cpu, 0.9, torch.bfloat16) == 3072
    assert default_min_sparse_tokens(gpu, 0.9, torch.bfloat16) == 16384
    assert default_min_sparse_tokens(gpu, 0.5, torch.bfloat16) == 32768


def test_a_bad_local_window_in_a_gate_file_is_one_error_line(tiny_with_gates, tmp_path):
    from safetensors.torch import load_file, save_file

    model, gates = tiny_with_gates
    settings = json.loads(read_gate_config(gates).to_json())
    settings["metadata"]["local_blocks"] = -2
    bad = tmp_path / "bad.safetensors"
    save_file(load_file(gates), bad, metadata={"seer_gate_config": json.dumps(settings)})
    result = seer("--model", str(model), "--gates", str(bad), "-p", "Hello.", "--sparsity", "0.5")
    assert_user_error(result, "bad.safetensors", "local_blocks", "0 or more", "-2")


# ---------------------------------------------------------------- user errors


# Each case: arguments built from a scratch folder, and phrases the error line must hold.
BAD_INPUT = [
    pytest.param(lambda d: ["-f", str(d / "missing.txt")], ["no such file"], id="missing-file"),
    pytest.param(lambda d: ["-f", str(d)], ["is a directory"], id="directory"),
    pytest.param(lambda d: ["-f", str(write(d / "e.txt", b" \n"))], ["is empty"], id="empty-file"),
    pytest.param(
        lambda d: ["-f", str(write(d / "b.bin", b"\x7fELF\x00\x01" * 50))], ["binary"], id="binary"
    ),
    pytest.param(
        lambda d: ["-f", str(d / "[/]notes[draft].txt")],
        ["[/]notes[draft].txt: no such file"],
        id="brackets-in-path",
    ),
    pytest.param(lambda d: ["--sparsity", "1.5"], ["--sparsity", "[0, 1)"], id="sparsity-1.5"),
    pytest.param(lambda d: ["--sparsity", "-0.1"], ["--sparsity", "-0.1"], id="sparsity-neg"),
    pytest.param(lambda d: ["--threshold", "inf"], ["--threshold"], id="threshold-inf"),
    pytest.param(lambda d: ["--threshold", "-0.5"], ["--threshold"], id="threshold-neg"),
    pytest.param(
        lambda d: ["--local-blocks", "-2"], ["--local-blocks", "0 or more", "-2"], id="local-neg"
    ),
    pytest.param(lambda d: ["--budget", "head"], ["--budget", "row, layer", "head"], id="budget"),
    pytest.param(
        lambda d: ["--budget", "layer", "--threshold", "1"],
        ["--budget", "--threshold has no budget"],
        id="budget-threshold",
    ),
    pytest.param(
        lambda d: ["--sparsity", "0.5", "--threshold", "0.1"],
        ["--sparsity", "--threshold", "not both"],
        id="sparsity-and-threshold",
    ),
    pytest.param(lambda d: ["-n", "0"], ["--max-tokens"], id="max-tokens-0"),
    pytest.param(lambda d: ["--max-tokens", "-1"], ["--max-tokens"], id="max-tokens-neg"),
    pytest.param(lambda d: ["--top-p", "0"], ["--top-p"], id="top-p-0"),
    pytest.param(lambda d: ["--truncate", "sideways"], ["--truncate", "sideways"], id="truncate"),
    pytest.param(
        lambda d: ["--sparsity", "0.5", "--gates", str(d / "missing.safetensors")],
        ["missing.safetensors", "does not exist"],
        id="missing-gates",
    ),
    pytest.param(lambda d: ["--model", "/no/such/path"], ["/no/such/path"], id="missing-model"),
    pytest.param(
        lambda d: ["--device", "cuda"],
        ["CUDA"],
        id="device-cuda",
        marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is present"),
    ),
]


@pytest.mark.parametrize("make_args, phrases", BAD_INPUT)
def test_bad_input_is_one_error_line(make_args, phrases, tmp_path):
    assert_user_error(seer("-p", "Hello.", *make_args(tmp_path)), *phrases)


def test_nothing_to_generate_from():
    assert_user_error(seer(input=""), "nothing to generate from", "--prompt", "--file")


def test_auto_gates_without_shipped_gates_say_what_to_do(monkeypatch):
    # Whether gates ship for the default model or not, this is what a model without them gets.
    monkeypatch.setattr("seer_cli.engine.identity.shipped_gate_files", lambda: [])
    line = assert_user_error(seer("-p", "Hello.", "--sparsity", "0.5"))
    assert "seer distill" in line and "--gates pooled" in line


@pytest.mark.model
def test_too_long_prompt_asks_for_truncate(engines, tmp_path):
    book = tmp_path / "long-book.txt"  # far beyond the default model's context
    book.write_text(long_book(), encoding="utf-8")
    result = seer("-f", str(book), "-p", "Summarise.")
    assert_user_error(result, "--truncate", "tokens")


@pytest.fixture(scope="module")
def gate_files(tmp_path_factory) -> dict[str, Path]:
    """Gate files the default model cannot use: another shape, random bytes, a cut file."""
    folder = tmp_path_factory.mktemp("gates")
    config = GateConfig(base_model="two-layer-model", num_layers=2, **SMOLLM2_SHAPE)
    save_gates(folder / "other.safetensors", build_gates(config), config)

    fitting = dataclasses.replace(config, base_model=DEFAULT_MODEL, num_layers=30)
    save_gates(folder / "fitting.safetensors", build_gates(fitting), fitting)
    data = (folder / "fitting.safetensors").read_bytes()
    (folder / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    generator = torch.Generator().manual_seed(0)
    noise = torch.randint(0, 256, (4096,), dtype=torch.uint8, generator=generator)
    (folder / "corrupt.safetensors").write_bytes(bytes(noise.tolist()))
    return {path.stem: path for path in folder.iterdir()}


@pytest.mark.model
@pytest.mark.parametrize(
    "name, phrases",
    [
        ("other", ["2 layers", f"the model {DEFAULT_MODEL} has 30 layers"]),
        ("corrupt", ["corrupt.safetensors is not a readable safetensors file"]),
        ("truncated", ["truncated.safetensors is not a readable safetensors file"]),
    ],
    ids=["other-shape", "corrupt", "truncated"],
)
def test_unusable_gate_files(gate_files, name, phrases):
    result = seer("-p", "Hello.", "--sparsity", "0.5", "--gates", str(gate_files[name]))
    assert_user_error(result, *phrases)


# ---------------------------------------------------------------- a reader that goes away


@pytest.mark.model
def test_closed_pipe_ends_quietly(tmp_path):
    """`seer generate … | head -c 5`: no traceback, exit code 0."""
    command = [sys.executable, "-c", "from seer_cli.app import main; main()",
               "generate", "-p", "Tell me a long story.", "-n", "60"]  # fmt: skip
    with open(tmp_path / "stderr", "w+b") as stderr:
        process = subprocess.Popen(
            command, cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=stderr,
            env={**os.environ, "NO_COLOR": "1"},
        )  # fmt: skip
        try:
            first = process.stdout.read(5)
            process.stdout.close()
            code = process.wait(timeout=300)
        finally:
            process.kill()  # only if still running: a hang must not outlive the test
        stderr.seek(0)
        errors = stderr.read().decode(errors="replace")
    assert len(first) == 5
    assert "Traceback" not in errors and "Error" not in errors, errors
    assert code == 0
