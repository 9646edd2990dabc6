"""Does the model still answer an instruction after a long document, under each RoPE extension?

    python benchmarks/answers_at_length.py --books ../shared/data/books --lengths 16384,32768

Perplexity measures how well a scaled RoPE continues a book; a chat user needs more: after a
document of N tokens and an instruction, the model must start an answer rather than end its
turn at once. For each book, instruction, length (prompt plus answer room; ``--truncate end``
style: the document's first tokens) and RoPE extension (``--rope-scaling`` values), one greedy
``Engine.generate`` of ``--max-tokens`` tokens, dense and/or at each ``--sparsities`` value
with ``--gates auto``, as ``seer generate`` runs. Prints a markdown table: the
share of prompts answered (at least one token before the end of the turn) and the mean answer
length, per extension, length and sparsity; ``--json`` writes every answer.
"""

import argparse
import datetime
import json
import pathlib
import subprocess

from seer_cli.engine.context import ContextSettings
from seer_cli.engine.generation import SamplingOptions
from seer_cli.engine.prompt import build_prompt, read_document
from seer_cli.engine.runtime import Engine, EngineOptions
from seer_cli.progress import quiet_libraries

INSTRUCTIONS = ["Summarise this.", "Who are the main characters?", "What happens at the end?"]


def answers(engine: Engine, books: dict, lengths: list[int], max_tokens: int):
    """One record per book, instruction and length: the greedy answer and its token count."""
    for book, text in books.items():
        for instruction in INSTRUCTIONS:
            for length in lengths:
                ids = build_prompt(
                    engine.tokenizer, document=text, instruction=instruction, system=None,
                    max_prompt_tokens=length - max_tokens, truncate="end",
                ).ids  # fmt: skip
                result = engine.generate(ids, SamplingOptions(max_tokens=max_tokens))
                yield {
                    "book": book, "instruction": instruction, "length": length,
                    "prompt_n": len(ids), "predicted_n": result.stats.predicted_n,
                    "sparsity": result.stats.sparsity, "text": result.text,
                }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="as seer's --model (default: the bundled model)")
    parser.add_argument("--books", default="../shared/data/books")
    parser.add_argument("--lengths", default="16384,32768")
    parser.add_argument("--scalings", default="longrope,yarn")
    parser.add_argument("--sparsities", default="dense,0.9", help="'dense' or a top-k sparsity")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--json", help="write every answer here")
    args = parser.parse_args()
    quiet_libraries()
    lengths = [int(n) for n in args.lengths.split(",")]
    books = {
        path.stem: read_document(str(path)).text
        for path in sorted(pathlib.Path(args.books).glob("*.txt"))
    }
    policies = [None if s == "dense" else float(s) for s in args.sparsities.split(",")]
    records = []
    for scaling in args.scalings.split(","):
        for sparsity in policies:
            options = EngineOptions(
                model=args.model, sparsity=sparsity, dense=sparsity is None,
                context=ContextSettings(rope_scaling=scaling),
            )  # fmt: skip
            engine = Engine.load(options)
            for record in answers(engine, books, lengths, args.max_tokens):
                record.update(scaling=scaling, requested_sparsity=sparsity)
                records.append(record)
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    print(f"{datetime.date.today()}, commit {commit}, books {', '.join(books)}, "
          f"{len(INSTRUCTIONS)} instructions, greedy, {args.max_tokens} tokens\n")  # fmt: skip
    print("| RoPE | length | sparsity | answered | mean tokens |")
    print("|---|---:|---|---:|---:|")
    groups: dict = {}
    for record in records:
        key = (record["scaling"], record["length"], record["requested_sparsity"])
        groups.setdefault(key, []).append(record["predicted_n"])
    for (scaling, length, sparsity), counts in groups.items():
        answered = sum(n > 0 for n in counts)
        print(f"| {scaling} | {length} | {sparsity or 'dense'} | {answered}/{len(counts)} | "
              f"{sum(counts) / len(counts):.1f} |")  # fmt: skip
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(records, indent=1))


if __name__ == "__main__":
    main()
