#!/usr/bin/env bash
# Long context on the default model (SmolLM2-135M-Instruct) on one GPU: gates distilled at 32768
# tokens under the model's measured LongRoPE factors (stage fit-rope measures them), learning each
# block's share of the attention (TARGET=maxpool: its peak), then `seer eval` on the held-out
# novel (pg2641, never seen by any gates) at 32768 tokens with the new and the shipped native
# gates, and at the native 8192 tokens with both. The new file is what ships as
# gates/pretrained/SmolLM2-135M-Instruct-32k.safetensors, for prompts past the native context.
#
# Run from the repository root on the GPU machine, with the default model where `seer` finds
# it (or MODEL=/path/to/model, passed as --model) and the novels in BOOKS (default
# ../shared/data/books, else shared/data/books). Everything goes to OUT (default ./out): the new
# gate file, each step's JSON output and stderr log; a short table is printed last.
# Expected on an H100: scaling about 1.5 minutes, yarn 2 (7 settings of 17 s), yarn-pairs under
# 2, fit-rope about 2.5, distill about 3, eval32k about 3, eval8k under 1, local under 2 (measured 1.5),
# local-gates about 5, local-gates-8k under 1; each stage alone fits a 10-minute call.
#
#   bash benchmarks/long_context_gpu.sh            # all stages
#   bash benchmarks/long_context_gpu.sh distill    # one stage: scaling, yarn, yarn-pairs,
#                                                  # fit-rope, distill, eval32k, eval8k, local,
#                                                  # local-gates, local-gates-8k, table
#
# LONG, NATIVE, STEPS and DISTILL_WINDOWS (default: all) shrink the run for a smoke test on the
# CPU with a tiny model, e.g. MODEL=tiny-llama SCALING=yarn LONG=2048 NATIVE=1024 STEPS=2
# DISTILL_WINDOWS=4.
set -euo pipefail

OUT=${OUT:-$PWD/out}
BOOKS=${BOOKS:-../shared/data/books}
[ -d "$BOOKS" ] || BOOKS=shared/data/books
LONG=${LONG:-32768}
NATIVE=${NATIVE:-8192}
STEPS=${STEPS:-1000}
TARGET=${TARGET:-mass}
MODEL_ARGS=()
[ -n "${MODEL:-}" ] && MODEL_ARGS=(--model "$MODEL")
WINDOW_ARGS=()
[ -n "${DISTILL_WINDOWS:-}" ] && WINDOW_ARGS=(--max-windows "$DISTILL_WINDOWS")
# YaRN ×4 from 8192, stated explicitly (stages scaling and yarn vary it).
YARN_EXTENSION=(--ctx-size "$LONG" --rope-scaling yarn --rope-scale $((LONG / NATIVE))
                --yarn-orig-ctx "$NATIVE")
# The extension of the other stages: the default model's measured LongRoPE factors, or YaRN as
# above with SCALING=yarn (a model without measured factors, such as the tiny smoke-test one).
if [ "${SCALING:-longrope}" = yarn ]; then
  EXTENSION=("${YARN_EXTENSION[@]}")
else
  EXTENSION=(--ctx-size "$LONG" --rope-scaling longrope)
fi
NEW_GATES=$OUT/SmolLM2-135M-Instruct-32k.safetensors
LOCAL_GATES=$OUT/SmolLM2-135M-Instruct-32k-local8.safetensors
# The shipped gates for the native context.
SHIPPED_GATES=${SHIPPED_GATES:-gates/pretrained/SmolLM2-135M-Instruct.safetensors}
THRESHOLDS=0.5,1,2
mkdir -p "$OUT"

# shellcheck source=benchmarks/seer_env.sh
source "$(dirname "$0")/seer_env.sh"

# step NAME ARGS...: one seer command, JSON to $OUT/NAME.json, stderr to $OUT/NAME.log, timed.
step() {
  local name=$1
  shift
  timed_step "$name" "$OUT/$name.json" "$@"
}

scaling() {
  # Dense tail perplexity at 32k under a few scalings against the native 8k on the same tokens
  # (the context task alone), to choose the extension's defaults by measurement.
  local settings=("yarn 4 $NATIVE" "yarn 5 $NATIVE" "yarn 8 $((NATIVE / 2))" "linear 4 -")
  for setting in "${settings[@]}"; do
    read -r kind scale original <<< "$setting"
    local flags=(--ctx-size "$LONG" --rope-scaling "$kind" --rope-scale "$scale")
    [ "$original" != - ] && flags+=(--yarn-orig-ctx "$original")
    step "scaling-$kind-x$scale" eval "${MODEL_ARGS[@]}" --gates "$SHIPPED_GATES" \
      --data "$BOOKS/pg2641.txt" --seq-len "$LONG" "${flags[@]}" --max-windows 3 \
      --tasks context --json
  done
}

yarn() {
  # Stage `yarn`: YaRN ×4 from 8192 at 32k (stage scaling's scaling-yarn-x4) with one of YaRN's
  # knobs off its default at a time, the context task alone, to choose them by measurement.
  yarn_steps "af0.9 --yarn-attn-factor 0.9" "af1.1 --yarn-attn-factor 1.1" \
    "af1.2 --yarn-attn-factor 1.2" "bf16 --yarn-beta-fast 16" "bf64 --yarn-beta-fast 64" \
    "bs2 --yarn-beta-slow 2" "bs0.5 --yarn-beta-slow 0.5"
}

yarn_pairs() {
  # Stage `yarn-pairs`: the two knobs that helped alone (beta-fast up, beta-slow up), further
  # and together.
  yarn_steps "bf64-bs2 --yarn-beta-fast 64 --yarn-beta-slow 2" "bf128 --yarn-beta-fast 128" \
    "bf128-bs2 --yarn-beta-fast 128 --yarn-beta-slow 2" \
    "bf64-bs4 --yarn-beta-fast 64 --yarn-beta-slow 4" \
    "bf256-bs4 --yarn-beta-fast 256 --yarn-beta-slow 4"
}

# yarn_steps "NAME FLAGS..."...: one context-task step per setting, named yarn-NAME.
yarn_steps() {
  for setting in "$@"; do
    local name rest flags
    read -r name rest <<< "$setting"
    read -r -a flags <<< "$rest"
    step "yarn-$name" eval "${MODEL_ARGS[@]}" --gates "$SHIPPED_GATES" \
      --data "$BOOKS/pg2641.txt" --seq-len "$LONG" "${YARN_EXTENSION[@]}" "${flags[@]}" \
      --max-windows 3 --tasks context --json
  done
}

fit_rope() {
  # Stage `fit-rope`: per-frequency RoPE factors fitted on the training novels (see
  # benchmarks/fit_rope_factors.py), to $OUT/rope-factors.json; the shipped file is not touched.
  echo "== fit-rope" >&2
  python3 "$(dirname "$0")/fit_rope_factors.py" --model "${MODEL:-SmolLM2-135M-Instruct}" \
    --books "$BOOKS" --out "$OUT/rope-factors.json" > "$OUT/fit-rope.md" 2> "$OUT/fit-rope.log"
  cat "$OUT/fit-rope.md" >&2
}

distill() {
  step distill distill "${MODEL_ARGS[@]}" \
    --data "$BOOKS/pg1342.txt" --data "$BOOKS/pg2701.txt" --data "$BOOKS/pg37106.txt" \
    --seq-len "$LONG" "${EXTENSION[@]}" --steps "$STEPS" --batch-size 8 "${WINDOW_ARGS[@]}" \
    --target "$TARGET" --out "$NEW_GATES" --overwrite
}

eval32k() {
  # Everything at 32k with the new gates: context baseline, perplexity, recall, passkey.
  step eval32k-new eval "${MODEL_ARGS[@]}" --gates "$NEW_GATES" \
    --data "$BOOKS/pg2641.txt" --seq-len "$LONG" "${EXTENSION[@]}" --max-windows 3 \
    --sparsities 0.9,0.95,0.97 --thresholds "$THRESHOLDS" \
    --depths 0.1,0.3,0.5,0.7,0.9 --trials 2 --passkey-sparsities 0.9 --json
  # The shipped (8k, unscaled) gates on the same windows: perplexity only.
  step eval32k-shipped eval "${MODEL_ARGS[@]}" --gates "$SHIPPED_GATES" \
    --data "$BOOKS/pg2641.txt" --seq-len "$LONG" "${EXTENSION[@]}" --max-windows 3 \
    --sparsities 0.9,0.95,0.97 --thresholds "$THRESHOLDS" --tasks perplexity --json
}

# native_eval NAME GATES ARGS...: perplexity at the native context (unscaled RoPE), sparsities
# 0.5, 0.8 and 0.9, with ARGS added (thresholds, local windows).
native_eval() {
  local name=$1 gates=$2
  shift 2
  step "$name" eval "${MODEL_ARGS[@]}" --gates "$gates" \
    --data "$BOOKS/pg2641.txt" --seq-len "$NATIVE" "${EXTENSION[@]}" --max-windows 3 \
    --sparsities 0.5,0.8,0.9 --tasks perplexity --json "$@"
}

eval8k() {
  # Native context: the new gates against the shipped ones.
  native_eval eval8k-new "$NEW_GATES" --thresholds "$THRESHOLDS"
  native_eval eval8k-shipped "$SHIPPED_GATES" --thresholds "$THRESHOLDS"
}

local_windows() {
  # Stage `local`: the shipped gates and the pooled estimator with forced local windows of 0, 2,
  # 4, 8 and 16 blocks against sink + local at 32k (perplexity only; needs no distill stage).
  step local eval "${MODEL_ARGS[@]}" --gates "$SHIPPED_GATES" \
    --data "$BOOKS/pg2641.txt" --seq-len "$LONG" "${EXTENSION[@]}" --max-windows 3 \
    --sparsities 0.9,0.95,0.97 --thresholds '' --local-blocks 0,2,4,8,16 --tasks perplexity --json
}

local_gates() {
  # Stage `local-gates`: gates distilled at 32k for a policy that keeps a local window of 8
  # blocks (the window left out of their loss), then evaluated with and without that window
  # (perplexity only); compare with stage `local`'s shipped gates + local 8.
  step distill-local8 distill "${MODEL_ARGS[@]}" \
    --data "$BOOKS/pg1342.txt" --data "$BOOKS/pg2701.txt" --data "$BOOKS/pg37106.txt" \
    --seq-len "$LONG" "${EXTENSION[@]}" --steps "$STEPS" --batch-size 8 "${WINDOW_ARGS[@]}" \
    --target "$TARGET" --local-blocks 8 --out "$LOCAL_GATES" --overwrite
  step local-gates eval "${MODEL_ARGS[@]}" --gates "$LOCAL_GATES" \
    --data "$BOOKS/pg2641.txt" --seq-len "$LONG" "${EXTENSION[@]}" --max-windows 3 \
    --sparsities 0.9,0.95,0.97 --thresholds '' --local-blocks 0,8 --tasks perplexity --json
}

local_gates_8k() {
  # Stage `local-gates-8k`: the native context (unscaled RoPE) with the local-window gates of
  # stage `local-gates` and with the shipped gates, each with and without the window.
  native_eval local8k-local8 "$LOCAL_GATES" --thresholds '' --local-blocks 0,8
  native_eval local8k-shipped "$SHIPPED_GATES" --thresholds '' --local-blocks 0,8
}

table() {
  python3 - "$OUT" <<'EOF'
import json, pathlib, sys

out = pathlib.Path(sys.argv[1])


def load(name):
    path = out / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() and path.stat().st_size else None


for distill_name in ("distill", "distill-local8"):
    distill = load(distill_name)
    if not distill:
        continue
    print(f"\n{distill_name}: {distill.get('train_windows')} + {distill.get('val_windows')} windows of "
              f"{distill.get('seq_len')}, {distill.get('minutes')} min (harvest "
              f"{distill.get('harvest_minutes')} min, peak {distill.get('peak_memory_gb')} GB), "
              f"scaling {distill.get('rope_scaling')}, val recall@0.9 {distill.get('val_recall'):.3f} "
              f"(oracle {distill.get('val_oracle_recall'):.3f})")
names = [path.stem for stage in ("scaling", "yarn") for path in sorted(out.glob(f"{stage}-*.json"))]
for name in names + ["eval32k-new", "eval32k-shipped", "eval8k-new", "eval8k-shipped", "local",
                     "local-gates", "local8k-local8", "local8k-shipped"]:
    report = load(name)
    if not report:
        continue
    print(f"\n{name}: {report['windows']} × {report['seq_len']} tokens, tail "
          f"{report.get('tail_tokens')}, {report['device']} {report['dtype']}")
    for row in report.get("context", []):
        delta = row.get("delta_percent")
        print(f"  context: {row['label']}, RoPE {row['rope']}: {row['perplexity']:.3f}"
              + ("" if delta is None else f"  {delta:+.1f} %"))
    if report.get("perplexity"):
        print("  | policy | setting | achieved | perplexity | Δ vs dense |")
    for row in report.get("perplexity", []):
        setting = (f"s={row['sparsity']:.2f}" if row["sparsity"] is not None
                   else f"τ={row['threshold']:g}" if row["threshold"] is not None else "—")
        delta = "—" if row["delta_percent"] is None else f"{row['delta_percent']:+.1f} %"
        print(f"  | {row['policy']} | {setting} | {row['achieved_sparsity']:.3f} | "
              f"{row['perplexity']:.3f} | {delta} |")
    for row in report.get("recall", []):
        print(f"  recall s={row['sparsity']:.2f}: "
              + ", ".join(f"{k} {v:.3f}" for k, v in row["recall"].items()))
    scores = {}
    for row in report.get("passkey", []):
        key = row["policy"] + ("" if row["sparsity"] is None else f" s={row['sparsity']:.2f}")
        got, total = scores.get(key, (0, 0))
        scores[key] = (got + row["correct"], total + row["trials"])
    if scores:
        print(f"  passkey ({report.get('passkey_tokens')} tokens): "
              + ", ".join(f"{k} {c}/{t}" for k, (c, t) in scores.items()))
EOF
}

stages=("$@")
[ ${#stages[@]} -gt 0 ] || stages=(scaling yarn yarn-pairs fit-rope distill eval32k eval8k local
                                   local-gates local-gates-8k table)
for stage in "${stages[@]}"; do
  # `local` is a shell builtin, so its stage's function has another name.
  [ "$stage" = local ] && stage=local_windows
  [ "$stage" = local-gates ] && stage=local_gates
  [ "$stage" = local-gates-8k ] && stage=local_gates_8k
  [ "$stage" = yarn-pairs ] && stage=yarn_pairs
  [ "$stage" = fit-rope ] && stage=fit_rope
  "$stage"
done
