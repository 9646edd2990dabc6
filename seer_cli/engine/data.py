"""The user's texts for commands that learn or measure on them: files and folders, cut into
non-overlapping windows of tokens."""

from pathlib import Path

from .errors import SeerError
from .prompt import read_document


def text_files(paths: list[str]) -> list[Path]:
    """Files named, and the files inside folders named (recursively, sorted, hidden ones
    skipped); ``-`` is standard input."""
    files = []
    for path in map(Path, paths):
        if str(path) == "-" or path.is_file():
            files.append(path)
        elif path.is_dir():
            files.extend(
                p for p in sorted(path.rglob("*")) if p.is_file() and not p.name.startswith(".")
            )
        else:
            raise SeerError(f"--data {path}: no such file or folder.")
    return files


def token_windows(
    tokenizer, paths: list[str], seq_len: int, max_windows: int | None, seed: int, min_windows=2
):
    """Cut every text into non-overlapping windows of ``seq_len`` tokens, shuffled by seed.

    Returns (windows, each a [seq_len] long tensor; summary, the data files and tokens used).
    Raises SeerError if fewer than ``min_windows`` windows fit in the data.
    """
    import torch

    windows = []
    files = text_files(paths)
    for file in files:
        ids = tokenizer(read_document(str(file)).text, add_special_tokens=False)["input_ids"]
        windows.extend(
            torch.tensor(ids[i : i + seq_len]) for i in range(0, len(ids) - seq_len + 1, seq_len)
        )
    if len(windows) < min_windows:
        raise SeerError(
            f"the data holds {len(windows)} windows of {seq_len} tokens; "
            f"at least {min_windows} {'is' if min_windows == 1 else 'are'} needed."
        )
    order = torch.randperm(len(windows), generator=torch.Generator().manual_seed(seed)).tolist()
    windows = [windows[i] for i in order][:max_windows]
    summary = {"data_files": [f.name for f in files], "data_tokens": len(windows) * seq_len}
    return windows, summary
