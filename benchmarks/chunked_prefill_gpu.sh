#!/usr/bin/env bash
# Chunked prefill (--ubatch-size) on one GPU, Llama-3.1-8B shapes with random weights and gates:
#   131k   131072 tokens, dense and sparsity 0.9, in one pass and in chunks of 8192 and 16384:
#          time to first token and peak memory of each (targets: chunked sparse peak <= 36 GB,
#          TTFT within 5 % of one pass);
#   262k   262144 tokens (config llama-3.1-8b-256k: the same shapes, 262144 positions), dense
#          and sparsity 0.9, in chunks of 8192 and in one pass (expected out of memory on an
#          80 GB GPU: reported as such in the table).
# Each stage is one `seer profile prefill` run of under 10 minutes on an H100 (estimate: 131k
# about 5, 262k about 6). Run from the repository root; tables (markdown) and logs go to OUT
# (default ./out), the tables are printed last.
#
#   bash benchmarks/chunked_prefill_gpu.sh          # both stages
#   bash benchmarks/chunked_prefill_gpu.sh 131k     # one stage: 131k, 262k or table
#
# REPEATS (default 2 at 131k, 1 at 262k) sets the timed repeats; each row also makes a first
# call and a warm-up call. For a smoke test on the CPU: SMALL=1 (a 135M config, 512 and 1024
# tokens, chunks of 128, --device cpu).
set -euo pipefail

OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"

# shellcheck source=benchmarks/seer_env.sh
source "$(dirname "$0")/seer_env.sh"

# stage NAME ARGS...: one profile run, the table to $OUT/NAME.md, stderr to $OUT/NAME.log.
stage() {
  local name=$1
  shift
  timed_step "$name" "$OUT/$name.md" profile prefill --sparsities 0.9 -o md "$@"
}

if [ -n "${SMALL:-}" ]; then
  LONG=(--config smollm2-135m --lengths 512 --ubatch-size 0,128 --device cpu)
  LONGER=(--config smollm2-135m --lengths 1024 --ubatch-size 128,0 --device cpu)
else
  LONG=(--config llama-3.1-8b --lengths 131072 --ubatch-size 0,8192,16384)
  LONGER=(--config llama-3.1-8b-256k --lengths 262144 --ubatch-size 8192,0)
fi

run_131k() { stage chunked-131k "${LONG[@]}" --repeats "${REPEATS:-2}"; }
run_262k() { stage chunked-262k "${LONGER[@]}" --repeats "${REPEATS:-1}"; }

table() {
  for name in chunked-131k chunked-262k; do
    [ -f "$OUT/$name.md" ] || continue
    echo "## $name"
    cat "$OUT/$name.log" "$OUT/$name.md"
  done
}

case "${1:-all}" in
  131k) run_131k ;;
  262k) run_262k ;;
  table) ;;
  all) run_131k; run_262k ;;
  *) echo "unknown stage ${1}: use 131k, 262k or table" >&2; exit 1 ;;
esac
table
