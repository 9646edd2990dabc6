"""What a command-line user pays on the first prefill of a fresh process, dense and sparse.

Runs ``seer profile prefill`` in fresh processes, one after another: the first with empty
Triton and seer caches (the first run after install: only the tables shipped in
``kernels/tuned`` help), then ``--runs - 1`` more that find the caches the earlier ones left.
Prints, per test, the first prefill of each process against the warm mean ± std.

    python benchmarks/cold_start.py --config llama-3.1-8b -l 32768,131072 -s 0.9 [--runs 2]
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path


def profile_once(args, env: dict) -> dict:
    command = [
        sys.executable, "-c", "from seer_cli.app import main; main()",
        "profile", "prefill", "--config", args.config, "-l", args.lengths, "-s", args.sparsities,
        "-r", str(args.repeats), "-o", "json", "--device", args.device,
    ]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"seer profile failed:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="llama-3.1-8b")
    parser.add_argument("-l", "--lengths", default="32768,131072")
    parser.add_argument("-s", "--sparsities", default="0.9")
    parser.add_argument("-r", "--repeats", type=int, default=3)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as triton_cache, tempfile.TemporaryDirectory() as seer:
        env = {**os.environ, "TRITON_CACHE_DIR": triton_cache, "SEER_CACHE_DIR": seer}
        runs = [profile_once(args, env) for _ in range(args.runs)]

    if "OUT" in os.environ:  # the raw reports, beside the table
        Path(os.environ["OUT"], "cold_start.json").write_text(json.dumps(runs, indent=1))
    info = runs[0]
    print(f"\n{info['model']} on {info['device']}, {info['dtype']}, torch {info['torch']}")
    heads = ["test", "1st prefill, run 1 (empty caches) ms"]
    heads += [f"1st prefill, run {n} ms" for n in range(2, args.runs + 1)]
    heads += ["warm TTFT ms (last run)", "last run's 1st / warm"]
    print("| " + " | ".join(heads) + " |")
    print("|" + "---|" * len(heads))
    for rows in zip(*(run["rows"] for run in runs), strict=True):
        warm = rows[-1]["ttft_ms"]
        cells = [rows[0]["test"], *(f"{row['first_ms']:.0f}" for row in rows)]
        cells += [
            f"{warm['mean']:.0f} ± {warm['std']:.0f}",
            f"{rows[-1]['first_ms'] / warm['mean']:.2f}",
        ]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
