"""Time to first token of the default model: dense vs sparse prefill, and greedy equivalence.

    python benchmarks/bench_ttft.py --gates G.safetensors --file book.txt [--tokens 8192]

Prints a markdown table (TTFT median over repeats after warm-up) and whether greedy text with
--dense equals greedy text with --sparsity 0.
"""

import argparse
import datetime
import os
import statistics

import torch

from seer_cli.engine.generation import SamplingOptions
from seer_cli.engine.prompt import read_document
from seer_cli.engine.runtime import Engine, EngineOptions
from seer_cli.progress import quiet_libraries


def ttft_ms(engine: Engine, ids: list[int], repeats: int) -> tuple[float, float, float | None]:
    """(median TTFT ms, stdev, achieved sparsity) over ``repeats`` runs after two warm-ups."""
    runs = [engine.generate(ids, SamplingOptions(max_tokens=1)).stats for _ in range(repeats + 2)]
    times = [stats.ttft_ms for stats in runs[2:]]
    return statistics.median(times), statistics.stdev(times), runs[-1].sparsity


def greedy_text(engine: Engine, ids: list[int], tokens: int) -> str:
    return engine.generate(ids, SamplingOptions(max_tokens=tokens)).text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gates", required=True)
    parser.add_argument("--file", required=True)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    quiet_libraries()

    variants = {
        "dense": EngineOptions(dense=True),
        # Sparse at any length: this measures sparse prefill itself, below the crossover too.
        "sparsity 0 (gates)": EngineOptions(sparsity=0.0, gates=args.gates, sparse_min_tokens=0),
        "sparsity 0.5 (gates)": EngineOptions(sparsity=0.5, gates=args.gates, sparse_min_tokens=0),
        "sparsity 0.9 (gates)": EngineOptions(sparsity=0.9, gates=args.gates, sparse_min_tokens=0),
        "sparsity 0.9 (pooled)": EngineOptions(sparsity=0.9, gates="pooled", sparse_min_tokens=0),
    }
    rows, texts = [], {}
    for name, options in variants.items():
        engine = Engine.load(options)
        ids = engine.prompt(
            document=read_document(args.file).text,
            instruction="Summarise this.",
            max_tokens=40,
            truncate="end",
        ).ids
        ids = ids[-args.tokens :]
        median, spread, sparsity = ttft_ms(engine, ids, args.repeats)
        texts[name] = greedy_text(engine, ids, 40)
        rows.append((name, len(ids), median, spread, sparsity))
        del engine
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    commit = os.environ.get("SEER_COMMIT", "?")
    print(f"Device: {device}, date: {datetime.date.today()}, commit: {commit}")
    print("\n| prefill | prompt tokens | TTFT ms (median ± std) | achieved sparsity | × dense |")
    print("|---|---|---|---|---|")
    dense_ms = rows[0][2]
    for name, n, median, spread, sparsity in rows:
        shown = f"{sparsity:.3f}" if sparsity is not None else "-"
        print(f"| {name} | {n} | {median:.1f} ± {spread:.1f} | {shown} | {dense_ms / median:.2f} |")
    same = texts["dense"] == texts["sparsity 0 (gates)"]
    print(f"\nGreedy 40 tokens, --dense vs --sparsity 0: {'identical' if same else 'DIFFERENT'}")
    for name, text in texts.items():
        print(f"- {name}: {text[:160]!r}")


if __name__ == "__main__":
    main()
