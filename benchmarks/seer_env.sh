# Sourced by the GPU benchmark scripts: makes `seer` callable from a bare checkout (no install).

# Without an installed package, import the folders under their package names.
if ! python3 -c 'import seer_cli, seer_gates, seer_kernels' 2>/dev/null; then
  mkdir -p /tmp/pkgs
  ln -sfn "$PWD/kernels" /tmp/pkgs/seer_kernels
  ln -sfn "$PWD/gates" /tmp/pkgs/seer_gates
  ln -sfn "$PWD/seer_cli" /tmp/pkgs/seer_cli
  export PYTHONPATH=/tmp/pkgs${PYTHONPATH:+:$PYTHONPATH}
fi
# -P: the checkout's own folder stays off sys.path, where kernels/ would shadow the kernels
# package that transformers imports.
seer() { python3 -P -c 'import sys; from seer_cli.app import main; sys.argv[0] = "seer"; main()' "$@"; }

# timed_step NAME FILE ARGS...: `seer ARGS`, its stdout to FILE and its stderr to $OUT/NAME.log,
# with its wall time on stderr; on failure the log's tail, and status 1.
timed_step() {
  local name=$1 product=$2
  shift 2
  echo "== $name" >&2
  local start=$SECONDS
  seer "$@" > "$product" 2> "$OUT/$name.log" || { tail -5 "$OUT/$name.log" >&2; return 1; }
  echo "   $((SECONDS - start)) s" >&2
}
