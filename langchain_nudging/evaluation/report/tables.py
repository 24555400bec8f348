"""Tables: the main table for the terminal and ``report.md``."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from rich.table import Table

from ..scoring import IFEVAL_METRICS
from .numbers import BASELINES
from .rows import task_title

_MISSING = "—"


def percent(value: float | None) -> str:
    """``0.1234`` -> ``12.3``; a missing value -> an em dash."""
    return _MISSING if value is None else f"{100 * value:.1f}"


def signed_points(value: float) -> str:
    """A fraction as signed percentage points with a true minus: ``-0.01`` -> ``−1.0``."""
    points = round(100 * value, 1)
    return f"{points + 0.0:+.1f}".replace("-", "−")  # + 0.0 turns -0.0 into 0.0


def _difference(entry: Mapping[str, Any] | None) -> str:
    if entry is None:
        return _MISSING
    mean, low, high = entry["mean"], entry["ci_low"], entry["ci_high"]
    return f"{signed_points(mean)} [{signed_points(low)}, {signed_points(high)}] (n={entry['n']})"


def _answer_count(n: int) -> str:
    return "1 answer" if n == 1 else f"{n} answers"


INSTRUCTION_LEVEL = (
    ("inst_level_strict_acc", "IFEval inst. strict"),
    ("inst_level_loose_acc", "IFEval inst. loose"),
)
"""IFEval's instruction-level metrics, as the main table and the chart title them."""


def _share(value: float | None) -> str:
    return _MISSING if value is None else f"{100 * value:.1f}%"


def _ifeval_metric(cells: Mapping[str, Any], name: str) -> str:
    cell = cells.get("ifeval")
    metrics = None if cell is None else cell["ifeval"]
    return percent(None if metrics is None else metrics.get(name))


def main_table_cells(report: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the main table: a row per mode/gamma, a score column per scored task
    (percent), ``Avg``, an answer count per open task, IFEval's instruction-level accuracies
    (strict and loose; with IFEval only), the row's share nudged over all its tasks and its
    answers cut by the token budget.

    An ``Avg`` over fewer tasks than the table has is marked ``*``.
    """
    scored, open_tasks = report["scored_tasks"], report["open_tasks"]
    with_ifeval = "ifeval" in scored
    header = ["Row", *map(task_title, scored)]
    if scored:
        header.append("Avg")
    header += map(task_title, open_tasks)
    if with_ifeval:
        header += [title for _, title in INSTRUCTION_LEVEL]
    header += ["Share nudged", "Cut"]
    rows = []
    for row in report["rows"]:
        cells = report["cells"][row["slug"]]
        line = [row["label"]]
        line += [percent(cells[t]["primary"]) if t in cells else _MISSING for t in scored]
        if scored:
            average = report["average"].get(row["slug"])
            if average is None:
                line.append(_MISSING)
            else:
                partial = len(average["tasks"]) < len(scored)
                line.append(percent(average["primary"]) + ("*" if partial else ""))
        line += [_answer_count(cells[t]["n"]) if t in cells else _MISSING for t in open_tasks]
        if with_ifeval:
            line += [_ifeval_metric(cells, name) for name, _ in INSTRUCTION_LEVEL]
        totals = report["totals"][row["slug"]]
        line += [_share(totals["nudged_share"]), f"{totals['cut']}/{totals['n']}"]
        rows.append(line)
    return header, rows


def main_table(report: Mapping[str, Any], *, title: str | None = "Scores (%)") -> Table:
    """The main table as a :class:`rich.table.Table`, for printing in the terminal."""
    header, rows = main_table_cells(report)
    table = Table(title=title)
    table.add_column(header[0], style="bold")
    for name in header[1:]:
        table.add_column(name, justify="right")
    for line in rows:
        table.add_row(*line)
    return table


def _markdown_table(
    header: Sequence[str], rows: Iterable[Sequence[str]], *, text_columns: int = 1
) -> list[str]:
    """A pipe table; the first ``text_columns`` columns align left, the numbers right."""

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    align = ["---"] * text_columns + ["---:"] * (len(header) - text_columns)
    separator = "|" + "|".join(align) + "|"
    return [line(header), separator, *map(line, rows)]


def render_markdown(report: Mapping[str, Any], *, figures: Iterable[str] = ()) -> str:
    """``report.md``: main table, paired differences, share nudged and speed, IFEval detail.

    ``figures`` are image file names (next to the report) to show after the main table.
    """
    rows = [
        f"nudged (γ={row['gamma']:g})"
        if row["label"] == "nudged" and row["gamma"] is not None
        else row["label"]
        for row in report["rows"]
    ]
    lines = [
        "# Evaluation report",
        "",
        f"{report['n_records']} answers; rows: {', '.join(rows) or 'none'}; "
        f"tasks: {', '.join(map(task_title, report['tasks'])) or 'none'}. "
        "Every answer, side by side: [answers.html](answers.html).",
        "",
    ]
    if report.get("run"):
        settings = ", ".join(f"{key} `{value}`" for key, value in report["run"].items())
        lines += [f"Run: {settings}.", ""]
    lines += _scores_section(report, figures)
    lines += _paired_section(report)
    lines += _speed_section(report)
    if "ifeval" in report["tasks"]:
        lines += _ifeval_section(report)
    return "\n".join(lines)


def _scores_section(report: Mapping[str, Any], figures: Iterable[str]) -> list[str]:
    lines = ["## Scores", "", *_markdown_table(*main_table_cells(report))]
    lines += [
        "",
        "Percent of examples answered correctly, one decimal (IFEval: prompt-level strict "
        "accuracy; the other scored tasks: exact match of the extracted answer). Avg: mean of "
        "the row's scored-task columns (`*`: over the tasks this row has only). "
        "Just-Eval and MT-Bench have no automatic score: their columns count the answers "
        "written; `judge/` holds them in the input formats of their external judges. "
        "IFEval inst. strict / loose: instruction-level accuracy (every instruction of every "
        "prompt counts once; prompt-level needs all of a prompt's). Share nudged: tokens "
        "written by the nudging model / all the row's tokens, over all its tasks. Cut: "
        "answers stopped by the token budget / answers.",
        "",
    ]
    images = [f"![{Path(name).stem}]({name})" for name in figures]
    return lines + ([*images, ""] if images else [])


def _paired_section(report: Mapping[str, Any]) -> list[str]:
    lines = ["## Paired differences", ""]
    by_key = {(p["row"], p["baseline"], p["task"]): p for p in report["paired"]}
    if not by_key:
        return [
            *lines,
            "No paired comparison: it needs a nudged row and a base or nudging row that "
            "answered the same examples of a scored task.",
            "",
        ]
    rows = []
    for row in report["rows"]:
        for task in report["scored_tasks"]:
            entries = [by_key.get((row["slug"], baseline, task)) for baseline in BASELINES]
            if any(entries):
                rows.append([row["label"], task_title(task), *map(_difference, entries)])
    header = ["Row", "Task", *(f"nudged − {baseline}" for baseline in BASELINES)]
    boot = report["bootstrap"]
    return [
        *lines,
        *_markdown_table(header, rows, text_columns=2),
        "",
        "Mean over the examples both rows answered of (nudged score − baseline score), in "
        f"percentage points; brackets: {100 * boot['level']:.0f}% paired-bootstrap percentile "
        f"interval ({boot['resamples']} resamples, seed {boot['seed']}); n: examples paired.",
        "",
    ]


def _speed_section(report: Mapping[str, Any]) -> list[str]:
    rows = []
    for row in report["rows"]:
        for task, cell in report["cells"][row["slug"]].items():
            speed = cell["tokens_per_s"]
            rows.append(
                [
                    row["label"],
                    task_title(task),
                    str(cell["n"]),
                    _share(cell["nudged_share"]),
                    _MISSING if speed is None else f"{speed:.1f}",
                    f"{cell['tokens'] / cell['n']:.0f}" if cell["n"] else _MISSING,
                    str(cell["cut"]),
                ]
            )
    header = ["Row", "Task", "n", "Share nudged", "Tokens/s", "Tokens/answer", "Cut"]
    return [
        "## Share nudged and speed",
        "",
        *_markdown_table(header, rows, text_columns=2),
        "",
        "Share nudged: tokens written by the nudging model / all tokens of the row on the task "
        "(token-weighted). Tokens/s: all tokens / the answers' summed wall time (the speed of "
        "one answer; answers run at the same time are not added up). Cut: answers stopped by "
        "the token limit.",
        "",
    ]


def _ifeval_section(report: Mapping[str, Any]) -> list[str]:
    rows = []
    for row in report["rows"]:
        cell = report["cells"][row["slug"]].get("ifeval")
        if cell is not None and cell["ifeval"] is not None:
            metrics = [percent(cell["ifeval"][name]) for name in IFEVAL_METRICS]
            rows.append([row["label"], *metrics, str(cell["n"])])
    header = ["Row", "Prompt strict", "Instruction strict", "Prompt loose", "Instruction loose"]
    return [
        "## IFEval",
        "",
        *_markdown_table([*header, "n"], rows),
        "",
        "Percent. Prompt-level: prompts whose every instruction is followed; instruction-level: "
        "all instructions of all prompts. Strict checks the answer as written; loose also "
        "accepts it with its first or last line or its `*` removed.",
        "",
    ]
