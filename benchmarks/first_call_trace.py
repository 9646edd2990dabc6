"""Where the first sparse prefill of a fresh process spends the time a warm one does not, and
where a warm one spends its host time.

Builds the profiled model (random weights and gates of a shipped config), runs one dense
prefill first (as ``seer profile prefill`` does, so the GPU libraries are initialised), then
the first sparse prefill and a warm one, each under cProfile, then warm ones untraced. Prints
the times and, for each traced call, the functions that took longest by cumulative time. Run
it twice with the same ``TRITON_CACHE_DIR`` and ``SEER_CACHE_DIR`` to trace a later process
(caches filled).

    python benchmarks/first_call_trace.py --config llama-3.1-8b -l 32768 -s 0.9
"""

import argparse
import cProfile
import io
import pstats
import time

import torch
from seer_gates import MaskPolicy

from seer_cli.engine.attention import ATTENTION_NAME, SparsePrefill
from seer_cli.engine.generation import default_ubatch_size, prefill
from seer_cli.measure.prefill_profile import random_subject
from seer_cli.measure.settings import load_config, profile_device


def timed_prefill(model, ids, ubatch_size: int) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    prefill(model, ids, ubatch_size=ubatch_size)
    torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="llama-3.1-8b")
    parser.add_argument("-l", "--length", type=int, default=32768)
    parser.add_argument("-s", "--sparsity", type=float, default=0.9)
    parser.add_argument(
        "-ub", "--ubatch-size", type=int, default=None, help="default: as seer generate"
    )
    parser.add_argument("--top", type=int, default=30, help="functions to list")
    args = parser.parse_args()
    if args.ubatch_size is None:
        args.ubatch_size = default_ubatch_size(args.length, sparse=True)

    device = profile_device("auto")
    if device.type != "cuda":
        raise SystemExit("first_call_trace.py times GPU prefill: no CUDA device is visible.")
    name, config = load_config(args.config)
    subject = random_subject(name, config, "auto", device)
    model = subject.model
    ids = torch.randint(model.config.vocab_size, (1, args.length), device=device)

    model.set_attn_implementation(ATTENTION_NAME)
    dense_first = timed_prefill(model, ids, 0)
    dense_warm = timed_prefill(model, ids, 0)

    SparsePrefill(model, MaskPolicy(sparsity=args.sparsity), subject.gates, min_tokens=0)
    first_trace, sparse_first = traced(lambda: timed_prefill(model, ids, args.ubatch_size))
    warm_trace, _ = traced(lambda: timed_prefill(model, ids, args.ubatch_size))
    sparse_warm = min(timed_prefill(model, ids, args.ubatch_size) for _ in range(2))

    print(f"{args.config}, {args.length} tokens, ubatch {args.ubatch_size}, {device}")
    print(f"dense: first {dense_first:.0f} ms, warm {dense_warm:.0f} ms")
    print(
        f"sparse {args.sparsity}: first {sparse_first:.0f} ms (under cProfile), "
        f"warm {sparse_warm:.0f} ms"
    )
    for title, trace in (("first sparse prefill", first_trace), ("a warm one", warm_trace)):
        text = io.StringIO()
        pstats.Stats(trace, stream=text).sort_stats("cumulative").print_stats(args.top)
        print(f"\n## {title}\n{text.getvalue()}")


def traced(call):
    """(cProfile.Profile, the call's result) of one call."""
    profiler = cProfile.Profile()
    profiler.enable()
    result = call()
    profiler.disable()
    return profiler, result


if __name__ == "__main__":
    main()
