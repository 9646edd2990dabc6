"""Gate scoring + block selection per layer on a GPU: the PyTorch path against the fused kernels.

One layer's pre-RoPE queries and keys (bf16, batch 1, random), a random-weight gate and the
policy's top-k budget per row (or threshold, or budget per layer), at the shapes of
Llama-3.1-8B (32 query / 8 key-value heads, head_dim 128, gate hidden 128: the published rule,
no query linear) and of the bundled SmolLM2-135M (9 / 3 heads, head_dim 64, gate hidden 128
with a query linear). Rows:

- ``pytorch``: ``AttnGate`` logits then ``select_block_lists`` (top-k) or ``select_blocks``
  (threshold, layer budget) — the path before the fused kernels;
- ``fused``: ``gate_block_lists`` from raw keys (two launches; a layer budget three and a
  top-k);
- ``fused, pooled keys``: keys pooled by ``PooledKeys`` (kept for chunked prefill) and then the
  fused kernels;
- ``from RoPE pools``: the engine's path on a GPU since the RoPE pass pools the blocks
  (``rotary_embedding_pooled``): the fused kernels on pooled queries and keys; ``RoPE +`` what
  pooling adds to that layer's RoPE pass of q and k (pooled pass minus plain pass), and
  ``sum`` the two: what gate scoring and selection cost a layer on this path.

First checks that the fused lists keep the PyTorch path's blocks, then times with
``triton.testing.do_bench`` (median, L2 flushed) and prints a markdown table last.

    python benchmarks/bench_gates.py [--lengths 32768 131072] [--sweep] [--out bench.md]
"""

import argparse
import datetime
import os
import subprocess

import torch
from seer_gates import (
    AttnGate,
    MaskPolicy,
    block_rope_tables,
    default_rotary,
    gate_block_lists,
    pool_keys,
    pool_queries,
    select_block_lists,
    select_blocks,
)
from seer_gates.pooled_keys import PooledKeys
from seer_kernels import (
    gate_block_features,
    gate_features,
    gate_select,
    num_blocks,
    rotary_embedding,
    rotary_embedding_pooled,
)
from triton.testing import do_bench

# name: (query heads, key/value heads, head_dim, gate hidden)
SHAPES = {"llama-3.1-8b": (32, 8, 128, 128), "smollm2-135m": (9, 3, 64, 128)}
POLICIES = {
    "top-k 0.9": MaskPolicy(sparsity=0.9),
    "threshold 1": MaskPolicy(threshold=1.0),
    "layer 0.9": MaskPolicy(sparsity=0.9, budget="layer"),
}
# Launch settings tried by --sweep: (module attribute, value).
SWEEP = [
    (gate_features, "FEATURE_WARPS", 8),
    (gate_features, "FEATURE_STAGES", 3),
    (gate_select, "SELECT_WARPS", 2),
    (gate_select, "SELECT_WARPS", 8),
    (gate_select, "SELECT_STAGES", 3),
    (gate_select, "KEY_COLUMNS", 32),
    (gate_select, "KEY_COLUMNS", 128),
    (gate_select, "SELECT_ELEMENTS", 1024),
    (gate_select, "SELECT_ELEMENTS", 4096),
    (gate_select, "SELECT_WIDTHS", 3),
    (gate_select, "SELECT_WIDTHS", 1),
    (gate_select, "_program_slots", 1),
    (gate_select, "_program_slots", 4),
]


def layer_inputs(shape, length: int):
    hq, hkv, d, h = shape
    torch.manual_seed(0)
    gate = AttnGate(hq, hkv, d, h).cuda()
    q = torch.randn(1, length, hq, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, length, hkv, d, device="cuda", dtype=torch.bfloat16)
    cos, sin = block_rope_tables(default_rotary(h), num_blocks(length), 64, 1, "cuda")
    return gate, q, k, cos, sin


def row_budgets(policy: MaskPolicy) -> bool:
    return policy.sparsity is not None and policy.budget == "row"


def pytorch_path(gate, q, k, cos, sin, policy):
    """Row budgets straight to lists; a threshold or a layer budget to a mask of probabilities."""
    with torch.no_grad():
        if row_budgets(policy):
            return select_block_lists(gate(q, k, cos, sin, probabilities=False), policy)
        return select_blocks(gate(q, k, cos, sin), policy)


def engine_path(gate, q, k, cos, sin, policy):
    pooled = PooledKeys().extend(k)
    return gate_block_lists(gate, q, pooled, cos, sin, policy, key_tokens=k.shape[1])


def rope_pass_extra_ms(q, k) -> float:
    """What pooling adds to one layer's RoPE pass: q [b, s, Hq, d] and k seen heads-first, as the
    attention layers hand them over, with full-width bf16 tables."""
    q, k = q.transpose(1, 2), k.transpose(1, 2)
    s, d = q.shape[2], q.shape[3]
    angles = torch.arange(s, device=q.device)[:, None] / 10000 ** (
        torch.arange(0, d, 2, device=q.device) / d
    )
    angles = torch.cat([angles, angles], dim=-1)[None]
    cos, sin = angles.cos().to(q.dtype), angles.sin().to(q.dtype)
    plain = median_ms(lambda: (rotary_embedding(q, cos, sin), rotary_embedding(k, cos, sin)))
    pooled = median_ms(
        lambda: (
            rotary_embedding_pooled(q, cos, sin, keys=False),
            rotary_embedding_pooled(k, cos, sin, keys=True),
        )
    )
    return pooled - plain


def lists_to_mask(indices, counts):
    b, h, n, width = indices.shape
    listed = torch.arange(width, device=indices.device) < counts[..., None].long()
    mask = torch.zeros(b, h, n, n + 1, dtype=torch.bool, device=indices.device)
    mask.scatter_(-1, torch.where(listed, indices.long(), n), True)
    return mask[..., :n] | torch.eye(n, dtype=torch.bool, device=indices.device)


def from_rope_pools(gate, pools, cos, sin, policy):
    q_pooled, k_pooled, tokens = pools
    return gate_block_lists(gate, q_pooled, k_pooled, cos, sin, policy, key_tokens=tokens,
                            query_tokens=tokens)  # fmt: skip


def differing_blocks(gate, q, k, cos, sin, policy, pools) -> str:
    """Blocks kept by the fused path (raw inputs, then RoPE pools) and not the PyTorch path or
    the other way round, over the blocks the PyTorch path keeps."""
    expected = pytorch_path(gate, q, k, cos, sin, policy)
    if row_budgets(policy):
        expected = lists_to_mask(*expected)
    fused = lists_to_mask(*gate_block_lists(gate, q, k, cos, sin, policy))
    pooled = lists_to_mask(*from_rope_pools(gate, pools, cos, sin, policy))
    return (f"{int((fused != expected).sum())}, {int((pooled != expected).sum())} / "
            f"{int(expected.sum())}")  # fmt: skip


def median_ms(fn) -> float:
    return do_bench(fn, warmup=25, rep=200, return_mode="median")


def timed_row(
    shape_name: str, length: int, inputs, policy_name: str, rope_extra: float
) -> tuple[str, float]:
    """One table row: the paths checked against each other, then timed; and the fused ms."""
    gate, q, k, cos, sin = inputs
    policy = POLICIES[policy_name]
    pools = (pool_queries(q), pool_keys(k), length)
    differing = differing_blocks(gate, q, k, cos, sin, policy, pools)
    old = median_ms(lambda: pytorch_path(gate, q, k, cos, sin, policy))
    fused = median_ms(lambda: gate_block_lists(gate, q, k, cos, sin, policy))
    pooled_keys = median_ms(lambda: engine_path(gate, q, k, cos, sin, policy))
    from_pools = median_ms(lambda: from_rope_pools(gate, pools, cos, sin, policy))
    weight_q = gate.mask_linear_q.weight if gate.mask_linear_q is not None else None
    features = median_ms(
        lambda: gate_block_features(q, k, gate.mask_linear_k.weight, cos, sin, weight_q)
    )
    cells = [shape_name, length, policy_name, f"{old:.3f}", f"{fused:.3f}", f"{pooled_keys:.3f}",
             f"{from_pools:.3f}", f"{rope_extra:.3f}", f"**{from_pools + rope_extra:.3f}**",
             f"{features:.3f}", f"{fused - features:.3f}", differing]  # fmt: skip
    return "| " + " | ".join(str(cell) for cell in cells) + " |", fused


def sweep_rows(length: int, default_ms: float) -> list[str]:
    """The fused path on the 8B shape (top-k 0.9) under other launch settings."""
    gate, q, k, cos, sin = layer_inputs(SHAPES["llama-3.1-8b"], length)
    policy = POLICIES["top-k 0.9"]
    sm_count = torch.cuda.get_device_properties(q.device).multi_processor_count
    rows = []
    for module, attribute, value in SWEEP:
        saved = getattr(module, attribute)
        # _program_slots: programs per SM of the persistent selection kernel.
        per_sm = attribute == "_program_slots"
        setting = (lambda device, n=value: sm_count * n) if per_sm else value
        setattr(module, attribute, setting)
        try:
            ms = median_ms(lambda: gate_block_lists(gate, q, k, cos, sin, policy))
        finally:
            setattr(module, attribute, saved)
        label = f"{attribute} = {value}{' per SM' if per_sm else ''}"
        rows.append(f"| llama-3.1-8b | {length} | {label} | {ms:.3f} | {default_ms:.3f} |")
        print(rows[-1], flush=True)
    # Where the features launch spends its time: key pooling is what pooled keys skip.
    pooled = pool_keys(k)
    for label, keys, pooled_input in (
        ("features launch", k, False),
        ("features launch, keys pooled already", pooled, True),
    ):
        ms = median_ms(
            lambda keys=keys, pooled_input=pooled_input: gate_block_features(
                q, keys, gate.mask_linear_k.weight, cos, sin, keys_pooled=pooled_input
            )
        )
        rows.append(f"| llama-3.1-8b | {length} | {label} | {ms:.3f} | |")
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[32768, 131072])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--sweep", action="store_true", help="also try other launch settings")
    parser.add_argument("--out", help="also write the markdown table here")
    args = parser.parse_args()

    commit = (
        os.environ.get("SEER_COMMIT")
        or subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
    )
    title = (f"{torch.cuda.get_device_name()}, {datetime.date.today()}, commit {commit or '?'}, "
             f"torch {torch.__version__}, bf16, batch 1, ms per layer (median)")  # fmt: skip
    print(title, flush=True)
    lines = ["| shape | length | policy | pytorch | fused | fused, pooled keys | from RoPE pools "
             "| RoPE + | sum | features | selection | differing (fused, pools) / kept blocks |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    defaults = {}
    for shape_name in args.shapes:
        for length in args.lengths:
            inputs = layer_inputs(SHAPES[shape_name], length)
            rope_extra = rope_pass_extra_ms(inputs[1], inputs[2])
            for policy_name in POLICIES:
                row, fused = timed_row(shape_name, length, inputs, policy_name, rope_extra)
                defaults[(shape_name, length, policy_name)] = fused
                lines.append(row)
                print(row, flush=True)
            del inputs
            torch.cuda.empty_cache()
    sweep = []
    if args.sweep:
        sweep = [
            "\nLaunch settings (fused, llama-3.1-8b, top-k 0.9):\n",
            "| shape | length | setting | ms | default ms |",
            "|---|---|---|---|---|",
        ]
        for length in args.lengths:
            if ("llama-3.1-8b", length, "top-k 0.9") in defaults:
                sweep += sweep_rows(length, defaults[("llama-3.1-8b", length, "top-k 0.9")])
    table = "\n".join([title, "", *lines, *sweep])
    if args.out:
        with open(args.out, "w") as f:
            f.write(table + "\n")
    print("\n" + table)


if __name__ == "__main__":
    main()
