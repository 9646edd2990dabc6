"""Benchmark tables like llama-bench's: one row per test, each time the mean ± std over repeats,
rendered as markdown, JSON or CSV."""

import csv
import io
import json
import math
import statistics
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Stat:
    """A mean and its sample standard deviation (0 for a single sample)."""

    mean: float
    std: float

    @classmethod
    def of(cls, samples: list[float]) -> "Stat":
        spread = statistics.stdev(samples) if len(samples) > 1 else 0.0
        return cls(statistics.fmean(samples), spread)


def format_stat(stat: Stat, digits: int = 2) -> str:
    """``12.34 ± 0.56``."""
    return f"{stat.mean:.{digits}f} ± {stat.std:.{digits}f}"


def ratio(numerator: Stat, denominator: Stat) -> Stat:
    """numerator / denominator, its spread propagated to first order from both spreads."""
    value = numerator.mean / denominator.mean
    relative = math.hypot(numerator.std / numerator.mean, denominator.std / denominator.mean)
    return Stat(value, value * relative)


@dataclass(frozen=True)
class Column:
    """A table column: ``key`` in JSON and CSV, ``label`` in markdown, ``digits`` after the
    point for numbers in markdown; ``markdown=False`` keeps it out of the markdown table."""

    key: str
    label: str
    digits: int = 2
    markdown: bool = True


@dataclass
class Report:
    """One profile: what ran where (``info``), the table, and what to tell the user on stderr.

    Cells are ``Stat``, numbers, strings, ``{name: number}`` (one number per device), or None
    for "not measured".
    """

    mode: str
    info: dict
    columns: list[Column]
    rows: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    crossover: list[dict] | None = None


def render(report: Report, output: str) -> str:
    """The table as ``md``, ``json`` (one object) or ``csv`` (a header line first)."""
    return {"md": render_markdown, "json": render_json, "csv": render_csv}[output](report)


def render_markdown(report: Report) -> str:
    columns = [column for column in report.columns if column.markdown]
    lines = [
        "| " + " | ".join(column.label for column in columns) + " |",
        "|" + "---|" * len(columns),
    ]
    for row in report.rows:
        cells = (_markdown_cell(row.get(column.key), column.digits) for column in columns)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _markdown_cell(value, digits: int) -> str:
    if value is None:
        return "-"
    if isinstance(value, Stat):
        return format_stat(value, digits)
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    if isinstance(value, dict):
        return " / ".join(_markdown_cell(item, digits) for item in value.values())
    return str(value)


def render_json(report: Report) -> str:
    data = {"mode": report.mode, **report.info}
    data["rows"] = [
        {column.key: _json_value(row.get(column.key)) for column in report.columns}
        for row in report.rows
    ]
    if report.crossover is not None:
        data["crossover"] = report.crossover
    return json.dumps(data, indent=2) + "\n"


def _json_value(value):
    return {"mean": value.mean, "std": value.std} if isinstance(value, Stat) else value


def render_csv(report: Report) -> str:
    """One line per row; a ``Stat`` column ``x`` becomes ``x`` (the mean) and ``x_std``."""
    stat_keys = {
        column.key
        for column in report.columns
        if any(isinstance(row.get(column.key), Stat) for row in report.rows)
    }
    header = []
    for column in report.columns:
        header += [column.key, f"{column.key}_std"] if column.key in stat_keys else [column.key]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    for row in report.rows:
        cells = []
        for column in report.columns:
            value = row.get(column.key)
            if column.key in stat_keys:
                cells += [value.mean, value.std] if value is not None else ["", ""]
            elif isinstance(value, dict):
                cells.append(json.dumps(value))
            else:
                cells.append("" if value is None else value)
        writer.writerow(cells)
    return buffer.getvalue()


def describe(report: Report) -> str:
    """One line on what was profiled, for stderr above the table."""
    info = report.info
    shape = (
        f"{info['num_layers']} layers, {info['num_q_heads']} query heads, "
        f"{info['num_kv_heads']} KV heads, head_dim {info['head_dim']}"
    )
    what = "attention" if report.mode == "kernel" else f"{info['weights']} weights"
    return (
        f"{info['model']} {what} ({shape}), {info['dtype']}, {info['gates']} gates, "
        f"{info['attention_kernel']} kernel, on {info['device']}; "
        f"mean ± std over {info['repeats']} repeat{'s' if info['repeats'] != 1 else ''}"
    )
