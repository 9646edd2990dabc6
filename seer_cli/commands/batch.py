"""``seer batch``: many documents through one loaded model, one JSON line per document.

Inputs, in the order given:

- a file: one document; its id is the path as given;
- a folder: every regular file inside it, recursively, sorted, hidden files and folders skipped;
  files found in a folder are always documents, whatever their name;
- a glob pattern (``'docs/**/*.md'``, quoted so the shell leaves it alone): its matches, sorted;
- a ``.jsonl`` file (named directly or matched by a glob): one item per line,
  ``{"id": "a1", "text": "…", "prompt": "…"}`` or ``{"id": "a1", "file": "doc.txt"}``, where
  ``id`` is a string or an integer, exactly one of ``text`` and ``file`` is given, a relative
  ``file`` is relative to the JSONL file's folder, ``prompt`` (optional) replaces ``--prompt``
  for that item, and other keys are ignored. A line that is not such an object becomes a failed
  item whose id is its source.

Output: one JSON object per line on stdout, or appended to ``--out`` and synced to disk as each
item finishes, so a crash loses at most the item in flight:

    {"id": …, "source": "docs/a.txt" or "items.jsonl:3", "text": "…", "prompt_n": …, …}

A successful line holds every field of ``seer generate --json`` except ``model``. A failed item
has ``"text": null`` and an ``"error"`` sentence, and the batch goes on. ``--resume`` skips the
ids that ``--out`` already holds as successes (failed items are retried) after cutting off a
partial last line.

Exit codes: 0 every item succeeded, 1 some item failed or a user error, 2 usage error,
130 interrupted (the item in flight is not written, so ``--resume`` redoes it).
"""

import contextlib
import glob
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, BinaryIO

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from .. import options as opt
from ..console import EXIT_USER_ERROR, handle_user_errors, stderr, warn, write_product
from ..engine.errors import SeerError
from ..engine.prompt import read_document

if TYPE_CHECKING:
    from ..engine.generation import SamplingOptions
    from ..engine.runtime import Engine

GLOB_CHARACTERS = frozenset("*?[")


@dataclass
class Item:
    """One document to run: a ``file`` to read or inline ``text``; ``error`` if it cannot run."""

    id: str | int
    source: str
    file: str | None = None
    text: str | None = None
    prompt: str | None = None
    error: str | None = None


@dataclass
class Tally:
    """How many items succeeded, failed, or were skipped as already in --out."""

    done: int = 0
    failed: int = 0
    skipped: int = 0


@handle_user_errors
def batch(
    inputs: Annotated[
        list[str],
        typer.Argument(
            help="Files, folders, glob patterns or .jsonl lists of items.", show_default=False
        ),
    ],
    out: Annotated[
        str | None,
        typer.Option("--out", "-o", help="Append the JSON lines to this file instead of stdout."),
    ] = None,
    resume: Annotated[
        bool,
        typer.Option("--resume", help="Continue --out: skip the items it holds as successes."),
    ] = False,
    prompt: Annotated[
        str, typer.Option("--prompt", "-p", help="The instruction for every item without its own.")
    ] = "Summarise this document.",
    system: opt.System = None,
    model: opt.Model = None,
    gates: opt.Gates = "auto",
    sparsity: opt.Sparsity = None,
    sparse_min_tokens: opt.SparseMinTokens = None,
    ubatch_size: opt.UbatchSize = None,
    threshold: opt.Threshold = None,
    local_blocks: opt.LocalBlocks = None,
    budget: opt.Budget = None,
    dense: opt.Dense = False,
    device: opt.Device = "auto",
    device_map: opt.DeviceMap = None,
    max_memory: opt.MaxMemory = None,
    dtype: opt.Dtype = "auto",
    max_tokens: opt.MaxTokens = 256,
    temp: opt.Temperature = 0.0,
    top_p: opt.TopP = 1.0,
    top_k: opt.TopK = 0,
    seed: opt.Seed = None,
    truncate: opt.Truncate = None,
    ctx_size: opt.CtxSize = None,
    rope_scaling: opt.RopeScaling = None,
    rope_scale: opt.RopeScale = None,
    yarn_orig_ctx: opt.YarnOrigCtx = None,
    yarn_attn_factor: opt.YarnAttnFactor = None,
    yarn_beta_fast: opt.YarnBetaFast = None,
    yarn_beta_slow: opt.YarnBetaSlow = None,
    quiet: opt.Quiet = False,
) -> None:
    """Run many documents through one loaded model, writing one JSON line per document."""
    opt.check_generation_flags(
        sparsity=sparsity, threshold=threshold, local_blocks=local_blocks, dense=dense,
        max_tokens=max_tokens, temperature=temp, top_p=top_p, top_k=top_k, truncate=truncate,
        budget=budget,
    )  # fmt: skip
    context = opt.context_settings(
        ctx_size, rope_scaling, rope_scale, yarn_orig_ctx, yarn_attn_factor, yarn_beta_fast,
        yarn_beta_slow,
    )  # fmt: skip
    if resume and out is None:
        raise SeerError("--resume needs --out, the results file to continue.")
    items = collect_items(inputs, exclude=out)
    results, finished = open_results(out, resume) if out else (None, set())
    todo = [item for item in items if item.id not in finished]
    tally = Tally(skipped=len(items) - len(todo))

    with results or contextlib.nullcontext():
        if todo:
            from ..engine.generation import SamplingOptions
            from ..engine.runtime import Engine, EngineOptions
            from ..progress import quiet_libraries

            quiet_libraries()
            engine = Engine.load(
                EngineOptions(model=model, gates=gates, sparsity=sparsity, threshold=threshold,
                              local_blocks=local_blocks, budget=budget, dense=dense, device=device,
                              dtype=dtype, device_map=device_map,
                              sparse_min_tokens=sparse_min_tokens, max_memory=max_memory,
                              ubatch_size=ubatch_size, context=context)
            )  # fmt: skip
            sampling = SamplingOptions(
                max_tokens=max_tokens, temperature=temp, top_p=top_p, top_k=top_k, seed=seed
            )
            job = Job(engine, sampling, instruction=prompt, system=system, truncate=truncate,
                      quiet=quiet)  # fmt: skip
            job.run_all(todo, results, tally)
    if tally.failed or not quiet:
        skipped = f", {tally.skipped} skipped (already in {out})" if out else ""
        stderr.print(f"{tally.done} done, {tally.failed} failed{skipped}", markup=False,
                     soft_wrap=True)  # fmt: skip
    if tally.failed:
        raise typer.Exit(EXIT_USER_ERROR)


@dataclass
class Job:
    """What every item of a batch shares: the loaded model, the sampling and the prompt parts."""

    engine: "Engine"
    sampling: "SamplingOptions"
    instruction: str
    system: str | None
    truncate: str | None
    quiet: bool

    def run_all(self, todo: list[Item], results: BinaryIO | None, tally: Tally) -> None:
        """Run and write each item in turn behind a progress bar, counting in ``tally``."""
        progress = Progress(
            TextColumn("{task.description}", markup=False), BarColumn(), MofNCompleteColumn(),
            TimeRemainingColumn(), console=stderr, transient=True,
            disable=self.quiet or not stderr.is_terminal,  # a bar in a log is noise
        )  # fmt: skip
        with progress:
            task = progress.add_task("batch", total=len(todo))
            for item in todo:
                progress.update(task, description=str(item.id))
                record = self.run(item)
                _write(results, record)
                tally.failed += "error" in record
                tally.done += "error" not in record
                progress.advance(task)

    def run(self, item: Item) -> dict:
        """Generate for one item; its JSON record, with ``error`` if it failed.

        Ctrl-C propagates as KeyboardInterrupt, whether it came during prefill or decoding.
        """
        record = {"id": item.id, "source": item.source}
        try:
            tokens = self.engine.prompt(
                document=_document_text(item, self.quiet),
                instruction=item.prompt or self.instruction, system=self.system,
                max_tokens=self.sampling.max_tokens, truncate=self.truncate,
            )  # fmt: skip
            result = self.engine.generate(tokens.ids, self.sampling)
        except SeerError as error:
            return {**record, "text": None, "error": str(error)}
        if result.stats.interrupted:
            raise KeyboardInterrupt
        result.stats.truncated_tokens = tokens.cut_tokens
        return {**record, "text": result.text, **result.stats.to_dict()}


def _document_text(item: Item, quiet: bool) -> str:
    if item.error is not None:
        raise SeerError(item.error)
    if item.text is not None:
        return item.text
    document = read_document(item.file)
    if document.replaced_invalid_utf8 and not quiet:
        warn(f"{item.file} is not valid UTF-8; undecodable bytes were replaced.")
    return document.text


def _write(results: BinaryIO | None, record: dict) -> None:
    """One JSON line to stdout, or appended to the results file and synced to disk."""
    line = json.dumps(record) + "\n"
    if results is None:
        write_product(line)
        return
    results.write(line.encode("utf-8"))
    results.flush()
    os.fsync(results.fileno())


# Inputs.


def collect_items(inputs: list[str], exclude: str | None = None) -> list[Item]:
    """Every item the inputs name, in order; refuses missing inputs and repeated ids.

    ``exclude`` (the results file) is left out wherever a folder or glob finds it.
    """
    items = [item for argument in inputs for item in _items_from(argument)]
    if exclude is not None:
        items = [item for item in items if not _same_file(item.file, exclude)]
    if not items:
        raise SeerError(f"no documents found in {', '.join(inputs)}.")
    sources = {}
    for item in items:
        if item.id in sources:
            raise SeerError(
                f"id {item.id!r} is used twice ({sources[item.id]} and {item.source}); "
                "ids must be unique so that --resume can tell the items apart."
            )
        sources[item.id] = item.source
    return items


def _items_from(argument: str) -> list[Item]:
    if argument == "-":
        raise SeerError("batch does not read stdin: pass files, folders, globs or a .jsonl list.")
    if os.path.lexists(argument):
        return _items_at(argument)
    if GLOB_CHARACTERS.isdisjoint(argument):
        raise SeerError(f"{argument}: no such file or folder.")
    matches = sorted(glob.glob(argument, recursive=True))
    if not matches:
        raise SeerError(f"no files match {argument}.")
    return [item for path in matches for item in _items_at(path)]


def _items_at(path: str) -> list[Item]:
    if os.path.isdir(path):
        return [Item(id=file, source=file, file=file) for file in _files_in(path)]
    if path.lower().endswith(".jsonl"):
        return jsonl_items(path)
    return [Item(id=path, source=path, file=path)]


def _files_in(folder: str) -> list[str]:
    """Every regular file under ``folder``, sorted, skipping hidden files and folders."""
    files = []
    for parent, folders, names in os.walk(folder):
        folders[:] = [name for name in folders if not name.startswith(".")]
        files += [os.path.join(parent, name) for name in names if not name.startswith(".")]
    return sorted(file for file in files if os.path.isfile(file))


def _same_file(path: str | None, other: str) -> bool:
    return path is not None and os.path.realpath(path) == os.path.realpath(other)


def jsonl_items(path: str) -> list[Item]:
    """One item per non-blank line of a JSONL list; a bad line becomes an item with ``error``."""
    folder = os.path.dirname(path)
    lines = read_document(path).text.splitlines()
    return [
        _jsonl_item(line, f"{path}:{number}", folder)
        for number, line in enumerate(lines, start=1)
        if line.strip()
    ]


def _jsonl_item(line: str, source: str, folder: str) -> Item:
    try:
        entry = json.loads(line)
    except json.JSONDecodeError as error:
        problem = f"the line is not valid JSON ({error.msg} at column {error.colno})."
        return Item(id=source, source=source, error=problem)
    problem = _entry_problem(entry)
    item_id = entry.get("id") if isinstance(entry, dict) and _valid_id(entry.get("id")) else None
    if problem is not None:
        return Item(id=source if item_id is None else item_id, source=source, error=problem)
    file = entry.get("file")
    return Item(
        id=item_id, source=source, text=entry.get("text"), prompt=entry.get("prompt"),
        file=os.path.join(folder, os.path.expanduser(file)) if file is not None else None,
    )  # fmt: skip


def _entry_problem(entry) -> str | None:
    """What is wrong with one parsed JSONL line, in a sentence, or None."""
    if not isinstance(entry, dict):
        return 'the line is not a JSON object like {"id": "a1", "text": "…"}.'
    if not _valid_id(entry.get("id")):
        return 'the item needs an "id" that is a string or an integer.'
    if ("text" in entry) == ("file" in entry):
        return 'the item needs exactly one of "text" and "file".'
    for key in ("text", "file"):
        if key in entry and not (isinstance(entry[key], str) and entry[key].strip()):
            return f'"{key}" must be a non-empty string.'
    if not isinstance(entry.get("prompt", ""), str):
        return '"prompt" must be a string.'
    return None


def _valid_id(value) -> bool:
    return isinstance(value, str | int) and not isinstance(value, bool)


# Results file.


def open_results(path: str, resume: bool) -> tuple[BinaryIO, set]:
    """Open ``--out`` for appending, with the ids it already holds as successes.

    A file with content is refused unless resuming; when resuming, a partial last line (a line
    cut off by a crash) is removed first.
    """
    file = Path(path)
    if file.is_dir():
        raise SeerError(f"--out {path} is a directory; pass a file.")
    if not resume and file.exists() and file.stat().st_size > 0:
        raise SeerError(
            f"{path} already holds results; pass --resume to continue it or choose another file."
        )
    try:
        results = open(file, "ab")
        data = file.read_bytes() if resume else b""
    except OSError as error:
        raise SeerError(f"cannot write to {path} ({error.strerror}).") from error
    if data and not data.endswith(b"\n"):
        results.truncate(data.rfind(b"\n") + 1)
    return results, successful_ids(data)


def successful_ids(data: bytes) -> set:
    """The ids of the complete result lines in ``data`` that have no error."""
    ids = set()
    for line in data.splitlines(keepends=True):
        try:
            record = json.loads(line) if line.endswith(b"\n") else None
        except ValueError:
            continue
        if _succeeded(record):
            ids.add(record["id"])
    return ids


def _succeeded(record) -> bool:
    return (
        isinstance(record, dict) and _valid_id(record.get("id"))
        and isinstance(record.get("text"), str) and record.get("error") is None
    )  # fmt: skip
