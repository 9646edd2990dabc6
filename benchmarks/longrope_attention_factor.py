"""Which attention factor should the default model's LongRoPE factors carry?

The fit (``benchmarks/fit_rope_factors.py``) lowered the attention factor to 1.076, and under it
the default model often ended its turn at once after a long document; YaRN's, 0.1·ln(scale) + 1
= 1.1386, brings the answers back at a cost in perplexity (EVAL.md). For each attention factor
of ``--attention-factors`` (default: a sweep between the two), with the shipped per-frequency
factors unchanged, on the engine's device:

- answers: ``answers_at_length.answers`` at 32768 tokens for each novel in ``--books`` and each
  of its three instructions, ``--max-tokens`` tokens at ``--sparsity`` with ``--gates auto``
  (``--sparsity 0`` for dense), as ``seer generate`` runs;
- perplexity (``--windows`` > 0): ``seer eval``'s tail perplexity (last 4096 predictions) of the
  first ``--windows`` 32768-token windows of the held-out novel pg2641, dense and with the
  shipped 32k gates and the window they name at each of ``--eval-sparsities``, against the
  native model reading only each window's last 8192 tokens (the first row). About a second a
  window on an H100, minutes on a CPU.

    python benchmarks/longrope_attention_factor.py --books ../shared/data/books --windows 3
"""

import argparse
import pathlib
import sys
from dataclasses import replace

from answers_at_length import answers

from seer_cli.engine.context import ContextSettings, ModelContext
from seer_cli.engine.data import token_windows
from seer_cli.engine.models import load_model, resolve_model
from seer_cli.engine.prompt import read_document
from seer_cli.engine.runtime import Engine, EngineOptions, load_model_gates, resolve_gate_path
from seer_cli.measure.evaluation import Evaluation, kernels_for
from seer_cli.progress import quiet_libraries

LONG, TAIL = 32768, 4096
FACTORS = "1.076,1.09,1.10,1.11,1.12,1.1386"
SETTINGS = ContextSettings(LONG, rope_scaling="longrope")


def held_out_evaluation(engine: Engine, model_arg, books: pathlib.Path, windows: int):
    """``seer eval``'s evaluation of pg2641 on a model of its own (unhooked, as ``seer eval``
    loads it) with the shipped gates for prompts past the native context, and their window."""
    source = resolve_model(model_arg)
    device, dtype = engine.model.device, engine.model.dtype
    model, tokenizer = load_model(source, device, dtype)
    context = ModelContext(model, source.name, SETTINGS)
    path = resolve_gate_path("auto", model, source.name, rope_scaling="longrope")
    config, gates = load_model_gates(path, model, source.name, device)
    held_out, _ = token_windows(tokenizer, [str(books / "pg2641.txt")], LONG, windows, 0)
    return Evaluation(model, tokenizer, gates, held_out, context, TAIL), config.local_blocks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="as seer's --model (default: the bundled model)")
    parser.add_argument("--books", default="../shared/data/books")
    parser.add_argument("--attention-factors", default=FACTORS, help="comma-separated")
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--windows", type=int, default=0)
    parser.add_argument("--eval-sparsities", default="0.9,0.95")
    args = parser.parse_args()
    quiet_libraries()
    engine = Engine.load(EngineOptions(
        model=args.model, sparsity=args.sparsity or None, dense=not args.sparsity,
        context=SETTINGS,
    ))  # fmt: skip
    scaling = engine.context.plan.scaling
    books = pathlib.Path(args.books)
    texts = {path.stem: read_document(str(path)).text for path in sorted(books.glob("*.txt"))}
    sparsities = [float(s) for s in args.eval_sparsities.split(",")]
    evaluation = None
    header = ["attention factor", "answered", "no answer"]
    if args.windows:
        evaluation, local = held_out_evaluation(engine, args.model, books, args.windows)
        header += ["dense", *(f"gates + local {local}, s = {s}" for s in sparsities)]
    print(f"| {' | '.join(header)} |\n|{'---|' * len(header)}", flush=True)
    with kernels_for(engine.model.dtype, engine.model.device):
        if evaluation:
            native = evaluation.context_baseline()[0].perplexity
            blanks = " — |" * len(sparsities)
            print(f"| native, last 8192 tokens | — | — | {native:.3f} |{blanks}", flush=True)
        for factor in [float(f) for f in args.attention_factors.split(",")]:
            rescaled = replace(scaling, factors=replace(scaling.factors, attention_factor=factor))
            engine.context.rescale(rescaled)
            records = list(answers(engine, texts, [LONG], args.max_tokens))
            for record in records:
                print(f"{factor:g} {record['book']} {record['instruction']!r}: "
                      f"{record['predicted_n']} tokens {record['text']!r}",
                      file=sys.stderr)  # fmt: skip
            empty = [f"{r['book']} {r['instruction']!r}" for r in records if not r["predicted_n"]]
            cells = [f"{factor:g}", f"{len(records) - len(empty)}/{len(records)}",
                     ", ".join(empty) or "—"]  # fmt: skip
            if evaluation:
                evaluation.context.rescale(rescaled)
                rows = evaluation.perplexity(sparsities, [], local_blocks=(local,),
                                             estimators=("gates",))  # fmt: skip
                dense = rows[0].perplexity
                cells.append(f"{dense:.3f} ({100 * (dense / native - 1):+.1f} %)")
                cells += [f"{row.perplexity:.3f} ({row.delta_percent:+.1f} %), "
                          f"{row.achieved_sparsity:.3f}" for row in rows[1:]]  # fmt: skip
            print(f"| {' | '.join(cells)} |", flush=True)


if __name__ == "__main__":
    main()
