"""Measuring sparse prefill against dense attention on the user's texts: perplexity, attention
recall of block selections at equal sparsity, and passkey retrieval. The library behind
``seer eval`` (no typer, no rich):

evaluation = Evaluation(model, tokenizer, gates, windows)
rows = evaluation.perplexity(sparsities=[0.5, 0.9], thresholds=[0.003])

Shapes: b batch, s tokens, nb = ceil(s / 64) blocks, Hq query heads, Hkv key/value heads,
d head dim.
"""

import contextlib
import math
import os
import random
import re
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from seer_gates import MaskPolicy, achieved_sparsity, block_count, pooled_qk_scores, select_blocks
from seer_gates.baselines import sink_local_scores
from seer_gates.distill import attention_recall
from seer_kernels import BLOCK, pooled_attention, pooled_attention_reference

from ..engine.attention import SparsePrefill, attention_kernel
from ..engine.errors import SeerError
from ..engine.generation import SamplingOptions, generate
from ..engine.prompt import build_prompt

# Where block scores come from. The oracles rank blocks by the true attention: the block-summed
# probabilities ("mass", an upper bound on recall) or the max-pooled map the gates learn from.
ESTIMATORS = ("gates", "oracle-mass", "oracle-maxpool", "pooled", "sink+local")
# The max-pooled oracle would need a dense pass of its own inside every sparse layer.
PERPLEXITY_ESTIMATORS = ("gates", "oracle-mass", "pooled", "sink+local")
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? Answer with the number only."
# Room for "The pass key is NNNNN." with digits tokenized one by one, as many tokenizers do.
ANSWER_TOKENS = 16
LM_HEAD_CHUNK = 1024
# Re-tokenizing text cut at token boundaries can add a token at each seam.
_SEAM_SLACK = 8
# Attention probabilities held at once (elements) while summing them into blocks (~256 MB fp32).
_CHUNK_ELEMENTS = 1 << 26

Progress = Callable[[int, int], None]


def _no_progress(done: int, total: int) -> None:
    pass


@contextlib.contextmanager
def kernels_for(dtype: torch.dtype, device: torch.device):
    """Run the block below with kernels that accept ``dtype`` on ``device``.

    The Triton kernels take float16/bfloat16 only, so for float32 on a GPU this sets
    ``SEER_ATTENTION_KERNEL=reference`` (read by ``attention_kernel``) for the duration: sparse
    and pooled attention then run their plain-PyTorch references, on the GPU all the same.
    """
    if dtype != torch.float32 or device.type != "cuda":
        yield
        return
    previous = os.environ.get("SEER_ATTENTION_KERNEL")
    os.environ["SEER_ATTENTION_KERNEL"] = "reference"
    try:
        yield
    finally:
        if previous is None:
            del os.environ["SEER_ATTENTION_KERNEL"]
        else:
            os.environ["SEER_ATTENTION_KERNEL"] = previous


# ---------------------------------------------------------------- attention maps


def block_attention_mass(
    q: torch.Tensor, k: torch.Tensor, scaling: float | None = None
) -> torch.Tensor:
    """True causal attention summed over key blocks and averaged over the tokens of each query
    block: ``mass[i, j]`` = mean over rows r of block i of Σ_{c in block j} P[r, c].

    q: `[b, Hq, s, d]`, k: `[b, Hkv, s, d]` post-RoPE (query head h reads key head
    h // (Hq // Hkv)); scaling defaults to 1/sqrt(d). Returns float32 `[b, Hq, nb, nb]`, each row
    summing to 1 over j ≤ i. Works through chunks of query blocks, so memory grows with the
    chunk, never with s².
    """
    b, hq, s, d = q.shape
    hkv = k.shape[1]
    nb = block_count(s)
    scale = d**-0.5 if scaling is None else scaling
    keys = k.float().unsqueeze(2).transpose(-1, -2)  # [b, Hkv, 1, d, s]
    positions = torch.arange(s, device=q.device)
    mass = torch.zeros(b, hq, nb, nb, dtype=torch.float32, device=q.device)
    rows_per_chunk = max(1, _CHUNK_ELEMENTS // (hq * BLOCK * nb * BLOCK))
    for first in range(0, nb, rows_per_chunk):
        last = min(first + rows_per_chunk, nb)
        start, stop = first * BLOCK, min(last * BLOCK, s)
        queries = q[:, :, start:stop].float().view(b, hkv, hq // hkv, stop - start, d)
        # [b, Hkv, group, rows, stop]: keys past the chunk's last query are all masked out.
        logits = (queries @ keys[..., :stop]) * scale
        causal = positions[:stop] <= positions[start:stop, None]
        probs = logits.masked_fill(~causal, -math.inf).softmax(dim=-1)
        # Zero-pad queries and keys to whole blocks: [b, Hq, R, BLOCK, last, BLOCK].
        probs = F.pad(probs, (0, last * BLOCK - stop, 0, last * BLOCK - stop))
        probs = probs.reshape(b, hq, last - first, BLOCK, last, BLOCK)
        tokens = (s - positions[start:stop:BLOCK]).clamp(max=BLOCK)  # [R] queries per block
        mass[:, :, first:last, :last] = probs.sum(dim=(3, 5)) / tokens[:, None]
    return mass


def _sink_local(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """``sink_local_scores`` for post-RoPE q `[b, Hq, s, d]`: `[b, Hq, nb, nb]`."""
    nb = block_count(q.shape[2])
    return sink_local_scores(nb, q.device).expand(q.shape[0], q.shape[1], nb, nb)


def selection_recall(
    mass: torch.Tensor, estimates: dict[str, torch.Tensor], sparsities: list[float]
) -> dict[tuple[str, float], float]:
    """Recall of every estimate's block selection at every sparsity.

    mass: `[b, Hq, nb, nb]` from ``block_attention_mass``; estimates: name → scores of the same
    shape (or broadcastable to it). Every selection goes through ``select_blocks`` with
    ``MaskPolicy(sparsity=s)``, so budgets and forced blocks are the same for all. Returns
    (name, sparsity) → the share of the mass inside the kept blocks, averaged over rows and heads.
    """
    return {
        (name, sparsity): attention_recall(
            mass, select_blocks(scores, MaskPolicy(sparsity=sparsity))
        )
        for sparsity in sparsities
        for name, scores in estimates.items()
    }


def topk_sparsity(num_blocks: int, sparsity: float) -> float:
    """Achieved sparsity of top-k selection on an `nb`-block map: the same for any scores."""
    mask = select_blocks(torch.zeros(num_blocks, num_blocks), MaskPolicy(sparsity=sparsity))
    return achieved_sparsity(mask)


# Scores from post-RoPE q, k alone; attention scaling is 1/sqrt(d) in every supported family.
_SCORES = {"oracle-mass": block_attention_mass, "sink+local": _sink_local}


@contextlib.contextmanager
def attached(prefill: SparsePrefill | None):
    """Yield ``prefill`` (already attached on creation; None for dense) and detach it after."""
    try:
        yield prefill
    finally:
        if prefill is not None:
            prefill.detach()


class ScoredPrefill(SparsePrefill):
    """Sparse prefill whose block scores come from ``score(q, k)`` on the post-RoPE queries and
    keys (`[b, Hq, s, d]`, `[b, Hkv, s, d]` → `[b, Hq, nb, nb]`) instead of gates."""

    def __init__(self, model, policy: MaskPolicy, score: Callable):
        self.score = score
        super().__init__(model, policy, gates=None)

    def _scores(self, layer_idx: int, q, k) -> torch.Tensor:
        return self.score(q, k)


class RecallProbe(SparsePrefill):
    """Dense attention that measures, layer by layer, how much of the true attention mass each
    estimator's block selection keeps at each sparsity, then lets the maps go.

    Attached on creation; run ``window(ids)`` for each window, read ``recall`` (estimator,
    sparsity) → one value per layer and window, and ``detach()`` when done.
    """

    def __init__(self, model, gates: torch.nn.ModuleList, sparsities: list[float]):
        # The policy is not used: ``attend`` applies every sparsity to every estimator.
        super().__init__(model, MaskPolicy(sparsity=0.0), gates)
        self.sparsities = sparsities
        self.recall: dict[tuple[str, float], list[float]] = defaultdict(list)

    @torch.inference_mode()
    def window(self, ids: torch.Tensor) -> None:
        """One dense forward pass over ids `[s]`, measuring every layer."""
        self.model.model(input_ids=ids[None].to(self.model.device), use_cache=False)

    def attend(self, layer_idx: int, q, k, v, scaling: float | None) -> torch.Tensor:
        if attention_kernel(q.device) == "triton":
            out, maxpool = pooled_attention(q, k, v, scaling)
        else:
            out, maxpool = pooled_attention_reference(q, k, v, scaling)
        mass = block_attention_mass(q, k, scaling)
        estimates = {
            "gates": self._scores(layer_idx, q, k),
            "oracle-mass": mass,
            "oracle-maxpool": maxpool,
            "pooled": pooled_qk_scores(q, k),
            "sink+local": _sink_local(q, k),
        }
        for key, value in selection_recall(mass, estimates, self.sparsities).items():
            self.recall[key].append(value)
        return out


# ---------------------------------------------------------------- perplexity


@torch.inference_mode()
def token_nll(model, ids: torch.Tensor, chunk: int = LM_HEAD_CHUNK) -> torch.Tensor:
    """Summed next-token cross-entropy (float32 scalar) of ids `[1, s]`: positions 0..s-2
    predicting 1..s-1.

    The hidden states go through the LM head ``chunk`` positions at a time, so that no
    `[s, vocab]` float32 logits tensor is ever whole.
    """
    ids = ids.to(model.device)
    hidden = model.model(input_ids=ids, use_cache=False).last_hidden_state[0, :-1]  # [s-1, h]
    targets = ids[0, 1:]
    total = torch.zeros((), dtype=torch.float32, device=ids.device)
    for start in range(0, targets.shape[0], chunk):
        logits = model.lm_head(hidden[start : start + chunk]).float()  # [chunk, vocab]
        total += F.cross_entropy(logits, targets[start : start + chunk], reduction="sum")
    return total


def perplexity(model, windows: list[torch.Tensor], chunk: int = LM_HEAD_CHUNK) -> float:
    """exp of the mean next-token cross-entropy over all tokens of all windows (each `[s]`)."""
    total = sum(float(token_nll(model, window[None], chunk)) for window in windows)
    return math.exp(total / sum(len(window) - 1 for window in windows))


@dataclass
class SparsePolicy:
    """A block selection to evaluate: an estimator (one of ``ESTIMATORS``) and a mask policy."""

    estimator: str
    mask: MaskPolicy

    def attach(self, model, gates: torch.nn.ModuleList) -> SparsePrefill:
        """Sparse prefill on ``model`` by this policy, at every prompt length (no dense
        fallback for short prompts); ``detach()`` it when done."""
        if self.estimator == "gates":
            return SparsePrefill(model, self.mask, gates)
        if self.estimator == "pooled":
            return SparsePrefill(model, self.mask, None)
        return ScoredPrefill(model, self.mask, _SCORES[self.estimator])


def perplexity_policies(sparsities: list[float], thresholds: list[float]) -> list[SparsePolicy]:
    """Every perplexity estimator at each sparsity, then the gates at each threshold."""
    policies = [
        SparsePolicy(estimator, MaskPolicy(sparsity=sparsity))
        for sparsity in sparsities
        for estimator in PERPLEXITY_ESTIMATORS
    ]
    policies += [SparsePolicy("gates", MaskPolicy(threshold=t)) for t in thresholds]
    return policies


# ---------------------------------------------------------------- passkey retrieval


def _render(tokenizer, document: str, length: int) -> list[int]:
    """The passkey prompt of ``document`` and ``QUESTION``, its document cut at the end to fit."""
    prompt = build_prompt(
        tokenizer, document=document, instruction=QUESTION, system=None,
        max_prompt_tokens=length, truncate="end",
    )  # fmt: skip
    return prompt.ids


def _template_head(tokenizer, length: int) -> int:
    """Tokens that the chat template puts before the document: where two prompts that differ
    only in their document part ways."""
    first, second = (_render(tokenizer, text, length) for text in ("a", "b"))
    return next(
        (i for i, (x, y) in enumerate(zip(first, second, strict=False)) if x != y), len(first)
    )


def passkey_prompt(tokenizer, filler_ids: list[int], key: str, depth: float, length: int):
    """Prompt ids (at most ``length``, a few tokens fewer after re-tokenizing) asking for the
    pass key hidden in filler text from ``filler_ids``: the needle starts near token
    ``depth · length`` of the prompt, and ``QUESTION`` follows the filler."""
    needle = NEEDLE.format(key=key)
    room = length - len(_render(tokenizer, needle, length)) - _SEAM_SLACK
    if room < 0:
        raise SeerError(f"{length} tokens leave no room for filler around the passkey question.")
    before = min(max(round(depth * length) - _template_head(tokenizer, length), 0), room)
    parts = (
        tokenizer.decode(filler_ids[:before]),
        needle,
        tokenizer.decode(filler_ids[before:room]),
    )
    return _render(tokenizer, " ".join(part for part in parts if part), length)


def passkey_answer(text: str) -> str | None:
    """The first number in a generated answer, as its digits."""
    match = re.search(r"\d+", text)
    return match.group() if match else None


@dataclass
class PasskeyPrompt:
    ids: list[int]
    key: str
    depth: float


def passkey_prompts(
    tokenizer, filler_ids: list[int], depths: list[float], trials: int, length: int, seed: int
) -> list[PasskeyPrompt]:
    """``trials`` prompts per depth, each with its own random 5-digit key drawn from ``seed``."""
    rng = random.Random(seed)
    prompts = []
    for depth in depths:
        for _ in range(trials):
            key = str(rng.randint(10000, 99999))
            ids = passkey_prompt(tokenizer, filler_ids, key, depth, length)
            prompts.append(PasskeyPrompt(ids, key, depth))
    return prompts


# ---------------------------------------------------------------- results and the evaluation


@dataclass
class PerplexityRow:
    """``policy`` is ``dense`` or an estimator; ``sparsity``/``threshold`` the requested one."""

    policy: str
    sparsity: float | None
    threshold: float | None
    achieved_sparsity: float
    perplexity: float
    delta_percent: float | None = None  # relative to dense


@dataclass
class RecallRow:
    sparsity: float
    achieved_sparsity: float
    recall: dict[str, float]  # estimator → mean recall over rows, heads, layers and windows
    gates_vs_oracle_maxpool: float


@dataclass
class PasskeyRow:
    """``policy`` is ``dense`` or ``gates`` at ``sparsity``."""

    policy: str
    sparsity: float | None
    depth: float
    correct: int
    trials: int
    answers: list[str]

    @property
    def accuracy(self) -> float:
        return self.correct / self.trials


@dataclass
class EvalReport:
    """Everything ``seer eval`` measured, with what it was measured on."""

    model: str
    gates: str
    device: str
    dtype: str
    seq_len: int
    windows: int
    data_files: list[str]
    perplexity: list[PerplexityRow] = field(default_factory=list)
    recall: list[RecallRow] = field(default_factory=list)
    passkey: list[PasskeyRow] = field(default_factory=list)
    passkey_tokens: int | None = None
    seconds: float = 0.0

    def to_dict(self) -> dict:
        data = asdict(self)
        for row, row_data in zip(self.passkey, data["passkey"], strict=True):
            row_data["accuracy"] = row.accuracy
        return data


class Evaluation:
    """One loaded model, its gates and token windows (each `[s]`, all of one length).

    Each measurement attaches the sparse prefill it needs and takes it off again, so the model
    is loaded once for all of them. ``progress(done, total)`` is called as work completes.
    """

    def __init__(self, model, tokenizer, gates: torch.nn.ModuleList, windows: list[torch.Tensor]):
        self.model = model
        self.tokenizer = tokenizer
        self.gates = gates
        self.windows = windows

    @property
    def passkey_tokens(self) -> int:
        """Passkey prompt length: a window, less room for the answer if the context needs it."""
        context = self.model.config.max_position_embeddings
        return min(len(self.windows[0]), context - ANSWER_TOKENS)

    def perplexity(
        self, sparsities: list[float], thresholds: list[float], progress: Progress = _no_progress
    ) -> list[PerplexityRow]:
        """Dense first, then every policy of ``perplexity_policies``; Δ% relative to dense."""
        policies = [None, *perplexity_policies(sparsities, thresholds)]
        rows = []
        for done, policy in enumerate(policies, start=1):
            rows.append(self._perplexity_row(policy))
            progress(done, len(policies))
        dense = rows[0].perplexity
        for row in rows[1:]:
            row.delta_percent = 100 * (row.perplexity / dense - 1)
        return rows

    def _perplexity_row(self, policy: SparsePolicy | None) -> PerplexityRow:
        if policy is None:
            return PerplexityRow("dense", None, None, 0.0, perplexity(self.model, self.windows))
        with attached(policy.attach(self.model, self.gates)) as prefill:
            value = perplexity(self.model, self.windows)
        mask = policy.mask
        achieved = prefill.stats.overall()
        return PerplexityRow(policy.estimator, mask.sparsity, mask.threshold, achieved, value)

    def recall(self, sparsities: list[float], progress: Progress = _no_progress) -> list[RecallRow]:
        """Recall of every estimator at each sparsity, averaged over layers and windows."""
        with attached(RecallProbe(self.model, self.gates, sparsities)) as probe:
            for done, window in enumerate(self.windows, start=1):
                probe.window(window)
                progress(done, len(self.windows))
        rows = []
        for sparsity in sparsities:
            recall = {name: _mean(probe.recall[name, sparsity]) for name in ESTIMATORS}
            achieved = topk_sparsity(block_count(len(self.windows[0])), sparsity)
            ratio = recall["gates"] / recall["oracle-maxpool"]
            rows.append(RecallRow(sparsity, achieved, recall, ratio))
        return rows

    def passkey(
        self,
        depths: list[float],
        trials: int,
        sparsities: list[float],
        seed: int,
        progress: Progress = _no_progress,
    ) -> list[PasskeyRow]:
        """Greedy answers to passkey prompts, dense and with the gates at each sparsity; the
        filler text is the first window's."""
        filler = self.windows[0].tolist()
        prompts = passkey_prompts(self.tokenizer, filler, depths, trials, self.passkey_tokens, seed)
        policies = [None, *sparsities]
        total, rows = len(prompts) * len(policies), []
        for index, sparsity in enumerate(policies):
            prefill = None
            if sparsity is not None:
                prefill = SparsePrefill(self.model, MaskPolicy(sparsity=sparsity), self.gates)
            answers = []
            with attached(prefill):
                for prompt in prompts:
                    answers.append(self._answer(prompt))
                    progress(index * len(prompts) + len(answers), total)
            rows += _passkey_rows(prompts, answers, sparsity, trials)
        return rows

    def _answer(self, prompt: PasskeyPrompt) -> str:
        options = SamplingOptions(max_tokens=ANSWER_TOKENS)
        return generate(self.model, self.tokenizer, prompt.ids, options).text


def _passkey_rows(
    prompts: list[PasskeyPrompt], answers: list[str], sparsity: float | None, trials: int
) -> list[PasskeyRow]:
    """One row per depth: ``prompts`` hold ``trials`` consecutive prompts for each depth."""
    policy = "dense" if sparsity is None else "gates"
    rows = []
    for first in range(0, len(prompts), trials):
        group = slice(first, first + trials)
        correct = sum(
            passkey_answer(answer) == prompt.key
            for prompt, answer in zip(prompts[group], answers[group], strict=True)
        )
        depth = prompts[first].depth
        rows.append(PasskeyRow(policy, sparsity, depth, correct, trials, answers[group]))
    return rows


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)
