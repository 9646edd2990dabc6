"""CPU sparse prefill against dense attention: one layer, then the whole bundled model.

    python benchmarks/bench_cpu.py [--layer-lengths 8192,32768] [--ttft-lengths 8192,32768]

Layer table: one attention layer of the bundled model's shapes (9 query / 3 key-value heads,
d 64, float32) with the blocks a top-k policy at sparsity 0.9 keeps from random scores (the
diagonal, the sink and the dense last row included): dense SDPA, seer's PyTorch reference,
PyTorch FlexAttention compiled on the same blocks, and seer's CPU kernel. Each runs in fresh
processes: the first call on a new machine (empty caches: the kernel's build, inductor's
compile), the first call of a later process, and the warm median. Then one layer's gate
scoring and selection.

TTFT table: ``seer generate --json`` with the bundled model, ``--sparsity 0.9`` against
``--dense``, each run a new process; the sparse runs start on an empty kernel cache.
Timings on a shared CPU are noisy: run it on a quiet machine.
"""

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HEADS, KV_HEADS, HEAD_DIM, SPARSITY = 9, 3, 64, 0.9
METHODS = ("sdpa", "reference", "flex", "seer-cpu")
CACHED = ("flex", "seer-cpu")  # what a first call on a new machine builds or compiles
BOOK = Path(__file__).resolve().parents[1] / "tests" / "data" / "a-room-with-a-view.txt"


# --- one layer, measured inside a worker process ---


def layer_inputs(length: int):
    """q, k, v and the kept-block lists of one layer at ``length`` tokens."""
    import torch
    from seer_gates import MaskPolicy, select_block_lists

    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, HEADS, length, HEAD_DIM, generator=gen)
    k, v = (torch.randn(1, KV_HEADS, length, HEAD_DIM, generator=gen) for _ in range(2))
    nb = -(-length // 64)
    scores = torch.rand(1, HEADS, nb, nb, generator=gen)
    indices, counts = select_block_lists(scores, MaskPolicy(sparsity=SPARSITY), nb)
    return q, k, v, indices, counts.contiguous()


def flex_attention_fn(q, k, v, indices, counts):
    """FlexAttention on the same blocks: the diagonal a causal partial block, the kept ones
    full blocks; compiled with dynamic shapes."""
    import torch
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    b, h, nb, width = indices.shape
    s = q.shape[2]
    full = torch.zeros(b, h, nb, nb, dtype=torch.int32)
    full[..., :width] = indices
    diagonal = torch.zeros(b, h, nb, nb, dtype=torch.int32)
    diagonal[..., 0] = torch.arange(nb, dtype=torch.int32)
    mask = BlockMask.from_kv_blocks(
        torch.ones(b, h, nb, dtype=torch.int32), diagonal, counts, full, 64,
        lambda b, h, q_idx, kv_idx: q_idx >= kv_idx, seq_lengths=(s, s), compute_q_blocks=False,
    )  # fmt: skip
    compiled = torch.compile(flex_attention, dynamic=True)
    return lambda: compiled(q, k, v, block_mask=mask, enable_gqa=True)


def layer_worker(method: str, length: int, repeats: int) -> dict:
    import torch.nn.functional as F
    from seer_kernels import block_sparse_attention_cpu, block_sparse_attention_reference
    from seer_kernels.block_sparse_cpu import block_mask_from_lists

    q, k, v, indices, counts = layer_inputs(length)
    if method == "sdpa":
        run = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    elif method == "reference":
        mask = block_mask_from_lists(indices, counts, length)
        run = lambda: block_sparse_attention_reference(q, k, v, mask)
    elif method == "flex":
        run = flex_attention_fn(q, k, v, indices, counts)
    else:
        run = lambda: block_sparse_attention_cpu(q, k, v, indices, counts)
    start = time.perf_counter()
    run()
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    kept = int(counts.sum()) + counts.numel()
    causal = HEADS * counts.shape[-1] * (counts.shape[-1] + 1) // 2
    warm = statistics.median(times or [first])
    return {"first_s": first, "warm_s": warm, "sparsity": 1 - kept / causal}


def gate_worker(length: int, repeats: int) -> dict:
    """One layer's gate scoring and top-k selection, as the CPU prefill runs them."""
    import torch
    from seer_gates import (
        AttnGate,
        MaskPolicy,
        block_rope_tables,
        default_rotary,
        pool_queries,
        select_block_lists,
    )
    from seer_gates.pooled_keys import PooledKeys

    gen = torch.Generator().manual_seed(1)
    q = torch.randn(1, length, HEADS, HEAD_DIM, generator=gen)
    k = torch.randn(1, length, KV_HEADS, HEAD_DIM, generator=gen)
    gate = AttnGate(HEADS, KV_HEADS, HEAD_DIM, 128).eval()
    nb = -(-length // 64)
    cos, sin = block_rope_tables(default_rotary(128), nb, 64, 1)
    policy = MaskPolicy(sparsity=SPARSITY)

    def run():
        with torch.no_grad():
            logits = gate.logits(pool_queries(q), PooledKeys().extend(k), cos, sin)
            return select_block_lists(logits.softmax(-1), policy, nb)

    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return {"warm_s": statistics.median(times)}


def in_worker(env: dict, *args: str) -> dict:
    """Run this script's worker mode in a new process; its JSON answer."""
    command = [sys.executable, __file__, "--worker", *args]
    result = subprocess.run(command, env={**os.environ, **env}, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"worker {args} failed:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def layer_table(lengths: list[int], repeats: int) -> list[str]:
    rows = [
        "| tokens | attention | first call, new machine (s) | first call, later process (s) "
        "| warm (s) | × SDPA |",
        "|---|---|---|---|---|---|",
    ]
    for length in lengths:
        results = {}
        for method in METHODS:
            with tempfile.TemporaryDirectory() as cache:
                # Empty caches: a new machine builds the kernel / compiles the graph.
                env = {"SEER_CACHE_DIR": cache, "TORCHINDUCTOR_CACHE_DIR": cache}
                new = in_worker(env, "layer", method, str(length), str(repeats))
                later = (
                    in_worker(env, "layer", method, str(length), "0") if method in CACHED else None
                )
            results[method] = (new, later)
        dense = results["sdpa"][0]["warm_s"]
        for method, (new, later) in results.items():
            again = f"{later['first_s']:.2f}" if later else "-"
            rows.append(
                f"| {length} | {method} | {new['first_s']:.2f} | {again} "
                f"| {new['warm_s']:.3f} | {dense / new['warm_s']:.2f} |"
            )
        gates = in_worker({}, "gates", str(length), str(repeats))["warm_s"]
        sparsity = results["seer-cpu"][0]["sparsity"]
        rows.append(
            f"| {length} | gate scoring + selection (sparsity {sparsity:.3f}) | | | {gates:.3f} | |"
        )
    return rows


# --- whole model, through the command line ---


def seer_generate(document: Path, ctx: int, flags: list[str], cache: str | None) -> dict:
    seer = Path(sys.executable).with_name("seer")
    command = [
        str(seer) if seer.exists() else "seer", "generate", "-f", str(document),
        "-p", "Summarise this.", "-n", "1", "--json", "--device", "cpu",
        "--truncate", "end", "--ctx-size", str(ctx), *flags,
    ]  # fmt: skip
    env = {**os.environ, **({"SEER_CACHE_DIR": cache} if cache else {})}
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"seer generate {flags} failed:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout)


def ttft_table(lengths: list[int]) -> list[str]:
    from seer_kernels.tuning import seer_cache_dir

    rows = [
        "| context | prefill | run | prompt tokens | TTFT (s) | × dense | peak memory (GB) "
        "| sparsity |",
        "|---|---|---|---|---|---|---|---|",
    ]
    with tempfile.TemporaryDirectory() as scratch:
        document = Path(scratch) / "book.txt"
        document.write_text("\n\n".join([BOOK.read_text(encoding="utf-8")] * 2))
        # A new machine's cache, but with the converted model already in: only the kernel is new.
        fresh = Path(scratch) / "cache"
        fresh.mkdir()
        (fresh / "models").symlink_to(seer_cache_dir() / "models")
        for ctx in lengths:
            # Dense and sparse in turns, so a change of load on the machine hits both alike.
            for run in ("1st (sparse: kernel built)", "2nd"):
                dense = seer_generate(document, ctx, ["--dense"], None)
                sparse = seer_generate(document, ctx, ["--sparsity", str(SPARSITY)], str(fresh))
                for name, stats in (("dense", dense), (f"sparsity {SPARSITY}", sparse)):
                    ttft = stats["ttft_ms"] / 1000
                    sparsity = stats.get("sparsity")
                    rows.append(
                        f"| {ctx} | {name} | {run} | {stats['prompt_n']} | {ttft:.2f} "
                        f"| {dense['ttft_ms'] / stats['ttft_ms']:.2f} "
                        f"| {stats['peak_memory_gb']:.2f} "
                        f"| {'-' if sparsity is None else f'{sparsity:.3f}'} |"
                    )
            shutil.rmtree(fresh / "kernels", ignore_errors=True)
    return rows


def machine() -> str:
    model = next(
        (line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
         if line.startswith("model name")), platform.processor(),
    )  # fmt: skip
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
        cwd=Path(__file__).parent,
    ).stdout.strip()  # fmt: skip
    return f"{model}, {os.cpu_count()} cores, {datetime.date.today()}, commit {commit or '?'}"


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        kind, *rest = sys.argv[2:]
        if kind == "layer":
            result = layer_worker(rest[0], int(rest[1]), int(rest[2]))
        else:
            result = gate_worker(int(rest[0]), int(rest[1]))
        print(json.dumps(result))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layer-lengths", default="8192,32768")
    parser.add_argument("--ttft-lengths", default="8192,32768")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    split = lambda text: [int(x) for x in text.split(",") if x]
    print(f"CPU: {machine()}", flush=True)
    rows = layer_table(split(args.layer_lengths), args.repeats)
    print("\nOne layer, float32, 9 query / 3 key-value heads, d 64, sparsity 0.9:\n")
    print("\n".join(rows), flush=True)
    rows = ttft_table(split(args.ttft_lengths))
    print(f"\nWhole model (bundled), `seer generate --json`, sparsity {SPARSITY} vs dense:\n")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
