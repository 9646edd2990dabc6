"""The config file: flags > environment > config file > defaults, per-command tables, errors.

A two-command app stands in for ``seer``, wired the same way (the root callback applies the
file), so no model is needed.
"""

import json
from typing import Annotated

import pytest
import typer
from typer.testing import CliRunner

from seer_cli import options as opt
from seer_cli.config import apply_config_file, load_default_map

app = typer.Typer()


@app.callback()
def root(ctx: typer.Context) -> None:
    apply_config_file(ctx)


@app.command()
def generate(
    max_tokens: opt.MaxTokens = 256,
    sparsity: opt.Sparsity = None,
    json_output: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    print(json.dumps({"max_tokens": max_tokens, "sparsity": sparsity, "json": json_output}))


@app.command()
def batch(
    max_tokens: opt.MaxTokens = 256,
    prompt: Annotated[str, typer.Option("--prompt", "-p")] = "Summarise this document.",
) -> None:
    print(json.dumps({"max_tokens": max_tokens, "prompt": prompt}))


@pytest.fixture
def config(tmp_path, monkeypatch):
    """Write the config file at $SEER_CONFIG; the environment starts without SEER_ variables."""
    for name in ("SEER_MAX_TOKENS", "SEER_SPARSITY"):
        monkeypatch.delenv(name, raising=False)
    path = tmp_path / "config.toml"
    monkeypatch.setenv("SEER_CONFIG", str(path))

    def write(text: str):
        path.write_text(text)
        return path

    return write


def invoke(*args: str, env: dict | None = None):
    return CliRunner().invoke(app, list(args), env=env)


def values(*args: str, env: dict | None = None) -> dict:
    result = invoke(*args, env=env)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.mark.parametrize(
    "file, env, flag, expected",
    [
        (False, False, False, 256),
        (True, False, False, 64),
        (True, True, False, 32),
        (True, True, True, 16),
        (False, True, False, 32),
        (True, False, True, 16),
    ],
    ids=["default", "file", "env-over-file", "flag-over-all", "env", "flag-over-file"],
)
def test_precedence(config, file, env, flag, expected):
    config("max-tokens = 64\n" if file else "")
    args = ["generate", *(["-n", "16"] if flag else [])]
    assert values(*args, env={"SEER_MAX_TOKENS": "32"} if env else None)["max_tokens"] == expected


def test_default_location_is_optional(tmp_path, monkeypatch):
    monkeypatch.delenv("SEER_CONFIG", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    assert values("generate")["max_tokens"] == 256
    (tmp_path / "seer").mkdir()
    (tmp_path / "seer" / "config.toml").write_text("max_tokens = 8\n")
    assert values("generate")["max_tokens"] == 8


def test_command_tables_override_top_level_keys(config):
    config('max-tokens = 64\nsparsity = 0.9\n\n[batch]\nmax_tokens = 8\nprompt = "In brief."\n')
    assert values("generate") == {"max_tokens": 64, "sparsity": 0.9, "json": False}
    assert values("batch") == {"max_tokens": 8, "prompt": "In brief."}


def test_keys_are_option_names(config):
    config("[generate]\njson = true\n")
    assert values("generate")["json"] is True


def test_help_shows_config_defaults(config):
    config("max-tokens = 64\n")
    help_text = invoke("generate", "--help").stdout
    assert "64" in help_text and "256" not in help_text


@pytest.mark.parametrize(
    "text, message",
    [
        ("max-tokens = \n", "is not valid TOML"),
        ("max-token = 64\n", "no seer command has an option --max-token"),
        ("[generat]\nsparsity = 0.5\n", "table 'generat' is not a seer command"),
        ("[generate]\nprompt = 'x'\n", "seer generate has no option --prompt"),
    ],
    ids=["malformed", "unknown-key", "unknown-table", "key-of-another-command"],
)
def test_bad_file_is_one_line(config, text, message):
    path = config(text)
    result = invoke("generate")
    assert result.exit_code == 1
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1
    assert message in result.stderr.replace("\n", "") and str(path) in result.stderr


def test_named_file_must_exist(tmp_path, monkeypatch):
    monkeypatch.setenv("SEER_CONFIG", str(tmp_path / "missing.toml"))
    result = invoke("generate")
    assert result.exit_code == 1
    assert "SEER_CONFIG names" in result.stderr and "does not exist" in result.stderr


def test_bad_value_is_a_usage_error(config):
    config('max-tokens = "many"\n')
    result = invoke("generate")
    assert result.exit_code == 2
    assert "--max-tokens" in result.stderr


def test_real_commands(config):
    """The seer app's own commands take their keys from their option names."""
    from seer_cli.app import app as seer

    config("max-tokens = 64\ntemp = 0.5\n[generate]\nno-stream = true\n")
    commands = typer.main.get_command(seer).commands
    assert load_default_map(commands)["generate"] == {
        "max_tokens": 64, "temp": 0.5, "no_stream": True,
    }  # fmt: skip


def test_batch_takes_its_defaults_from_the_file(config, tmp_path):
    """``seer batch`` reads --out from its table: a file with results is refused, unchanged."""
    from seer_cli.commands.batch import batch as seer_batch

    seer = typer.Typer()
    seer.callback()(root)
    seer.command("batch")(seer_batch)
    out = tmp_path / "out.jsonl"
    out.write_text("{}\n")
    (tmp_path / "doc.txt").write_text("A document.")
    config(f"[batch]\nout = {json.dumps(str(out))}\n")

    result = CliRunner().invoke(seer, ["batch", str(tmp_path / "doc.txt")])

    assert result.exit_code == 1
    assert f"{out} already holds results" in result.stderr
    assert out.read_text() == "{}\n"
