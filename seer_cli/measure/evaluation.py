"""Measuring sparse prefill against dense attention on the user's texts: perplexity, attention
recall of block selections at equal sparsity, and passkey retrieval; for windows longer than the
model's native context, the context extension itself against the native context. The library
behind ``seer eval`` (no typer, no rich):

evaluation = Evaluation(model, tokenizer, gates, windows)
rows = evaluation.perplexity(sparsities=[0.5, 0.9], thresholds=[0.003])

Every measurement runs its windows with the RoPE that ``ModelContext`` picks for their length
(scaled past the native context, as ``seer generate`` would run them).

Shapes: b batch, s tokens, nb = ceil(s / 64) blocks, Hq query heads, Hkv key/value heads,
d head dim.
"""

import contextlib
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from seer_gates import MaskPolicy, block_count

from ..engine.attention import SparsePrefill
from ..engine.context import ContextSettings, ModelContext, RopeScaling
from ..engine.generation import SamplingOptions, generate
from .estimators import ESTIMATORS, LOCAL_ESTIMATORS, PERPLEXITY_ESTIMATORS
from .passkey import ANSWER_TOKENS, PasskeyPrompt, passkey_answer, passkey_prompts
from .selection import POST_ROPE_SCORES, RecallProbe, ScoredPrefill, attached, topk_sparsity

LM_HEAD_CHUNK = 1024

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


# ---------------------------------------------------------------- perplexity


@torch.inference_mode()
def token_nll(
    model, ids: torch.Tensor, chunk: int = LM_HEAD_CHUNK, tail: int | None = None
) -> torch.Tensor:
    """Summed next-token cross-entropy (float32 scalar) of ids `[1, s]`: positions 0..s-2
    predicting 1..s-1, or with ``tail`` only the last ``tail`` of those predictions.

    The hidden states go through the LM head ``chunk`` positions at a time, so that no
    `[s, vocab]` float32 logits tensor is ever whole.
    """
    ids = ids.to(model.device)
    hidden = model.model(input_ids=ids, use_cache=False).last_hidden_state[0, :-1]  # [s-1, h]
    targets = ids[0, 1:]
    if tail is not None:
        hidden, targets = hidden[-tail:], targets[-tail:]
    total = torch.zeros((), dtype=torch.float32, device=ids.device)
    for start in range(0, targets.shape[0], chunk):
        logits = model.lm_head(hidden[start : start + chunk]).float()  # [chunk, vocab]
        total += F.cross_entropy(logits, targets[start : start + chunk], reduction="sum")
    return total


def perplexity(
    model, windows: list[torch.Tensor], chunk: int = LM_HEAD_CHUNK, tail: int | None = None
) -> float:
    """exp of the mean next-token cross-entropy over all tokens of all windows (each `[s]`), or
    over the last ``tail`` predicted tokens of each."""
    total = sum(float(token_nll(model, window[None], chunk, tail)) for window in windows)
    return math.exp(total / sum(min(len(window) - 1, tail or len(window)) for window in windows))


@dataclass
class SparsePolicy:
    """A block selection to evaluate: an estimator (one of ``ESTIMATORS``) and a mask policy."""

    estimator: str
    mask: MaskPolicy

    @property
    def label(self) -> str:
        """The estimator, its local window if any and a layer budget: ``gates+local4/layer``."""
        local = self.mask.local_blocks
        label = f"{self.estimator}+local{local}" if local else self.estimator
        return f"{label}/layer" if self.mask.budget == "layer" else label

    def attach(self, model, gates: torch.nn.ModuleList) -> SparsePrefill:
        """Sparse prefill on ``model`` by this policy, at every prompt length (no dense
        fallback for short prompts); ``detach()`` it when done."""
        if self.estimator == "gates":
            return SparsePrefill(model, self.mask, gates)
        if self.estimator == "pooled":
            return SparsePrefill(model, self.mask, None)
        return ScoredPrefill(model, self.mask, POST_ROPE_SCORES[self.estimator])


def perplexity_policies(
    sparsities: list[float],
    thresholds: list[float],
    local_blocks: Sequence[int] = (0,),
    estimators: Sequence[str] = PERPLEXITY_ESTIMATORS,
    budgets: Sequence[str] = ("row",),
    gate_rank_power: float = 1.0,
) -> list[SparsePolicy]:
    """Each of ``estimators`` (of ``PERPLEXITY_ESTIMATORS``) at each sparsity, those of
    ``LOCAL_ESTIMATORS`` once per local window of ``local_blocks`` (0: none) and per budget of
    ``budgets`` (``MaskPolicy.budget``; the gates rank by ``gate_rank_power``, their file's),
    then the gates (when among them) at each threshold."""
    policies = [
        SparsePolicy(
            estimator,
            MaskPolicy(
                sparsity=sparsity,
                local_blocks=local,
                budget=budget,
                rank_power=gate_rank_power if estimator == "gates" else 1.0,
            ),
        )  # fmt: skip
        for sparsity in sparsities
        for estimator in PERPLEXITY_ESTIMATORS
        if estimator in estimators
        for local in (local_blocks if estimator in LOCAL_ESTIMATORS else (0,))
        for budget in (budgets if estimator in LOCAL_ESTIMATORS else ("row",))
    ]
    if "gates" in estimators:
        policies += [SparsePolicy("gates", MaskPolicy(threshold=t)) for t in thresholds]
    return policies


# ---------------------------------------------------------------- results and the evaluation


@dataclass
class PerplexityRow:
    """``policy`` is ``dense`` or a ``SparsePolicy.label``; ``sparsity``/``threshold`` the
    requested one."""

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
class ContextRow:
    """Dense tail perplexity with ``tokens`` of context read with the RoPE ``rope``."""

    label: str
    tokens: int
    rope: str
    perplexity: float
    delta_percent: float | None = None  # relative to the native context


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
    rope: str = "native"  # the RoPE of whole windows: native, or the context extension's
    # The same RoPE in fields named after llama.cpp's flags (context.scaling_fields).
    scaling: dict = field(default_factory=dict)
    tail_tokens: int | None = None  # perplexity over each window's last tokens (None: all)
    context: list[ContextRow] = field(default_factory=list)
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
    ``context`` sets the RoPE by length (default: the model's native context only); perplexity
    counts the last ``tail`` predicted tokens of each window (default all).
    """

    def __init__(
        self,
        model,
        tokenizer,
        gates: torch.nn.ModuleList,
        windows: list[torch.Tensor],
        context: ModelContext | None = None,
        tail: int | None = None,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.gates = gates
        self.windows = windows
        self.context = context or ModelContext(model, "the model", ContextSettings())
        self.tail = tail

    @property
    def seq_len(self) -> int:
        return len(self.windows[0])

    @property
    def passkey_tokens(self) -> int:
        """Passkey prompt length: a window, less room for the answer if the context needs it."""
        return min(self.seq_len, self.context.size - ANSWER_TOKENS)

    def scaling(self) -> RopeScaling | None:
        """The RoPE scaling whole windows run with (None: the model's own)."""
        return self.context.scaling_for(self.seq_len)

    def context_baseline(self, progress: Progress = _no_progress) -> list["ContextRow"]:
        """Dense tail perplexity of the windows with only their last native-context tokens
        (native RoPE, then scaled), and whole (scaled); Δ% relative to the first. The windows
        must be longer than the native context."""
        native, scaled = self.context.native, self.context.scaling_for(self.seq_len)
        tail = self.tail or native - 1
        tails = [window[-native:] for window in self.windows]
        runs = [
            (f"the last {native} tokens", tails, None),
            (f"the last {native} tokens", tails, scaled),
            (f"the whole {self.seq_len}", self.windows, scaled),
        ]
        rows = []
        for done, (label, windows, scaling) in enumerate(runs, start=1):
            self.context.use(scaling)
            value = perplexity(self.model, windows, tail=tail)
            rows.append(ContextRow(label, len(windows[0]), str(scaling or "native"), value))
            progress(done, len(runs))
        for row in rows[1:]:
            row.delta_percent = 100 * (row.perplexity / rows[0].perplexity - 1)
        return rows

    def perplexity(
        self,
        sparsities: list[float],
        thresholds: list[float],
        progress: Progress = _no_progress,
        local_blocks: Sequence[int] = (0,),
        estimators: Sequence[str] = PERPLEXITY_ESTIMATORS,
        budgets: Sequence[str] = ("row",),
        gate_rank_power: float = 1.0,
    ) -> list[PerplexityRow]:
        """Dense first, then every policy of ``perplexity_policies``; Δ% relative to dense."""
        self.context.apply(self.seq_len)
        policies = [
            None,
            *perplexity_policies(
                sparsities, thresholds, local_blocks, estimators, budgets, gate_rank_power
            ),
        ]
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
            value = perplexity(self.model, self.windows, tail=self.tail)
            return PerplexityRow("dense", None, None, 0.0, value)
        with attached(policy.attach(self.model, self.gates)) as prefill:
            value = perplexity(self.model, self.windows, tail=self.tail)
        mask = policy.mask
        achieved = prefill.stats.overall()
        return PerplexityRow(policy.label, mask.sparsity, mask.threshold, achieved, value)

    def recall(self, sparsities: list[float], progress: Progress = _no_progress) -> list[RecallRow]:
        """Recall of every estimator at each sparsity, averaged over layers and windows."""
        self.context.apply(self.seq_len)
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
        self.context.apply(self.passkey_tokens + ANSWER_TOKENS)
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
