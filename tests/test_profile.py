"""``seer profile``: the shipped configs, flag checks, the CPU tables in every output format,
the prefill breakdown, and the pure pieces (``mean ± std``, the crossover) on crafted numbers.

A local app joins the profile commands to seer's root callback, as ``seer_cli/app.py`` does.
"""

import csv
import io
import json
import re
import subprocess
import sys
import time

import pytest
import torch
import typer
from seer_gates import MaskPolicy
from seer_kernels import interpreting
from tiny_models import random_ids, tiny_model
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from seer_cli.app import root
from seer_cli.commands import profile
from seer_cli.engine import attention
from seer_cli.engine.errors import SeerError
from seer_cli.engine.runtime import model_shape
from seer_cli.measure import profiling
from seer_cli.measure.report import Column, Report, Stat, format_stat, ratio, render

app = typer.Typer(pretty_exceptions_show_locals=False)
app.callback()(root)
app.add_typer(profile.profile_app, name="profile")

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
TINY_CONFIG = {
    "model_type": "llama",
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "vocab_size": 256,
    "max_position_embeddings": 1024,
}


def seer_profile(*args: str):
    return CliRunner().invoke(app, ["profile", *args])


def stderr_lines(result) -> list[str]:
    return [line for line in ANSI.sub("", result.stderr).splitlines() if line.strip()]


def assert_user_error(result, phrase: str) -> None:
    """Exit code 1, nothing on stdout, one ``error:`` line on stderr naming ``phrase``."""
    assert not isinstance(result.exception, Exception), repr(result.exception)
    assert "Traceback" not in result.stdout + result.stderr
    assert result.exit_code == 1, result.stderr
    assert result.stdout == ""
    [line] = stderr_lines(result)
    assert line.startswith("error: ") and phrase in line, line


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("configs") / "tiny.json"
    path.write_text(json.dumps(TINY_CONFIG))
    return str(path)


# ---------------------------------------------------------------- shipped configs


SHIPPED_SHAPES = {
    "llama-3.1-8b": dict(
        model_type="llama", hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, intermediate_size=14336, vocab_size=128256,
        max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=False,
    ),
    "qwen2.5-7b": dict(
        model_type="qwen2", hidden_size=3584, num_hidden_layers=28, num_attention_heads=28,
        num_key_value_heads=4, intermediate_size=18944, vocab_size=152064,
        max_position_embeddings=131072, rms_norm_eps=1e-6, tie_word_embeddings=False,
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(SHIPPED_SHAPES))
def test_shipped_configs_load_with_their_shapes(name):
    assert name in profiling.shipped_configs()
    loaded_name, config = profiling.load_config(name)
    assert loaded_name == name
    for key, value in SHIPPED_SHAPES[name].items():
        assert getattr(config, key) == value, key
    assert model_shape(config)["head_dim"] == 128
    assert config.dtype == torch.bfloat16
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    billions = sum(p.numel() for p in model.parameters()) / 1e9
    assert billions == pytest.approx(8.03 if name == "llama-3.1-8b" else 7.62, abs=0.01)
    # Qwen2 projects queries and keys with a bias, Llama without.
    assert (model.model.layers[0].self_attn.q_proj.bias is not None) == (name == "qwen2.5-7b")


def test_llama_config_has_llama3_rope_scaling():
    _, config = profiling.load_config("llama-3.1-8b")
    rope = config.rope_parameters
    assert rope["rope_type"] == "llama3" and rope["rope_theta"] == 500000
    assert (rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]) == (8, 1, 4)
    assert rope["original_max_position_embeddings"] == 8192


def test_unknown_config_is_one_sentence():
    with pytest.raises(SeerError, match="unknown config 'llama-9'.*llama-3.1-8b.*qwen2.5-7b"):
        profiling.load_config("llama-9")
    assert_user_error(seer_profile("kernel", "--device", "cpu", "--config", "llama-9"), "llama-9")


def test_config_file_of_an_unsupported_model_type(tmp_path):
    path = tmp_path / "gpt2.json"
    path.write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(SeerError, match="model_type 'gpt2'"):
        profiling.load_config(str(path))


# ---------------------------------------------------------------- flags


@pytest.mark.parametrize("command", ["kernel", "prefill"])
def test_without_a_gpu_it_asks_for_device_cpu(command, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert_user_error(seer_profile(command), "no CUDA GPU is available; pass --device cpu")


@pytest.mark.parametrize(
    "args, phrase",
    [
        (["-l", "0"], "--lengths takes positive whole numbers"),
        (["-l", "1024,12.5"], "'12.5'"),
        (["-l", "8k"], "'8k'"),
        (["-s", "1"], "--sparsities must each be in [0, 1), got 1.0"),
        (["-s", "-0.1"], "got -0.1"),
        (["-s", "0.5,high"], "'high'"),
        (["-r", "0"], "--repeats must be at least 1"),
        (["-o", "xml"], "--output must be one of md, json, csv"),
        (["--config", "llama-3.1-8b", "--model", "x"], "either --config or --model"),
    ],
    ids=["zero-length", "fractional-length", "suffix", "sparsity-1", "negative-sparsity",
         "word-sparsity", "no-repeats", "xml", "config-and-model"],
)  # fmt: skip
def test_bad_flags_are_one_sentence(args, phrase):
    assert_user_error(seer_profile("kernel", "--device", "cpu", *args), phrase)


def test_prefill_refuses_lengths_beyond_the_context(tiny_config):
    result = seer_profile("prefill", "--device", "cpu", "--config", tiny_config, "-l", "512,2048")
    assert_user_error(result, "2048 tokens do not fit")


def test_prefill_with_a_config_refuses_a_gate_file(tiny_config):
    result = seer_profile("prefill", "--device", "cpu", "--config", tiny_config, "--gates", "g")
    assert_user_error(result, "--gates FILE needs --model")


def test_prefill_refuses_an_8b_model_on_the_cpu():
    result = seer_profile("prefill", "--device", "cpu", "--config", "llama-3.1-8b", "-l", "64")
    assert_user_error(result, "8.0B parameters, too many for a CPU run")


def test_lengths_and_sparsities_are_sorted_without_repeats():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert profiling.parse_lengths("512, 128,512", cpu) == [128, 512]
    assert profiling.parse_lengths(None, cpu) == list(profiling.CPU_LENGTHS)
    assert profiling.parse_lengths(None, cuda) == [8192, 32768, 131072]
    assert profiling.parse_sparsities("0.9,0.5,0.9") == [0.5, 0.9]


def test_the_command_module_does_not_import_torch():
    code = "import sys, seer_cli.commands.profile; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ---------------------------------------------------------------- CPU tables


KERNEL_KEYS = ("dense_math_ms", "gates_ms", "attention_ms", "sparse_ms", "speedup_math")
EXPECTED_TESTS = ["pp128 @ s0.50", "pp128 @ s0.90", "pp256 @ s0.50", "pp256 @ s0.90"]


def run_kernel(tiny_config: str, output: str):
    result = seer_profile(
        "kernel", "--device", "cpu", "--config", tiny_config,
        "-l", "256,128", "-s", "0.5,0.9", "-r", "2", "-o", output,
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    return result


def test_kernel_markdown_table_and_crossover_notes(tiny_config):
    result = run_kernel(tiny_config, "md")
    header, rule, *rows = result.stdout.splitlines()
    assert header.startswith("| test | achieved sparsity | dense math ms | gates+mask ms")
    assert rule == "|---|---|---|---|---|---|---|"
    assert [row.split(" | ")[0].removeprefix("| ") for row in rows] == EXPECTED_TESTS
    for row in rows:
        cells = row.strip("|").split("|")
        assert len(cells) == 7
        assert all(re.fullmatch(r" \d+\.\d\d ± \d+\.\d\d ", cell) for cell in cells[2:]), row
    notes = stderr_lines(result)
    assert any(line.startswith("crossover: s0.50 ") for line in notes), notes
    assert any(line.startswith("crossover: s0.90 ") for line in notes), notes


def test_kernel_json_is_one_object(tiny_config):
    data = json.loads(run_kernel(tiny_config, "json").stdout)
    assert data["mode"] == "kernel" and data["attention_kernel"] == "cpu"
    assert (data["num_q_heads"], data["num_kv_heads"], data["head_dim"]) == (4, 2, 64)
    assert [row["test"] for row in data["rows"]] == EXPECTED_TESTS
    for row in data["rows"]:
        for key in KERNEL_KEYS:
            assert row[key]["mean"] > 0 and row[key]["std"] >= 0, key
        assert 0 <= row["achieved_sparsity"] < row["sparsity"]
    assert [item["sparsity"] for item in data["crossover"]] == [0.5, 0.9]


def test_kernel_csv_has_a_header_and_one_line_per_test(tiny_config):
    rows = list(csv.DictReader(io.StringIO(run_kernel(tiny_config, "csv").stdout)))
    assert [row["test"] for row in rows] == EXPECTED_TESTS
    for row in rows:
        for key in KERNEL_KEYS:
            assert float(row[key]) > 0 and float(row[f"{key}_std"]) >= 0, key
    assert rows[0]["n_prompt"] == "128" and rows[0]["sparsity"] == "0.5"


def test_prefill_rows_with_a_breakdown_of_sparse_rows(tiny_config):
    result = seer_profile(
        "prefill", "--device", "cpu", "--config", tiny_config,
        "-l", "256", "-s", "0.5,0.9", "-r", "3", "-o", "json",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert (data["weights"], data["gates"]) == ("random", "random")
    dense, *sparse = data["rows"]
    assert dense["test"] == "pp256 @ dense" and dense["speedup"] == {"mean": 1.0, "std": 0.0}
    assert dense["gates_ms"] is None and dense["achieved_sparsity"] is None
    assert [row["test"] for row in sparse] == ["pp256 @ s0.50", "pp256 @ s0.90"]
    for row in sparse:
        parts = [row["gates_ms"], row["attention_ms"], row["other_ms"]]
        assert all(part > 0 for part in parts), row
        # The parts come from one extra run; the TTFT is the mean of the timed runs. A busy
        # machine moves both, so the bound only catches a wrong unit or a missing part.
        assert 0.1 < sum(parts) / row["ttft_ms"]["mean"] < 10, row
        assert row["achieved_sparsity"] == pytest.approx(0.1)  # 4 blocks: only 1 can go


def slowed(fn, seconds: float):
    def slow(*args, **kwargs):
        time.sleep(seconds)
        return fn(*args, **kwargs)

    return slow


def test_breakdown_puts_each_piece_of_attention_in_its_column(monkeypatch):
    """Scoring sleeps 20 ms and the attention 60 ms per layer: each lands in its own part."""
    monkeypatch.setenv("SEER_ATTENTION_KERNEL", "reference")
    monkeypatch.setattr(attention, "pooled_qk_scores", slowed(attention.pooled_qk_scores, 0.02))
    reference = slowed(attention.block_sparse_attention_reference, 0.06)
    monkeypatch.setattr(attention, "block_sparse_attention_reference", reference)
    model = tiny_model("llama")
    sparse = profiling.TimedSparsePrefill(model, MaskPolicy(sparsity=0.5), gates=None)
    try:
        breakdown = profiling.instrumented_prefill(sparse, random_ids(256))
    finally:
        sparse.detach()
    layers = len(model.model.layers)
    assert 20 * layers <= breakdown.gates_ms < breakdown.attention_ms
    assert 60 * layers <= breakdown.attention_ms
    assert breakdown.other_ms > 0
    assert breakdown.total_ms == pytest.approx(
        breakdown.gates_ms + breakdown.attention_ms + breakdown.other_ms
    )


@pytest.mark.skipif(not interpreting(), reason="the Triton path on the CPU needs TRITON_INTERPRET")
def test_the_triton_path_under_the_interpreter(tiny_config, monkeypatch):
    """The GPU's sparse path (top-k straight to block lists, the Triton kernel), on the CPU."""
    monkeypatch.setenv("SEER_ATTENTION_KERNEL", "triton")
    common = ("--device", "cpu", "--config", tiny_config, "-l", "256", "-s", "0.5", "-r", "1")
    kernel = seer_profile("kernel", *common, "-o", "json")
    assert kernel.exit_code == 0, kernel.stderr
    [row] = json.loads(kernel.stdout)["rows"]
    assert row["attention_ms"]["mean"] > 0 and row["achieved_sparsity"] == pytest.approx(0.1)
    prefill = seer_profile("prefill", *common, "-o", "json")
    assert prefill.exit_code == 0, prefill.stderr
    data = json.loads(prefill.stdout)
    assert data["attention_kernel"] == "triton"
    assert data["rows"][1]["attention_ms"] > 0


# ---------------------------------------------------------------- pure pieces


def test_mean_and_std():
    assert Stat.of([1.0, 2.0, 3.0]) == Stat(2.0, 1.0)
    assert Stat.of([4.0]) == Stat(4.0, 0.0)
    assert format_stat(Stat(1.5, 0.25)) == "1.50 ± 0.25"
    assert format_stat(Stat(431.0, 2.0), digits=1) == "431.0 ± 2.0"


def test_ratio_propagates_both_spreads():
    assert ratio(Stat(10.0, 0.0), Stat(5.0, 0.0)) == Stat(2.0, 0.0)
    value = ratio(Stat(30.0, 0.9), Stat(10.0, 0.4))  # relative spreads 3 % and 4 %
    assert value.mean == 3.0 and value.std == pytest.approx(3.0 * 0.05)


def test_row_names():
    assert profiling.row_name(131072, 0.9) == "pp131072 @ s0.90"
    assert profiling.row_name(8192, None) == "pp8192 @ dense"
    assert profiling.row_name(8192, 0.925) == "pp8192 @ s0.925"


def crafted_row(length: int, sparsity: float, sparse: float, flash: float, cudnn) -> dict:
    return {
        "n_prompt": length,
        "sparsity": sparsity,
        "sparse_ms": Stat(sparse, 0.1),
        "dense_flash_ms": Stat(flash, 0.1),
        "dense_cudnn_ms": Stat(cudnn, 0.1) if cudnn is not None else None,
    }


CRAFTED = [
    # s0.5 loses to cuDNN at 8k only; s0.9 wins everywhere; s0.2 wins at 8k, loses at 32k;
    # s0.1 never wins. At 128k cuDNN could not run: flash is the fastest dense there.
    crafted_row(8192, 0.5, 1.10, 1.72, 1.00),
    crafted_row(32768, 0.5, 12.4, 25.3, 14.5),
    crafted_row(131072, 0.5, 205.0, 433.0, None),
    crafted_row(8192, 0.9, 0.45, 1.72, 1.00),
    crafted_row(32768, 0.9, 3.04, 25.3, 14.5),
    crafted_row(131072, 0.9, 43.2, 433.0, None),
    crafted_row(8192, 0.2, 0.90, 1.72, 1.00),
    crafted_row(32768, 0.2, 20.0, 25.3, 14.5),
    crafted_row(131072, 0.2, 300.0, 433.0, None),
    crafted_row(8192, 0.1, 2.00, 1.72, 1.00),
    crafted_row(32768, 0.1, 30.0, 25.3, 14.5),
    crafted_row(131072, 0.1, 500.0, 433.0, None),
]


def test_crossover_is_where_sparse_wins_from_on():
    found = profiling.crossover(list(reversed(CRAFTED)), ["flash", "cudnn"])
    assert found == [
        {"sparsity": 0.1, "pays_from": None},
        {"sparsity": 0.2, "pays_from": 131072},
        {"sparsity": 0.5, "pays_from": 32768},
        {"sparsity": 0.9, "pays_from": 8192},
    ]


def test_crossover_notes_name_the_lengths_and_times():
    backends = ["flash", "cudnn"]
    notes = profiling.crossover_notes(CRAFTED, profiling.crossover(CRAFTED, backends), backends)
    assert notes == [
        "crossover: s0.10 does not pay at the tested lengths "
        "(at 131072: sparse 500.00 ms vs dense flash 433.00 ms)",
        "crossover: s0.20 pays from 131072 tokens (at 131072: sparse 300.00 ms vs dense flash "
        "433.00 ms; at 32768: sparse 20.00 ms vs dense cuDNN 14.50 ms)",
        "crossover: s0.50 pays from 32768 tokens (at 32768: sparse 12.40 ms vs dense cuDNN "
        "14.50 ms; at 8192: sparse 1.10 ms vs dense cuDNN 1.00 ms)",
        "crossover: s0.90 pays from 8192 tokens, the shortest tested (at 8192: sparse 0.45 ms "
        "vs dense cuDNN 1.00 ms)",
    ]


def test_tables_show_missing_values_as_dash_empty_and_null():
    report = Report(
        "kernel",
        {"model": "m"},
        [Column("test", "test"), Column("n", "n", markdown=False), Column("t_ms", "t ms")],
        rows=[{"test": "a", "n": 1, "t_ms": Stat(2.0, 0.5)}, {"test": "b", "n": 2, "t_ms": None}],
    )
    assert render(report, "md") == ("| test | t ms |\n|---|---|\n| a | 2.00 ± 0.50 |\n| b | - |\n")
    assert render(report, "csv") == "test,n,t_ms,t_ms_std\na,1,2.0,0.5\nb,2,,\n"
    data = json.loads(render(report, "json"))
    assert data["model"] == "m" and "crossover" not in data
    assert data["rows"] == [
        {"test": "a", "n": 1, "t_ms": {"mean": 2.0, "std": 0.5}},
        {"test": "b", "n": 2, "t_ms": None},
    ]
