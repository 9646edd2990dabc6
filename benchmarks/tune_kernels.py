"""Tune the autotuned Triton kernels on this GPU for every length bucket, and write the table
that ships in ``kernels/tuned/`` so a user's first run sits through no sweep.

Shapes: Llama-3.1-8B attention (32 Q / 8 KV heads, head_dim 128) and the bundled model's (9 Q /
3 KV heads, head_dim 64); bfloat16 and float16; block-sparse attention at sparsity 0.9 from 1k to
256k tokens, pooled attention (the distillation harvest) to 32k.

    python benchmarks/tune_kernels.py --out kernels/tuned
    python benchmarks/tune_kernels.py --out kernels/tuned --shapes smollm2-135m

With ``--shapes``, only those shapes' entries are measured again; the table's other entries
are kept as they are.
"""

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

SHAPES = {"llama-3.1-8b": (32, 8, 128), "smollm2-135m": (9, 3, 64)}
SPARSE_LENGTHS = [2**n for n in range(10, 19)]
POOLED_LENGTHS = [2**n for n in range(10, 16)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("kernels/tuned"))
    parser.add_argument(
        "--shapes", nargs="+", choices=sorted(SHAPES), default=sorted(SHAPES),
        help="shapes to measure again (default: all, a new table)",
    )  # fmt: skip
    args = parser.parse_args()
    os.environ["SEER_CACHE_DIR"] = cache = tempfile.mkdtemp()  # before the kernels read it

    from seer_gates import MaskPolicy, select_block_lists
    from seer_kernels import block_sparse_attention_from_lists, pooled_attention, tuning

    tuning.ignore_shipped_tables()
    device = torch.device("cuda")
    started = time.perf_counter()
    for dtype in (torch.bfloat16, torch.float16):
        for name in args.shapes:
            hq, hkv, d = SHAPES[name]
            for length in SPARSE_LENGTHS:
                q = torch.randn(1, hq, length, d, device=device, dtype=dtype)
                k, v = torch.randn(2, 1, hkv, length, d, device=device, dtype=dtype)
                nb = -(-length // 64)
                scores = torch.rand(1, hq, nb, nb, device=device)
                indices, counts = select_block_lists(scores, MaskPolicy(sparsity=0.9))
                del scores
                block_sparse_attention_from_lists(q, k, v, indices, counts)
                if length in POOLED_LENGTHS:
                    pooled_attention(q, k, v)
                torch.cuda.synchronize()
                print(f"{name} {dtype} {length}: {time.perf_counter() - started:.0f} s", flush=True)
                del q, k, v, indices, counts
                torch.cuda.empty_cache()
    slug = tuning.gpu_slug(device)
    table = args.out / f"{slug}.json"
    measured = json.loads((Path(cache) / "tuning" / f"{slug}.json").read_text())
    partial = set(args.shapes) != set(SHAPES) and table.is_file()
    kept = json.loads(table.read_text()) if partial else {}
    args.out.mkdir(parents=True, exist_ok=True)
    table.write_text(json.dumps({**kept, **measured}, indent=1, sort_keys=True))
    print(f"wrote {table}: {len(measured)} entries measured, {len(kept)} kept", flush=True)


if __name__ == "__main__":
    main()
