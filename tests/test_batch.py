"""``seer batch`` with the real default model: failed items, refusing to clobber, resuming after
a crash, JSONL lists, and killed or interrupted runs.

The model loads once for the module: ``Engine.load`` is patched to hand out the same engine,
except in the subprocess tests, which run the command as a user would.
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import typer
from typer.testing import CliRunner

from seer_cli.commands.batch import batch, collect_items
from seer_cli.engine.errors import SeerError
from seer_cli.engine.runtime import Engine, EngineOptions

pytestmark = pytest.mark.model

app = typer.Typer()
app.command("batch")(batch)


@app.callback()
def root() -> None:
    """Stands in for ``seer`` until it registers ``batch``."""


# The command line for the subprocess tests, built the same way.
SEER = [
    sys.executable, "-c",
    "import typer; from seer_cli.commands.batch import batch; app = typer.Typer(); "
    "app.command('batch')(batch); app.callback()(lambda: None); app()",
]  # fmt: skip

TEXTS = [
    "The cat sat on the warm mat all afternoon. It did not move once.",
    "Rain fell on the valley for three days, and the river rose over its banks.",
    "The baker woke at four, lit the oven and shaped two hundred loaves of bread.",
    "A small boat crossed the bay at dawn, carrying letters to the island.",
    "The old clock in the hall stopped at noon, and nobody wound it again.",
    "Bees flew from flower to flower in the garden, gathering pollen for the hive.",
]
REAL_LOAD = Engine.load


@pytest.fixture(scope="module")
def engine():
    return REAL_LOAD(EngineOptions())


@pytest.fixture(autouse=True)
def loads(monkeypatch, request):
    """Engine.load hands out the module's engine; the list holds the options of each call."""
    calls = []

    def load(options):
        calls.append(options)
        return request.getfixturevalue("engine")

    monkeypatch.setattr(Engine, "load", staticmethod(load))
    return calls


def write_docs(folder, count: int) -> list[str]:
    folder.mkdir(exist_ok=True)
    paths = [str(folder / f"doc{index}.txt") for index in range(count)]
    for path, text in zip(paths, TEXTS, strict=False):
        with open(path, "w") as file:
            file.write(text)
    return paths


def run(*args: str):
    return CliRunner().invoke(app, ["batch", *args])


def records(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines()]


def assert_succeeded(record: dict, max_tokens: int) -> None:
    assert "error" not in record
    assert isinstance(record["text"], str) and record["text"].strip()
    assert 1 <= record["predicted_n"] <= max_tokens and record["prompt_n"] > 0
    assert record["prompt_per_second"] > 0 and record["interrupted"] is False


def test_bad_items_are_recorded_and_the_batch_goes_on(tmp_path, loads):
    docs = tmp_path / "docs"
    good = write_docs(docs, 2)
    (docs / "sub").mkdir()
    good += write_docs(docs / "sub", 1)
    (docs / "binary.dat").write_bytes(b"\x7fELF\x00\x01\x02")
    (docs / "empty.txt").write_text("  \n")
    (docs / "long.txt").write_text("word " * 40000)  # more tokens than the model's context
    (docs / ".hidden.txt").write_text("A hidden file is skipped.")
    (docs / ".git").mkdir()
    (docs / ".git" / "HEAD").write_text("So is a hidden folder.")

    result = run(str(docs), "-n", "3")

    assert result.exit_code == 1
    assert result.stderr.splitlines()[-1] == "3 done, 3 failed"
    lines = records(result.stdout)  # stdout holds only JSON lines
    by_id = {line["id"]: line for line in lines}
    bad = {str(docs / name) for name in ("binary.dat", "empty.txt", "long.txt")}
    assert [line["id"] for line in lines] == sorted(good + list(bad))
    for path in good:
        assert_succeeded(by_id[path], max_tokens=3)
        assert by_id[path]["source"] == path
    for path in bad:
        assert by_id[path]["text"] is None
    assert "binary" in by_id[str(docs / "binary.dat")]["error"]
    assert "empty" in by_id[str(docs / "empty.txt")]["error"]
    assert "--truncate" in by_id[str(docs / "long.txt")]["error"]
    assert loads == [EngineOptions()]


def test_jsonl_items_and_malformed_lines(tmp_path):
    write_docs(tmp_path / "docs", 1)
    items = tmp_path / "items.jsonl"
    items.write_text(
        '{"id": "inline", "text": "The sun rose over the hills.", "prompt": "Name the star."}\n'
        "\n"
        '{"id": 7, "file": "docs/doc0.txt"}\n'
        '{"id": "broken", "text": "no end\n'
        '{"text": "no id"}\n'
        '{"id": "both", "text": "a", "file": "b"}\n'
    )

    result = run(str(items), "-n", "2", "--quiet")

    assert result.exit_code == 1
    assert result.stderr.strip() == "2 done, 3 failed"
    inline, from_file, broken, no_id, both = records(result.stdout)
    assert_succeeded(inline, max_tokens=2)
    assert_succeeded(from_file, max_tokens=2)
    assert (inline["source"], from_file["id"]) == (f"{items}:1", 7)
    assert broken["id"] == broken["source"] == f"{items}:4"
    assert "not valid JSON" in broken["error"] and broken["text"] is None
    assert no_id["id"] == f"{items}:5" and '"id"' in no_id["error"]
    assert both["id"] == "both" and "exactly one" in both["error"]


def test_questions_over_one_document_read_it_once(tmp_path):
    book = tmp_path / "book.txt"
    book.write_text(" ".join(TEXTS * 8))
    items = tmp_path / "questions.jsonl"
    items.write_text(
        '{"id": 1, "file": "book.txt", "prompt": "Who crossed the bay?"}\n'
        '{"id": 2, "file": "book.txt", "prompt": "When did the clock stop?"}\n'
    )

    first, second = records(run(str(items), "-n", "2", "--quiet").stdout)

    assert first["cache_n"] == 0 and first["prompt_n"] > 400
    # The document comes from the first item's cache: only the last block and the question
    # are prefilled again.
    assert second["cache_n"] % 64 == 0 and second["prompt_n"] < 64 + 32


def test_resume_after_a_crash(tmp_path):
    paths = write_docs(tmp_path / "docs", 4)
    out = tmp_path / "out.jsonl"
    kept = "".join(
        json.dumps({"id": path, "source": path, "text": "earlier result"}) + "\n"
        for path in paths[:2]
    )
    failed = json.dumps({"id": paths[2], "source": paths[2], "text": None, "error": "it failed."})
    out.write_text(f'{kept}{failed}\n{{"id": "{paths[3]}", "te')  # a line cut off by a crash

    result = run(str(tmp_path / "docs"), "-n", "2", "-o", str(out), "--resume")

    assert result.exit_code == 0, result.output
    assert result.stdout == ""
    assert result.stderr.splitlines()[-1] == f"2 done, 0 failed, 2 skipped (already in {out})"
    text = out.read_text()
    assert text.startswith(kept + failed + "\n")
    new = records(text[len(kept + failed) + 1 :])
    assert [line["id"] for line in new] == paths[2:]  # the failed item is retried
    for line in new:
        assert_succeeded(line, max_tokens=2)


def test_out_with_results_is_not_clobbered(tmp_path, loads):
    write_docs(tmp_path / "docs", 1)
    out = tmp_path / "out.jsonl"
    out.write_text('{"id": "x", "text": "kept"}\n')

    result = run(str(tmp_path / "docs"), "-o", str(out))

    assert result.exit_code == 1
    assert "already holds results; pass --resume" in result.stderr
    assert out.read_text() == '{"id": "x", "text": "kept"}\n'
    assert loads == []


@pytest.mark.parametrize(
    "name, message",
    [("missing/out.jsonl", "No such file or directory"), (".", "is a directory")],
    ids=["missing-folder", "folder"],
)
def test_unwritable_out_fails_before_loading(tmp_path, loads, name, message):
    write_docs(tmp_path / "docs", 1)

    result = run(str(tmp_path / "docs"), "-o", str(tmp_path / name))

    assert result.exit_code == 1
    assert message in result.stderr and result.stderr.count("\n") == 1
    assert loads == []


def test_inputs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_docs(tmp_path / "docs", 3)
    (tmp_path / "docs" / "notes.md").write_text("Notes.")
    (tmp_path / "docs" / "out.jsonl").write_text("")

    found = collect_items(["docs/*.txt", "docs/notes.md"])
    assert [item.id for item in found] == [f"docs/doc{i}.txt" for i in range(3)] + ["docs/notes.md"]
    found = collect_items(["docs"], exclude="./docs/out.jsonl")  # the results file is left out
    assert [item.source for item in found][-1] == "docs/notes.md"
    for inputs, message in [
        (["-"], "does not read stdin"),
        (["nope.txt"], "no such file or folder"),
        (["docs/*.pdf"], "no files match"),
        (["docs", "docs/doc1.txt"], "is used twice"),
    ]:
        with pytest.raises(SeerError, match=message):
            collect_items(inputs)


def start(tmp_path, *args: str) -> subprocess.Popen:
    """Run ``seer batch`` in a process of its own; its stderr goes to a file."""
    env = {**os.environ, "SEER_CONFIG": os.devnull}
    with open(tmp_path / "stderr.txt", "ab") as stderr:
        return subprocess.Popen(
            [*SEER, "batch", *args], env=env, stdout=subprocess.DEVNULL, stderr=stderr,
            # A test run started in the background inherits SIGINT ignored; Ctrl-C must reach it.
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )  # fmt: skip


def wait_for_lines(path, process: subprocess.Popen, count: int = 1, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not (path.exists() and path.read_bytes().count(b"\n") >= count):
        assert process.poll() is None, "the run ended before writing a line"
        assert time.monotonic() < deadline, "no line was written in time"
        time.sleep(0.02)


def test_a_killed_run_resumes_where_it_stopped(tmp_path):
    paths = write_docs(tmp_path / "docs", 6)
    out = tmp_path / "out.jsonl"
    args = [str(tmp_path / "docs"), "-n", "2", "-o", str(out)]

    process = start(tmp_path, *args)
    wait_for_lines(out, process)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    before = out.read_bytes()
    before = before[: before.rfind(b"\n") + 1]

    rerun = start(tmp_path, *args, "--resume", "--quiet")
    assert rerun.wait(timeout=300) == 0, (tmp_path / "stderr.txt").read_text()
    after = out.read_bytes()
    assert after.startswith(before)  # the finished items were neither redone nor rewritten
    ids = [line["id"] for line in records(after.decode())]
    assert sorted(ids) == paths and len(ids) == len(paths)
    assert len(records(before.decode())) >= 1


def test_ctrl_c_stops_with_130_and_complete_lines(tmp_path):
    write_docs(tmp_path / "docs", 6)
    out = tmp_path / "out.jsonl"

    process = start(tmp_path, str(tmp_path / "docs"), "-n", "2", "-o", str(out), "--quiet")
    wait_for_lines(out, process)
    process.send_signal(signal.SIGINT)

    assert process.wait(timeout=60) == 130
    assert (tmp_path / "stderr.txt").read_text().splitlines()[-1] == "interrupted"
    text = out.read_text()
    assert text.endswith("\n")
    for line in records(text):
        assert_succeeded(line, max_tokens=2)


def test_policy_options_reach_the_engine(tmp_path, loads, monkeypatch):
    monkeypatch.setenv("SEER_LOCAL_BLOCKS", "4")
    write_docs(tmp_path / "docs", 1)

    result = run(str(tmp_path / "docs"), "-n", "1", "--sparsity", "0.9", "--gates", "pooled")

    assert result.exit_code == 0, result.output
    assert loads == [EngineOptions(gates="pooled", sparsity=0.9, local_blocks=4)]


def test_nothing_left_to_do_loads_no_model(tmp_path, loads):
    paths = write_docs(tmp_path / "docs", 2)
    out = tmp_path / "out.jsonl"
    out.write_text("".join(json.dumps({"id": path, "text": "done"}) + "\n" for path in paths))

    result = run(str(tmp_path / "docs"), "-o", str(out), "--resume")

    assert result.exit_code == 0
    assert result.stderr.strip() == f"0 done, 0 failed, 2 skipped (already in {out})"
    assert loads == []
