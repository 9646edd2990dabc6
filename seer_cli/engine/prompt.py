"""Reading the user's document and turning document + instruction into prompt tokens."""

import sys
from dataclasses import dataclass
from pathlib import Path

from .errors import SeerError

TRUNCATE_MODES = ("start", "middle", "end")


@dataclass
class Document:
    text: str
    source: str  # a path, or "<stdin>"
    replaced_invalid_utf8: bool = False


def decode_text(data: bytes, source: str) -> Document:
    """Text from bytes: refuse binary data; decode invalid UTF-8 with replacement characters."""
    if not data.strip():
        raise SeerError(f"{source} is empty.")
    if b"\x00" in data[:65536]:
        raise SeerError(f"{source} looks like a binary file, not text.")
    try:
        return Document(data.decode("utf-8"), source)
    except UnicodeDecodeError:
        return Document(data.decode("utf-8", errors="replace"), source, replaced_invalid_utf8=True)


def read_document(path: str) -> Document:
    """Read ``path`` (``-`` for standard input) as text, or raise SeerError saying what is wrong."""
    if path == "-":
        return decode_text(sys.stdin.buffer.read(), "<stdin>")
    file = Path(path).expanduser()
    if not file.exists():
        raise SeerError(f"{path}: no such file.")
    if file.is_dir():
        raise SeerError(f"{path} is a directory; pass a file.")
    try:
        data = file.read_bytes()
    except OSError as error:
        raise SeerError(f"{path}: cannot read it ({error.strerror}).") from error
    return decode_text(data, path)


@dataclass
class PromptTokens:
    ids: list[int]
    cut_tokens: int = 0  # document tokens dropped by --truncate


def _render(
    tokenizer, document: str | None, instruction: str | None, system: str | None
) -> list[int]:
    user = "\n\n".join(part for part in (document, instruction) if part)
    if tokenizer.chat_template:
        messages = [{"role": "system", "content": system}] if system else []
        messages.append({"role": "user", "content": user})
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
    text = "\n\n".join(part for part in (system, user) if part)
    return tokenizer(text)["input_ids"]


def _cut(ids: list[int], keep: int, mode: str) -> list[int]:
    if mode == "end":
        return ids[:keep]
    if mode == "start":
        return ids[len(ids) - keep :]
    head = keep // 2
    return ids[:head] + ids[len(ids) - (keep - head) :]


def build_prompt(
    tokenizer,
    *,
    document: str | None,
    instruction: str | None,
    system: str | None,
    max_prompt_tokens: int,
    truncate: str | None,
) -> PromptTokens:
    """Prompt tokens through the chat template (document, then instruction, in the user turn).

    If the prompt exceeds ``max_prompt_tokens``, ``truncate`` says which part of the document to
    cut (start, middle or end); without it the prompt is refused.
    """
    if truncate is None or not document:
        ids = _render(tokenizer, document, instruction, system)
        if len(ids) <= max_prompt_tokens:
            return PromptTokens(ids)
        raise SeerError(
            f"the prompt is {len(ids)} tokens but at most {max_prompt_tokens} fit "
            "(the context, --ctx-size, minus --max-tokens); "
            "pass --truncate start|middle|end to cut the document."
        )
    # A book is tokenized once (its whole text is the slow part); only the kept part is
    # rendered through the template.
    doc_ids = tokenizer(document, add_special_tokens=False)["input_ids"]
    keep = min(len(doc_ids), max_prompt_tokens - _template_tokens(tokenizer, instruction, system))
    # Re-tokenizing cut text can differ by a few tokens at the seams: shrink until it fits.
    while keep > 0:
        text = document if keep == len(doc_ids) else tokenizer.decode(_cut(doc_ids, keep, truncate))
        ids = _render(tokenizer, text, instruction, system)
        if len(ids) <= max_prompt_tokens:
            return PromptTokens(ids, cut_tokens=len(doc_ids) - keep)
        keep -= len(ids) - max_prompt_tokens
    raise SeerError(
        f"the instruction and chat template alone take more than {max_prompt_tokens} tokens."
    )


def _template_tokens(tokenizer, instruction: str | None, system: str | None) -> int:
    """Prompt tokens besides the document's: template, system prompt, instruction."""
    probe = "."
    probe_tokens = len(tokenizer(probe, add_special_tokens=False)["input_ids"])
    return len(_render(tokenizer, probe, instruction, system)) - probe_tokens
