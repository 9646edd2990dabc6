"""Fit per-frequency RoPE factors (LongRoPE's form) for the default model's extended context.

Starting from YaRN ×4 with the measured betas (128 / 2), the factor of each rotary frequency and
the attention factor are fitted by gradient descent on the tail loss (the last 4096 predicted
tokens) of 32768-token windows of three novels; two of their windows choose the step to keep.
The model's weights do not change. The held-out novel (pg2641) is only measured, never fitted.
Prints a table of tail perplexity against the native 8k context and writes the factors in the
form seer ships (``seer_cli/engine/rope_factors/<model>.json``).

    python benchmarks/fit_rope_factors.py --model SmolLM2-135M-Instruct.Q4_1.gguf \\
        --books ../shared/data/books --out seer_cli/engine/rope_factors/SmolLM2-135M-Instruct.json

Needs a CUDA GPU (about 2 minutes and 22 GB on an H100 for 220 steps).
"""

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from seer_cli.engine.context import MEASURED_YARN_BETAS, ContextSettings, ModelContext
from seer_cli.engine.data import token_windows
from seer_cli.engine.models import resolve_model

MODEL = "SmolLM2-135M-Instruct"
TRAIN_BOOKS, HELD_OUT_BOOK = ("pg1342", "pg2701", "pg37106"), "pg2641"
LONG, NATIVE, TAIL, LM_CHUNK = 32768, 8192, 4096, 1024


class FittedRope(torch.nn.Module):
    """A rotary module of transformers' longrope arithmetic whose factors take gradients:
    frequency i is ``base_inv_freq[i] / factor[i]``, cos and sin are scaled by the attention
    factor."""

    def __init__(self, base_inv_freq: torch.Tensor, factors: torch.Tensor, attention: float):
        super().__init__()
        self.register_buffer("base_inv_freq", base_inv_freq)
        self.log_factors = torch.nn.Parameter(factors.log())
        self.log_attention = torch.nn.Parameter(torch.tensor(math.log(attention)))

    def forward(self, x, position_ids):
        freqs = position_ids[0].float()[:, None] * (self.base_inv_freq / self.log_factors.exp())
        emb = torch.cat([freqs, freqs], dim=-1)
        scale = self.log_attention.exp()
        return (emb.cos() * scale)[None].to(x.dtype), (emb.sin() * scale)[None].to(x.dtype)

    def factors(self) -> tuple[list[float], float]:
        return self.log_factors.exp().tolist(), float(self.log_attention.exp())


def tail_loss(model, window: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of the last TAIL predictions of ``window``."""
    ids = window.to(model.device)[None]
    hidden = model.model(input_ids=ids, use_cache=False).last_hidden_state[0, :-1][-TAIL:]
    targets = ids[0, 1:][-TAIL:]
    total = sum(
        F.cross_entropy(model.lm_head(hidden[i : i + LM_CHUNK]).float(),
                        targets[i : i + LM_CHUNK], reduction="sum")
        for i in range(0, TAIL, LM_CHUNK)
    )  # fmt: skip
    return total / TAIL


@torch.inference_mode()
def perplexity(model, rotary, windows: list[torch.Tensor], last: int | None = None) -> float:
    model.model.rotary_emb = rotary
    losses = [float(tail_loss(model, w[-last:] if last else w)) for w in windows]
    return math.exp(sum(losses) / len(losses))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=MODEL)
    parser.add_argument("--books", default="../shared/data/books")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=220)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--every", type=int, default=10, help="validate every N steps")
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = resolve_model(args.model)
    kwargs = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(source.folder, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(source.folder, dtype=torch.float32,
                                                 attn_implementation="sdpa", **kwargs)  # fmt: skip
    model = model.to(device="cuda", dtype=torch.bfloat16).eval().requires_grad_(False)
    betas = MEASURED_YARN_BETAS[MODEL]
    settings = ContextSettings(LONG, "yarn", yarn_beta_fast=betas[0], yarn_beta_slow=betas[1])
    context = ModelContext(model, MODEL, settings)
    native = model.model.rotary_emb  # float32, rebuilt by ModelContext if the cast narrowed it
    context.use(context.plan.scaling)
    yarn = model.model.rotary_emb

    books = [f"{args.books}/{name}.txt" for name in TRAIN_BOOKS]
    train, _ = token_windows(tokenizer, books, LONG, None, seed=0)
    validation, train = train[:2], train[2:]
    held_out, _ = token_windows(tokenizer, [f"{args.books}/{HELD_OUT_BOOK}.txt"], LONG, 3, 0)

    # The starting point: YaRN's frequencies as factors on the model's own.
    yarn_inv_freq, attention = ROPE_INIT_FUNCTIONS["yarn"](yarn.config, model.device)
    factors = native.inv_freq / yarn_inv_freq.float()
    rope = FittedRope(native.inv_freq.clone(), factors, attention).cuda()
    optimizer = torch.optim.Adam(rope.parameters(), lr=args.lr)
    best = (float("inf"), None, -1)
    start = time.perf_counter()
    for step in range(args.steps + 1):
        if step % args.every == 0:
            value = perplexity(model, rope, validation)
            if value < best[0]:
                best = (value, rope.factors(), step)
            print(f"step {step:4d}  {time.perf_counter() - start:6.1f} s  validation {value:.3f}",
                  file=sys.stderr, flush=True)  # fmt: skip
        if step == args.steps:
            break
        model.model.rotary_emb = rope
        loss = tail_loss(model, train[step % len(train)])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            rope.log_factors.clamp_(min=0.0)  # no frequency above the model's own

    _, (fitted, fitted_attention), step = best
    rope = FittedRope(native.inv_freq.clone(), torch.tensor(fitted), fitted_attention).cuda()
    rows = [
        ("native, the last 8192 tokens", native, NATIVE),
        ("YaRN ×4, beta fast 128, beta slow 2", yarn, None),
        (f"fitted factors (step {step})", rope, None),
        ("fitted factors, the last 8192 tokens", rope, NATIVE),
    ]
    base = {}
    print("| RoPE | validation (training novels) | held out (pg2641) |\n|---|---:|---:|")
    for label, rotary, last in rows:
        values = [perplexity(model, rotary, windows, last) for windows in (validation, held_out)]
        base = base or dict(enumerate(values))
        cells = [f"{v:.3f} ({100 * (v / base[i] - 1):+.1f} %)" for i, v in enumerate(values)]
        print(f"| {label} | {' | '.join(cells)} |")
    print(f"peak memory {torch.cuda.max_memory_allocated() / 1e9:.1f} GB", file=sys.stderr)
    record = {
        "model": MODEL,
        "original_ctx": NATIVE,
        "ctx_size": LONG,
        "long_factor": [round(f, 5) for f in fitted],
        "attention_factor": round(fitted_attention, 5),
        "measured": (
            "benchmarks/fit_rope_factors.py: gradient descent from YaRN x4 (beta fast 128, beta "
            f"slow 2) on the tail loss of {len(train)} windows of {LONG} tokens of "
            f"{', '.join(TRAIN_BOOKS)} (bfloat16, Adam, learning rate {args.lr}), the step kept "
            f"by {len(validation)} validation windows of the same novels; never fitted on "
            f"{HELD_OUT_BOOK}"
        ),
    }
    args.out.write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
