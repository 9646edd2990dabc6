#!/usr/bin/env bash
# A model larger than one GPU: Llama-3.1-70B shapes with random weights (bfloat16, 141 GB) spread
# over two GPUs by `--device-map auto` (accelerate: layers 0-39 on one GPU, 40-79 on the other,
# each layer's gate beside it). `seer profile prefill` times the first token dense against
# sparsity 0.9 and reports each GPU's peak memory, at 65536 tokens and at 131072.
#
# Needs two GPUs of ~140 GB (2×H200): each holds ~71 GB of weights, plus at 131072 tokens ~22 GB
# of KV cache and ~25 GB of activations. Two 80 GB H100s cannot hold the weights and the cache.
# Run from the repository root; JSON and stderr of each length go to OUT (default ./out), a
# short table is printed last. Estimates from the 8B timings scaled by the model's FLOPs: a
# dense prefill takes ~25 s at 65536 and ~75 s at 131072 (a device map runs one GPU at a time),
# so each length, model creation included, fits one 10-minute call:
#
#   bash benchmarks/multi_gpu_70b.sh 65536      # 2 repeats, ~4 minutes
#   bash benchmarks/multi_gpu_70b.sh 131072     # 1 repeat, ~7 minutes
#   bash benchmarks/multi_gpu_70b.sh table      # the table of what has run
#
# UBATCH (default 8192, as seer generate) sets the prefill chunk sizes: UBATCH=0,8192 adds
# one-pass rows (twice the time: one length per call then needs REPEATS=1).
# CONFIG, DEVICE_MAP and DEVICE shrink it for a smoke test on the CPU, e.g. CONFIG=tiny.json
# DEVICE=cpu DEVICE_MAP='{"": "cpu"}' bash benchmarks/multi_gpu_70b.sh 256.
set -euo pipefail

OUT=${OUT:-$PWD/out}
CONFIG=${CONFIG:-llama-3.1-70b}
DEVICE_MAP=${DEVICE_MAP:-auto}
DEVICE=${DEVICE:-auto}
UBATCH=${UBATCH:-8192}
mkdir -p "$OUT"

# shellcheck source=benchmarks/seer_env.sh
source "$(dirname "$0")/seer_env.sh"

profile() {
  local length=$1 repeats=${REPEATS:-2}
  [ "$length" -gt 65536 ] && repeats=${REPEATS:-1}
  echo "== pp$length: $CONFIG, --device-map $DEVICE_MAP, $repeats repeat(s)" >&2
  local start=$SECONDS
  seer profile prefill --config "$CONFIG" --device "$DEVICE" --device-map "$DEVICE_MAP" \
    --lengths "$length" --sparsities 0.9 --ubatch-size "$UBATCH" --repeats "$repeats" --output json \
    > "$OUT/pp$length.json" 2> "$OUT/pp$length.log" || { tail -5 "$OUT/pp$length.log" >&2; return 1; }
  echo "   $((SECONDS - start)) s" >&2
}

table() {
  python3 - "$OUT" <<'EOF'
import json, sys
from pathlib import Path

files = sorted(Path(sys.argv[1]).glob("pp*.json"), key=lambda p: int(p.stem[2:]))
for index, path in enumerate(files):
    data = json.loads(path.read_text())
    if index == 0:
        print(f"{data['model']}, {data['dtype']}, {data['device']}, layers per device "
              f"{data.get('layers_per_device', '-')}, torch {data['torch']}\n")
        print("| test | ubatch | TTFT ms | speedup vs dense | peak memory GB per GPU "
              "| achieved sparsity |")
        print("|---|---|---|---|---|---|")
    for row in data["rows"]:
        ttft, speedup = row["ttft_ms"], row["speedup"]
        peaks = row.get("peak_memory_gb_per_device") or {"": row["peak_memory_gb"]}
        peak = " / ".join("-" if gb is None else f"{gb:.1f}" for gb in peaks.values())
        achieved = row["achieved_sparsity"]
        print(f"| {row['test']} | {row.get('ubatch', '-')} | {ttft['mean']:.0f} ± {ttft['std']:.0f} "
              f"| {speedup['mean']:.2f} | {peak} | {'-' if achieved is None else f'{achieved:.3f}'} |")
EOF
}

for stage in "${@:-65536 131072}"; do
  [ "$stage" = table ] || profile "$stage"
done
table
