"""How much a gate threshold keeps at different prompt lengths, for several threshold meanings.

    python benchmarks/threshold_length.py --file pg2641.txt --lengths 8192,32768

One dense forward pass per length over the last tokens of one window of the text (the shorter
windows are the tail of the longest, so every length ends on the same tokens); prompts longer
than the model's native context run under the default context extension. Each layer's gate
scores are turned into block masks by each threshold meaning below, and the achieved sparsity
(forced blocks included, as in ``select_blocks``) is printed as a markdown table per meaning:

- raw: keep a block whose score (a softmax over the row's causal blocks) exceeds τ (what
  ``--threshold`` meant at first);
- row-average: keep a block whose score × the row's causal block count exceeds τ (τ = 1 is
  the row's average score; what ``--threshold`` means now, chosen by this measurement);
- row-max: keep a block whose score / the row's highest score exceeds τ;
- mass: keep each row's highest-scoring blocks until they hold the share τ of its score.
"""

import argparse
import datetime
import subprocess

import torch
from seer_gates import MaskPolicy, block_count, select_blocks

from seer_cli.engine.attention import block_rope, catch_pre_rope
from seer_cli.engine.context import ContextSettings, ModelContext
from seer_cli.engine.models import load_model, resolve_model
from seer_cli.engine.prompt import read_document
from seer_cli.engine.runtime import load_model_gates, resolve_gate_path
from seer_cli.progress import quiet_libraries

MEANINGS = {
    "raw": [0.001, 0.003, 0.01, 0.02, 0.03, 0.05],
    "row-average": [0.25, 0.5, 1.0, 2.0, 4.0, 8.0],
    "row-max": [0.001, 0.003, 0.01, 0.03, 0.1, 0.3],
    "mass": [0.5, 0.7, 0.8, 0.9, 0.95, 0.99],
}


def keep_mask(scores: torch.Tensor, meaning: str, tau: float) -> torch.Tensor:
    """Blocks kept by the scores alone, forced blocks not included. scores: [H, nb, nb]."""
    nb = scores.shape[-1]
    if meaning == "raw":
        return scores > tau
    if meaning == "row-average":
        rows = torch.arange(1, nb + 1, dtype=scores.dtype).view(nb, 1)
        return scores * rows > tau
    if meaning == "row-max":
        return scores / scores.amax(dim=-1, keepdim=True) > tau
    ranked, order = scores.sort(dim=-1, descending=True)
    before = ranked.cumsum(dim=-1) - ranked  # mass of the blocks ranked above each block
    return torch.zeros_like(scores, dtype=torch.bool).scatter(-1, order, before < tau)


class KeptCounter:
    """Gate scores of each layer as the forward pass reaches it, reduced to kept-block counts."""

    def __init__(self, model, gates, num_blocks: int):
        self.model, self.gates, self.nb = model, gates, num_blocks
        self.cos, self.sin = block_rope(model, gates[0].hidden_size, num_blocks, 1, "cpu")
        # Zero scores under threshold 0 keep the forced blocks only.
        self.forced = select_blocks(torch.zeros(num_blocks, num_blocks), MaskPolicy(threshold=0))
        self.causal = torch.ones(num_blocks, num_blocks, dtype=torch.bool).tril()
        self.kept = {(m, t): 0 for m, taus in MEANINGS.items() for t in taus}
        self.total = 0
        self._q = {}

    def __call__(self, layer: int, name: str, x: torch.Tensor) -> None:
        if name == "q":
            self._q[layer] = x
            return
        scores = self.gates[layer](self._q.pop(layer), x, self.cos, self.sin)[0]  # [H, nb, nb]
        self.total += scores.shape[0] * self.nb * (self.nb + 1) // 2
        for meaning, taus in MEANINGS.items():
            for tau in taus:
                mask = (keep_mask(scores, meaning, tau) | self.forced) & self.causal
                self.kept[meaning, tau] += int(mask.sum())


@torch.inference_mode()
def measure(model, gates, ids: torch.Tensor, context: ModelContext):
    """(KeptCounter after one dense pass over ids, the RoPE scaling it ran under)."""
    scaling = context.apply(len(ids))
    counter = KeptCounter(model, gates, block_count(len(ids)))
    hooks = catch_pre_rope(model, counter)
    try:
        model.model(input_ids=ids[None], use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    return counter, scaling


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--file", required=True)
    parser.add_argument("--lengths", default="8192,32768")
    parser.add_argument("--gates", default="auto")
    parser.add_argument("--offset", type=int, default=0, help="First token of the window.")
    args = parser.parse_args()
    quiet_libraries()
    torch.set_grad_enabled(False)
    source = resolve_model(None)
    model, tokenizer = load_model(source, torch.device("cpu"), torch.float32)
    gate_path = resolve_gate_path(args.gates, model, source.name)
    _, gates = load_model_gates(gate_path, model, source.name, "cpu")
    context = ModelContext(model, source.name, ContextSettings())
    lengths = sorted(int(n) for n in args.lengths.split(","))
    text = read_document(args.file).text
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])
    window = ids[args.offset : args.offset + lengths[-1]]
    counters = {n: measure(model, gates, window[-n:], context) for n in lengths}

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()  # fmt: skip
    print(f"{source.name}, gates {args.gates}, {args.file} tokens {args.offset}+, cpu float32, "
          f"{datetime.date.today()}, commit {commit}")  # fmt: skip
    for n, (_, scaling) in counters.items():
        print(f"- {n} tokens: {scaling or 'native RoPE'}")
    for meaning, taus in MEANINGS.items():
        print(f"\n{meaning}: achieved sparsity\n")
        print("| τ | " + " | ".join(f"{n} tokens" for n in lengths) + " |")
        print("|---:|" + "---:|" * len(lengths))
        for tau in taus:
            cells = [1 - c.kept[meaning, tau] / c.total for c, _ in counters.values()]
            print(f"| {tau:g} | " + " | ".join(f"{cell:.3f}" for cell in cells) + " |")


if __name__ == "__main__":
    main()
