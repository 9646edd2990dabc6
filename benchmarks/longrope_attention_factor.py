"""Does LongRoPE's attention factor decide whether the model answers after a 32k document?

Under the LongRoPE factors as fitted (``benchmarks/fit_rope_factors.py``) the default model
often ended its turn at once after a long document (EVAL.md); the shipped factors keep the
fitted per-frequency factors with YaRN's attention factor, 0.1·ln(scale) + 1. For each attention
factor (default: the fitted one and YaRN's), with the per-frequency factors unchanged:

- answers: greedy ``Engine.generate`` of ``--max-tokens`` tokens after each book and instruction
  of ``--cases`` (the document's first tokens, as ``--truncate end``), at ``--sparsity`` with
  ``--gates auto`` (``--sparsity 0`` for dense), as ``seer generate`` runs;
- perplexity (``--windows`` > 0): the tail perplexity (last 4096 predictions) of the first
  ``--windows`` 32768-token windows of the held-out novel pg2641, dense, float32 on the CPU
  (about 4.5 minutes a window on two cores), against the native model reading only each
  window's last 8192 tokens (the first row).

    python benchmarks/longrope_attention_factor.py --books ../shared/data/books --windows 1
"""

import argparse
import math
import pathlib
import sys
import time
from dataclasses import replace

import torch
from fit_rope_factors import NATIVE, FittedRope, perplexity

from seer_cli.engine.context import ContextSettings
from seer_cli.engine.data import token_windows
from seer_cli.engine.generation import SamplingOptions
from seer_cli.engine.models import resolve_model
from seer_cli.engine.prompt import build_prompt, read_document
from seer_cli.engine.runtime import Engine, EngineOptions
from seer_cli.progress import quiet_libraries

LONG = 32768
# The attention factor benchmarks/fit_rope_factors.py fitted with the shipped per-frequency ones.
FITTED_ATTENTION_FACTOR = 1.07603
# The prompts that sparse 0.9 under the fitted factors left unanswered (CPU, 2026-12-05).
CASES = ("pg1342:Summarise this.,pg37106:Summarise this.,pg1342:What happens at the end?,"
         "pg37106:What happens at the end?")  # fmt: skip


def plain_model():
    """The default model as transformers loads it, float32 on the CPU."""
    from transformers import AutoModelForCausalLM

    source = resolve_model("SmolLM2-135M-Instruct")
    kwargs = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    return AutoModelForCausalLM.from_pretrained(
        source.folder, dtype=torch.float32, attn_implementation="sdpa", **kwargs
    ).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--books", default="../shared/data/books")
    parser.add_argument("--attention-factors", help="comma-separated (default: fitted, YaRN's)")
    parser.add_argument("--cases", default=CASES, help="comma-separated book:instruction")
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--windows", type=int, default=0)
    args = parser.parse_args()
    quiet_libraries()
    engine = Engine.load(EngineOptions(
        sparsity=args.sparsity or None, dense=not args.sparsity,
        context=ContextSettings(rope_scaling="longrope"),
    ))  # fmt: skip
    context, scaling = engine.context, engine.context.plan.scaling
    shipped = scaling.factors
    factors = ([float(f) for f in args.attention_factors.split(",")] if args.attention_factors
               else [FITTED_ATTENTION_FACTOR, 0.1 * math.log(scaling.factor) + 1])  # fmt: skip
    cases = [case.split(":", 1) for case in args.cases.split(",")]
    books = pathlib.Path(args.books)
    texts = {book: read_document(str(books / f"{book}.txt")).text for book, _ in cases}
    held_out = []
    if args.windows:
        # Dense and unhooked, as benchmarks/fit_rope_factors.py measures: a model of its own.
        plain = plain_model()
        held_out, _ = token_windows(engine.tokenizer, [str(books / "pg2641.txt")], LONG,
                                    args.windows, 0)  # fmt: skip
    header = "| attention factor | answered | answers | held-out tail perplexity |"
    print(f"{header}\n|---|---|---|---|")
    if held_out:
        base_inv_freq = plain.model.rotary_emb.inv_freq.clone()
        native = perplexity(plain, plain.model.rotary_emb, held_out, NATIVE)
        print(f"| native, last {NATIVE} tokens | — | — | {native:.3f} |", flush=True)
    for attention in factors:
        context.rescale(replace(scaling, factors=replace(shipped, attention_factor=attention)))
        answers = []
        for book, instruction in cases:
            ids = build_prompt(
                engine.tokenizer, document=texts[book], instruction=instruction, system=None,
                max_prompt_tokens=LONG - args.max_tokens, truncate="end",
            ).ids  # fmt: skip
            started = time.perf_counter()
            result = engine.generate(ids, SamplingOptions(max_tokens=args.max_tokens))
            answers.append(result.stats.predicted_n > 0)
            seconds = time.perf_counter() - started
            print(f"{attention:g} {book} {instruction!r}: {result.stats.predicted_n} tokens "
                  f"{result.text!r} ({seconds:.0f} s)", file=sys.stderr)  # fmt: skip
        value = "—"
        if held_out:
            rope = FittedRope(base_inv_freq, torch.tensor(shipped.long_factor), attention)
            extended = perplexity(plain, rope, held_out)
            value = f"{extended:.3f} ({100 * (extended / native - 1):+.1f} %)"
        print(f"| {attention:g} | {sum(answers)}/{len(answers)} | "
              f"{', '.join(str(a) for a in answers)} | {value} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
