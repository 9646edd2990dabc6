"""Block-sparse attention vs dense SDPA (flash and cuDNN backends) on a GPU.

Llama-3.1-8B attention shapes (32 query heads, 8 key/value heads, head_dim 128, bf16, batch 1),
random top-k block masks with the diagonal kept. Checks the kernel against the float32
reference first, then prints a markdown table (also written to --out).

    python benchmarks/bench_kernels.py [--lengths 8192 32768] [--out bench.md]
"""

import argparse
import datetime
import math
import os
import subprocess
from functools import partial

import torch
import torch.nn.functional as F
from seer_kernels import (
    BLOCK,
    block_sparse_attention,
    block_sparse_attention_from_lists,
    block_sparse_attention_reference,
    kept_block_indices,
    num_blocks,
)
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench

Q_HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128
SPARSITIES = (0.0, 0.5, 0.8, 0.9, 0.95)


def random_topk_mask(heads: int, seq_len: int, sparsity: float, device: str) -> torch.Tensor:
    """Row i keeps ceil((1 - s)(i + 1)) random causal blocks, its diagonal among them."""
    nb = num_blocks(seq_len)
    rows = torch.arange(nb, device=device)
    keep_count = torch.ceil((1 - sparsity) * (rows + 1)).long().clamp(min=1)
    scores = torch.rand(1, heads, nb, nb, device=device)
    scores = scores.masked_fill(rows[None, :] > rows[:, None], -1.0)
    scores[..., rows, rows] = 2.0
    order = scores.topk(int(keep_count.max()), dim=-1).indices
    chosen = torch.arange(order.shape[-1], device=device) < keep_count[:, None]
    mask = torch.zeros(1, heads, nb, nb, dtype=torch.bool, device=device)
    return mask.scatter_(-1, order, chosen.expand_as(order))


def median_ms(fn) -> float:
    return do_bench(fn, warmup=50, rep=300, return_mode="median")


def check(q, k, v, mask) -> float:
    """Relative error of the kernel vs the float32 reference on the first GQA group of heads."""
    group = Q_HEADS // KV_HEADS
    q, k, v, mask = q[:, :group], k[:, :1], v[:, :1], mask[:, :group]
    gold = block_sparse_attention_reference(q.float(), k.float(), v.float(), mask)
    out = block_sparse_attention(q, k, v, mask).float()
    assert not torch.isnan(out).any()
    return ((out - gold).norm() / gold.norm()).item()


def run(lengths: list[int]) -> list[str]:
    device = "cuda"
    header = (
        "| length | sparsity | achieved | sparse ms | kernel-only ms | mask→index ms "
        "| TFLOP/s (computed tiles) | SDPA-flash ms | cuDNN ms | × flash | × cuDNN "
        "| rel. err vs fp32 |"
    )
    lines = [header, "|" + "---|" * 12]
    for seq_len in lengths:
        gen = torch.Generator(device=device).manual_seed(seq_len)
        shape = (1, Q_HEADS, seq_len, HEAD_DIM)
        q = torch.randn(shape, device=device, dtype=torch.bfloat16, generator=gen)
        k = torch.randn(
            (1, KV_HEADS, seq_len, HEAD_DIM), device=device, dtype=torch.bfloat16, generator=gen
        )
        v = torch.randn_like(k)
        k_rep = k.repeat_interleave(Q_HEADS // KV_HEADS, 1)
        v_rep = v.repeat_interleave(Q_HEADS // KV_HEADS, 1)
        dense = {}
        for name, backend in (
            ("flash", SDPBackend.FLASH_ATTENTION),
            ("cudnn", SDPBackend.CUDNN_ATTENTION),
        ):
            with sdpa_kernel(backend):
                dense[name] = median_ms(
                    partial(F.scaled_dot_product_attention, q, k_rep, v_rep, is_causal=True)
                )
        del k_rep, v_rep
        nb = num_blocks(seq_len)
        causal_blocks = Q_HEADS * nb * (nb + 1) // 2
        for sparsity in SPARSITIES:
            mask = random_topk_mask(Q_HEADS, seq_len, sparsity, device)
            kept = int(mask.sum())
            err = check(q, k, v, mask) if sparsity >= 0.5 or seq_len <= 32768 else float("nan")
            total = median_ms(partial(block_sparse_attention, q, k, v, mask))
            indices, counts = kept_block_indices(mask)
            scale = 1 / math.sqrt(HEAD_DIM)
            kernel = median_ms(
                partial(block_sparse_attention_from_lists, q, k, v, indices, counts, scale)
            )
            listing = median_ms(partial(kept_block_indices, mask))
            tflops = kept * 4 * BLOCK * BLOCK * HEAD_DIM / (kernel * 1e-3) / 1e12
            lines.append(
                f"| {seq_len} | {sparsity:.2f} | {1 - kept / causal_blocks:.3f} | {total:.2f} "
                f"| {kernel:.2f} | {listing:.2f} | {tflops:.0f} "
                f"| {dense['flash']:.2f} | {dense['cudnn']:.2f} "
                f"| {dense['flash'] / total:.2f} | {dense['cudnn'] / total:.2f} | {err:.1e} |"
            )
            print(lines[-1], flush=True)
            del mask, indices, counts
        del q, k, v
        torch.cuda.empty_cache()
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768, 65536, 131072])
    parser.add_argument("--out", help="also write the markdown table here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_kernels needs a CUDA GPU.")
    commit = (
        os.environ.get("SEER_COMMIT")
        or subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
    )
    title = (
        f"Device: {torch.cuda.get_device_name()}, date: {datetime.date.today()}, "
        f"commit: {commit}, torch {torch.__version__}"
    )
    print(title, flush=True)
    lines = run(args.lengths)
    table = "\n".join([title, "", *lines])
    print("\n" + table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    main()
