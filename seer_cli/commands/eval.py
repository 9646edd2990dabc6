"""``seer eval``: what sparse prefill costs, measured on the user's texts with one loaded model.

On non-overlapping windows of ``--seq-len`` tokens (past the model's native context read with
the RoPE scaling of ``--ctx-size``, ``--rope-scaling``, … as ``seer generate`` reads them):

- context, for windows longer than the native context: dense perplexity of each window's last
  ``--tail`` tokens given only the last native-context tokens (native RoPE, then scaled) and
  given the whole window (scaled), so the extension is measured against the native context;
- perplexity (of the last ``--tail`` tokens of each window), dense and sparse: the learned
  gates, the true-attention-mass oracle, the pooled estimator and a sink + local window at
  each of ``--sparsities`` (the gates and the pooled estimator also with each forced local
  window of ``--local-blocks``, rows ``gates+local4``, …), the gates at each of
  ``--thresholds``, with the sparsity each achieved;
- attention recall at equal sparsity: the share of the true attention mass inside the blocks
  kept by the gates, two oracles and two training-free baselines;
- passkey retrieval: a 5-digit key hidden at each of ``--depths`` of filler text from the data,
  answered dense and with the gates at each of ``--passkey-sparsities``.

stdout holds the tables (markdown), or with ``--json`` one JSON object; progress and notes go to
stderr.
"""

import json
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from .. import options as opt
from ..console import handle_user_errors, stderr, write_product
from ..engine.errors import SeerError
from ..measure.estimators import ESTIMATORS, PERPLEXITY_ESTIMATORS

if TYPE_CHECKING:
    from ..measure.evaluation import EvalReport

TASKS = ("context", "perplexity", "recall", "passkey")
# Windows longer than the native context: perplexity of this many last tokens (as in EVAL.md).
LONG_CONTEXT_TAIL = 4096


@handle_user_errors
def evaluate(
    data: Annotated[
        list[str],
        typer.Option("--data", help="Text file or folder to evaluate on ('-' for stdin); repeat."),
    ],
    model: opt.Model = None,
    gates: Annotated[
        str,
        typer.Option(
            "--gates",
            envvar="SEER_GATES",
            help="The learned gates: 'auto' (shipped for the model), a gate file or a published "
            "gates folder.",
        ),
    ] = "auto",
    seq_len: Annotated[int, typer.Option("--seq-len", help="Tokens per window.")] = 8192,
    max_windows: Annotated[
        int, typer.Option("--max-windows", help="Evaluate on at most this many windows.")
    ] = 3,
    sparsities: Annotated[
        str, typer.Option("--sparsities", help="Comma-separated sparsities (perplexity, recall).")
    ] = "0.5,0.7,0.8,0.9,0.95",
    thresholds: Annotated[
        str,
        typer.Option(
            "--thresholds",
            help="Comma-separated gate thresholds, multiples of a row's average score "
            "(perplexity).",
        ),
    ] = "0.5,1,2",
    estimators: Annotated[
        str | None,
        typer.Option(
            "--estimators",
            help="Comma-separated block selections for the perplexity task: gates, oracle-mass, "
            "pooled, sink+local (default: all).",
        ),
    ] = None,
    local_blocks: Annotated[
        str,
        typer.Option(
            "--local-blocks",
            help="Comma-separated local windows for the gates and the pooled estimator at each "
            "sparsity: the key blocks before each row's own block always kept, inside the "
            "budget (perplexity; 0: none).",
        ),
    ] = "0",
    budgets: Annotated[
        str,
        typer.Option(
            "--budgets",
            help="Comma-separated ways the gates and the pooled estimator spend each sparsity: "
            "row, layer (perplexity; see seer generate --budget).",
        ),
    ] = "row",
    depths: Annotated[
        str, typer.Option("--depths", help="Comma-separated passkey depths, shares of the prompt.")
    ] = "0.1,0.5,0.9",
    trials: Annotated[int, typer.Option("--trials", help="Passkey prompts per depth.")] = 2,
    passkey_sparsities: Annotated[
        str, typer.Option("--passkey-sparsities", help="Comma-separated sparsities (passkey).")
    ] = "0.5,0.9",
    tasks: Annotated[
        str | None,
        typer.Option(
            "--tasks",
            help="Comma-separated: context, perplexity, recall, passkey (default: all; context "
            "only for windows longer than the native context).",
        ),
    ] = None,
    tail: Annotated[
        int | None,
        typer.Option(
            "--tail",
            help=f"Perplexity of each window's last N tokens (default: all within the native "
            f"context, the last {LONG_CONTEXT_TAIL} past it).",
        ),
    ] = None,
    ctx_size: opt.CtxSize = None,
    rope_scaling: opt.RopeScaling = None,
    rope_scale: opt.RopeScale = None,
    yarn_orig_ctx: opt.YarnOrigCtx = None,
    yarn_attn_factor: opt.YarnAttnFactor = None,
    yarn_beta_fast: opt.YarnBetaFast = None,
    yarn_beta_slow: opt.YarnBetaSlow = None,
    seed: Annotated[
        int, typer.Option("--seed", help="Seed for the choice of windows and the pass keys.")
    ] = 0,
    device: opt.Device = "auto",
    device_map: opt.DeviceMap = None,
    max_memory: opt.MaxMemory = None,
    dtype: opt.Dtype = "auto",
    json_output: Annotated[
        bool, typer.Option("--json", help="Print one JSON object instead of the tables.")
    ] = False,
    quiet: opt.Quiet = False,
) -> None:
    """Measure sparse prefill against dense attention: perplexity, attention recall, passkey."""
    chosen = _choice("--tasks", tasks, TASKS)
    estimator_list = _choice("--estimators", estimators, PERPLEXITY_ESTIMATORS)
    context_settings = opt.context_settings(
        ctx_size, rope_scaling, rope_scale, yarn_orig_ctx, yarn_attn_factor, yarn_beta_fast,
        yarn_beta_slow,
    )  # fmt: skip
    sparsity_list = _fractions("--sparsities", sparsities)
    threshold_list = _thresholds(thresholds)
    local_list = _local_blocks(local_blocks)
    from seer_gates.policy import BUDGETS

    budget_list = _choice("--budgets", budgets, BUDGETS)
    depth_list = _fractions("--depths", depths, up_to_one=True)
    passkey_list = _fractions("--passkey-sparsities", passkey_sparsities)
    _check_flags(chosen, sparsity_list, depth_list, gates, seq_len, max_windows, trials)
    if tail is not None and not 1 <= tail < seq_len:
        raise SeerError(f"--tail must be in [1, --seq-len), got {tail}.")

    import torch
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from ..engine.context import ModelContext, scaling_fields
    from ..engine.data import token_windows
    from ..engine.models import load_model, resolve_model
    from ..engine.placement import Placement
    from ..engine.runtime import (
        check_gate_option,
        load_model_gates,
        pick_device,
        pick_dtype,
        resolve_gate_path,
    )
    from ..measure.evaluation import EvalReport, Evaluation, kernels_for
    from ..progress import quiet_libraries

    quiet_libraries()
    started = time.perf_counter()
    placement = Placement.parse(device_map, max_memory)
    torch_device = pick_device(device, placement)
    torch_dtype = pick_dtype(dtype, torch_device)
    source = resolve_model(model)
    check_gate_option(gates)
    loaded, tokenizer = load_model(source, torch_device, torch_dtype, placement)
    context = ModelContext(loaded, source.name, context_settings)
    chosen, tail = _long_context(chosen, tasks is None, tail, seq_len, context, source.name)
    # 'auto' picks the gates `seer generate` scores a prompt of this length with.
    window_scaling = context.scaling_for(seq_len)
    gate_path = resolve_gate_path(
        gates, loaded, source.name, window_scaling.kind if window_scaling else "none"
    )
    gate_config, trained_gates = load_model_gates(gate_path, loaded, source.name, torch_device)
    windows, summary = token_windows(tokenizer, data, seq_len, max_windows, seed, min_windows=1)
    evaluation = Evaluation(loaded, tokenizer, trained_gates, windows, context, tail)
    scaling = evaluation.scaling()
    report = EvalReport(
        model=source.name, gates=gate_path, device=str(torch_device),
        dtype=str(torch_dtype).removeprefix("torch."), seq_len=seq_len, windows=len(windows),
        data_files=summary["data_files"], rope=str(scaling or "native"),
        scaling=scaling_fields(scaling), tail_tokens=tail,
    )  # fmt: skip
    if not quiet:
        _print_plan(report, torch_dtype == torch.float32 and torch_device.type == "cuda")

    progress = Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
        console=stderr, transient=True, disable=quiet,
    )  # fmt: skip

    def tracker(description: str):
        task = progress.add_task(description, total=None)
        return lambda done, total: progress.update(task, completed=done, total=total)

    with progress, kernels_for(torch_dtype, torch_device):
        if "context" in chosen:
            report.context = evaluation.context_baseline(tracker("context"))
        if "perplexity" in chosen:
            report.perplexity = evaluation.perplexity(
                sparsity_list,
                threshold_list,
                tracker("perplexity"),
                local_list,
                estimator_list,
                budget_list,
                gate_config.layer_rank_power,
            )
        if "recall" in chosen:
            report.recall = evaluation.recall(sparsity_list, tracker("recall"))
        if "passkey" in chosen:
            report.passkey_tokens = evaluation.passkey_tokens
            report.passkey = evaluation.passkey(
                depth_list, trials, passkey_list, seed, tracker("passkey")
            )
    report.seconds = round(time.perf_counter() - started, 1)
    write_product(json.dumps(report.to_dict()) + "\n" if json_output else _markdown(report))
    if not quiet:
        stderr.print(f"Evaluated in {report.seconds:.1f} s")


# ---------------------------------------------------------------- flags


def _choice(flag: str, text: str | None, allowed: tuple[str, ...]) -> list[str]:
    """Comma-separated names of ``allowed``, once each, at least one; None is all of them."""
    if text is None:
        return list(allowed)
    names = list(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))
    unknown = [name for name in names if name not in allowed]
    if unknown or not names:
        raise SeerError(
            f"{flag} takes a comma-separated choice of {', '.join(allowed)}, got {text!r}."
        )
    return names


def _fractions(flag: str, text: str, *, up_to_one: bool = False) -> list[float]:
    """Comma-separated numbers in [0, 1), or [0, 1] with ``up_to_one``, once each; '' is none."""
    try:
        values = list(dict.fromkeys(float(part) for part in text.split(",") if part.strip()))
    except ValueError:
        raise SeerError(f"{flag} takes comma-separated numbers, got {text!r}.") from None
    for value in values:
        if not (0 <= value < 1 or (up_to_one and value == 1)):
            interval = "[0, 1]" if up_to_one else "[0, 1)"
            raise SeerError(f"{flag} values must be in {interval}, got {value}.")
    return values


def _thresholds(text: str) -> list[float]:
    """Comma-separated finite numbers, 0 or more, once each; '' is none."""
    try:
        values = list(dict.fromkeys(float(part) for part in text.split(",") if part.strip()))
    except ValueError:
        raise SeerError(f"--thresholds takes comma-separated numbers, got {text!r}.") from None
    for value in values:
        if not 0 <= value < math.inf:
            raise SeerError(f"--thresholds values must be finite and 0 or more, got {value}.")
    return values


def _local_blocks(text: str) -> list[int]:
    """Comma-separated whole numbers, 0 or more, once each; at least one."""
    try:
        values = list(dict.fromkeys(int(part) for part in text.split(",") if part.strip()))
    except ValueError:
        raise SeerError(
            f"--local-blocks takes comma-separated whole numbers, got {text!r}."
        ) from None
    if not values:
        raise SeerError("--local-blocks needs at least one value (0: no local window).")
    for value in values:
        if value < 0:
            raise SeerError(f"--local-blocks values must be 0 or more, got {value}.")
    return values


def _check_flags(tasks, sparsities, depths, gates, seq_len, max_windows, trials) -> None:
    """Refuse nonsense values before any model is loaded, one sentence each."""
    if not sparsities and ("perplexity" in tasks or "recall" in tasks):
        raise SeerError("--sparsities needs at least one value for perplexity and recall.")
    if not depths and "passkey" in tasks:
        raise SeerError("--depths needs at least one value for passkey retrieval.")
    if gates == "pooled":
        raise SeerError(
            "--gates takes the learned gates ('auto' or a file); "
            "the pooled estimator is always measured beside them."
        )
    if seq_len < 128:
        raise SeerError(f"--seq-len must be at least 128 tokens, got {seq_len}.")
    if max_windows < 1:
        raise SeerError(f"--max-windows must be at least 1, got {max_windows}.")
    if trials < 1:
        raise SeerError(f"--trials must be at least 1, got {trials}.")


def _long_context(chosen, by_default: bool, tail, seq_len: int, context, name: str):
    """The tasks and tail for windows of ``seq_len`` under ``context``: the context task only
    for windows past the native context (asked for explicitly, anything else is an error), and
    the default tail past it."""
    if seq_len > context.size:
        raise SeerError(
            f"--seq-len {seq_len} is longer than the context of {name} ({context.size} tokens, "
            "--ctx-size)."
        )
    if seq_len <= context.native:
        if "context" in chosen and not by_default:
            raise SeerError(
                f"--tasks context compares windows longer than the native context of {name} "
                f"({context.native} tokens) with their last {context.native}; --seq-len "
                f"{seq_len} is not longer."
            )
        return [task for task in chosen if task != "context"], tail
    if tail is None:
        tail = min(LONG_CONTEXT_TAIL, context.native - 1)
    elif tail >= context.native:
        raise SeerError(
            f"--tail {tail} must be shorter than the native context ({context.native} tokens), "
            "which the context task compares with."
        )
    return chosen, tail


# ---------------------------------------------------------------- output


def _print_plan(report: "EvalReport", reference_kernels: bool) -> None:
    stderr.print(
        f"Evaluating {report.model} with gates {Path(report.gates).name} on {report.windows} "
        f"windows of {report.seq_len} tokens from {', '.join(report.data_files)} "
        f"({report.device}, {report.dtype}; RoPE {report.rope})",
        soft_wrap=True,
    )
    if reference_kernels:
        stderr.print(
            "float32 on a GPU: sparse and pooled attention run their PyTorch references "
            "(the Triton kernels take float16 or bfloat16)",
            soft_wrap=True,
        )


def _markdown(report: "EvalReport") -> str:
    """The report as markdown: a line saying what was measured, then one table per task."""
    sections = [
        f"**{report.model}**, gates {Path(report.gates).name}: {report.windows} windows × "
        f"{report.seq_len} tokens of {', '.join(report.data_files)} "
        f"({report.device}, {report.dtype}; RoPE {report.rope})"
    ]
    tail = f" of each window's last {report.tail_tokens} tokens" if report.tail_tokens else ""
    if report.context:
        sections.append(
            f"## Context extension\n\nDense perplexity{tail}, by what the model sees.\n\n"
            + _context_table(report)
        )
    if report.perplexity:
        intro = f"Perplexity{tail}.\n\n" if tail else ""
        sections.append("## Perplexity\n\n" + intro + _perplexity_table(report))
    if report.recall:
        sections.append(
            "## Attention recall at equal sparsity\n\n"
            "Share of the true attention mass inside the kept blocks, averaged over block rows, "
            "heads, layers and windows.\n\n" + _recall_table(report)
        )
    if report.passkey:
        trials = report.passkey[0].trials
        sections.append(
            f"## Passkey retrieval\n\nCorrect answers out of {trials} per depth, prompts of "
            f"{report.passkey_tokens} tokens.\n\n" + _passkey_table(report)
        )
    return "\n\n".join(sections) + "\n"


def _table(header: list[str], rows: list[list[str]]) -> str:
    """A markdown table, the first column left-aligned and the others right-aligned."""
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _setting(sparsity: float | None, threshold: float | None = None) -> str:
    if sparsity is not None:
        return f"s={sparsity:.2f}"
    return f"τ={threshold:g}" if threshold is not None else "—"


def _perplexity_table(report: "EvalReport") -> str:
    header = ["policy", "setting", "achieved sparsity", "perplexity", "Δ vs dense"]
    rows = [
        [
            row.policy,
            _setting(row.sparsity, row.threshold),
            f"{row.achieved_sparsity:.3f}",
            f"{row.perplexity:.3f}",
            "—" if row.delta_percent is None else f"{row.delta_percent:+.1f} %",
        ]
        for row in report.perplexity
    ]
    return _table(header, rows)


def _context_table(report: "EvalReport") -> str:
    header = ["what the model sees", "RoPE", "perplexity", "Δ vs native"]
    rows = [
        [
            row.label,
            row.rope,
            f"{row.perplexity:.3f}",
            "—" if row.delta_percent is None else f"{row.delta_percent:+.1f} %",
        ]
        for row in report.context
    ]
    return _table(header, rows)


def _recall_table(report: "EvalReport") -> str:
    header = ["sparsity", "achieved", *ESTIMATORS, "gates / oracle-maxpool"]
    rows = [
        [
            f"{row.sparsity:.2f}",
            f"{row.achieved_sparsity:.3f}",
            *(f"{row.recall[name]:.3f}" for name in ESTIMATORS),
            f"{row.gates_vs_oracle_maxpool:.3f}",
        ]
        for row in report.recall
    ]
    return _table(header, rows)


def _passkey_table(report: "EvalReport") -> str:
    policies = list(dict.fromkeys((row.policy, row.sparsity) for row in report.passkey))
    depths = list(dict.fromkeys(row.depth for row in report.passkey))
    cells = {(row.policy, row.sparsity, row.depth): row for row in report.passkey}
    header = ["depth", *(name if s is None else f"{name} {_setting(s)}" for name, s in policies)]
    rows = [
        [f"{depth:.2f}", *(_score([cells[name, s, depth]]) for name, s in policies)]
        for depth in depths
    ]
    rows.append(["all", *(_score([cells[name, s, d] for d in depths]) for name, s in policies)])
    return _table(header, rows)


def _score(rows) -> str:
    return f"{sum(row.correct for row in rows)}/{sum(row.trials for row in rows)}"
