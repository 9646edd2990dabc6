"""Passkey retrieval prompts: a random key hidden at a given depth of filler text, and the
answer read back from what the model generates."""

import random
import re
from dataclasses import dataclass

from ..engine.errors import SeerError
from ..engine.prompt import build_prompt

NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? Answer with the number only."
# Room for "The pass key is NNNNN." with digits tokenized one by one, as many tokenizers do.
ANSWER_TOKENS = 16
# Re-tokenizing text cut at token boundaries can add a token at each seam.
_SEAM_SLACK = 8


def _render(tokenizer, document: str, length: int) -> list[int]:
    """The passkey prompt of ``document`` and ``QUESTION``, its document cut at the end to fit."""
    prompt = build_prompt(
        tokenizer, document=document, instruction=QUESTION, system=None,
        max_prompt_tokens=length, truncate="end",
    )  # fmt: skip
    return prompt.ids


def _template_head(tokenizer, length: int) -> int:
    """Tokens that the chat template puts before the document: where two prompts that differ
    only in their document part ways."""
    first, second = (_render(tokenizer, text, length) for text in ("a", "b"))
    return next(
        (i for i, (x, y) in enumerate(zip(first, second, strict=False)) if x != y), len(first)
    )


def passkey_prompt(tokenizer, filler_ids: list[int], key: str, depth: float, length: int):
    """Prompt ids (at most ``length``, a few tokens fewer after re-tokenizing) asking for the
    pass key hidden in filler text from ``filler_ids``: the needle starts near token
    ``depth · length`` of the prompt, and ``QUESTION`` follows the filler."""
    needle = NEEDLE.format(key=key)
    room = length - len(_render(tokenizer, needle, length)) - _SEAM_SLACK
    if room < 0:
        raise SeerError(f"{length} tokens leave no room for filler around the passkey question.")
    before = min(max(round(depth * length) - _template_head(tokenizer, length), 0), room)
    parts = (
        tokenizer.decode(filler_ids[:before]),
        needle,
        tokenizer.decode(filler_ids[before:room]),
    )
    return _render(tokenizer, " ".join(part for part in parts if part), length)


def passkey_answer(text: str) -> str | None:
    """The first number in a generated answer, as its digits."""
    match = re.search(r"\d+", text)
    return match.group() if match else None


@dataclass
class PasskeyPrompt:
    ids: list[int]
    key: str
    depth: float


def passkey_prompts(
    tokenizer, filler_ids: list[int], depths: list[float], trials: int, length: int, seed: int
) -> list[PasskeyPrompt]:
    """``trials`` prompts per depth, each with its own random 5-digit key drawn from ``seed``."""
    rng = random.Random(seed)
    prompts = []
    for depth in depths:
        for _ in range(trials):
            key = str(rng.randint(10000, 99999))
            ids = passkey_prompt(tokenizer, filler_ids, key, depth, length)
            prompts.append(PasskeyPrompt(ids, key, depth))
    return prompts
