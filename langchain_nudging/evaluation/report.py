"""Reports of an evaluation run: tables, paired differences, charts, an answer browser.

The input is the run's records, one per example and *row*: a row is a mode plus, for the
nudged pair, its gamma (``base``, ``nudging``, then one ``nudged`` row per gamma). From them:

* :func:`build_report` summarises each row and task (scores, IFEval metrics, share nudged,
  speed) and the paired differences nudged - base and nudged - nudging with bootstrap intervals;
* :func:`write_report` writes ``report.md``, ``report.json``, ``scores.png``,
  ``gamma_sweep.png`` (two or more gammas), ``answers.html`` and, for the tasks without an
  automatic score (Just-Eval, MT-Bench), the input files of their external judges;
* :func:`main_table` builds the main table for the terminal.

A record appearing twice for the same row, task and example counts once (the last one wins).
"""

from __future__ import annotations

import hashlib
import html
import json
import math
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rich.table import Table

from .scoring import IFEVAL_METRICS
from .tasks import TASKS

Record = Mapping[str, Any]

TASK_TITLES = {
    "ifeval": "IFEval",
    "gsm8k": "GSM8K",
    "bigbench-date": "BB Date",
    "bigbench-sports": "BB Sports",
    "strategyqa": "StrategyQA",
    "just-eval": "Just-Eval",
    "mt-bench": "MT-Bench",
}
"""Column titles, in the order the tables list the tasks; other tasks follow by name."""

OPEN_TASKS = tuple(name for name, task in TASKS.items() if not task.scored)
"""Tasks without an automatic score: their answers go to an external judge."""

BASELINES = ("base", "nudging")
"""The rows each nudged row is compared with."""

CI_LEVEL = 0.95
"""Coverage of the paired-bootstrap intervals."""

_MODE_ORDER = ("base", "nudging", "nudged")
_BOOTSTRAP_CHUNK = 1 << 21  # resampled indices held at once
_MISSING = "—"


# ----------------------------------------------------------------------------------------------
# Rows and grouping


@dataclass(frozen=True)
class Row:
    """One column of results: a mode, and for the nudged pair its gamma."""

    mode: str
    gamma: float | None
    label: str
    slug: str

    def as_dict(self) -> dict[str, Any]:
        return {"slug": self.slug, "label": self.label, "mode": self.mode, "gamma": self.gamma}


def _row_key(record: Record) -> tuple[str, float | None]:
    mode = str(record["mode"])
    gamma = record.get("gamma")
    return mode, (float(gamma) if mode == "nudged" and gamma is not None else None)


def find_rows(records: Iterable[Record]) -> list[Row]:
    """The rows present in ``records``: base, nudging, then nudged by increasing gamma.

    A lone nudged gamma is labelled ``nudged``; several are ``nudged γ=0.3`` (slug
    ``nudged-gamma0.3``).
    """
    keys = {_row_key(record) for record in records}
    nudged_gammas = {gamma for mode, gamma in keys if mode == "nudged"}

    def order(key: tuple[str, float | None]) -> tuple[int, str, float]:
        mode, gamma = key
        rank = _MODE_ORDER.index(mode) if mode in _MODE_ORDER else len(_MODE_ORDER)
        return rank, mode, -1.0 if gamma is None else gamma

    rows = []
    for mode, gamma in sorted(keys, key=order):
        if mode != "nudged" or len(nudged_gammas) == 1:
            rows.append(Row(mode, gamma, mode, mode))
        elif gamma is None:
            rows.append(Row(mode, gamma, "nudged γ=?", "nudged-gamma-unknown"))
        else:
            rows.append(Row(mode, gamma, f"nudged γ={gamma:g}", f"nudged-gamma{gamma:g}"))
    return rows


def order_tasks(tasks: Iterable[str]) -> list[str]:
    """Tasks in table order: the known ones as in :data:`TASK_TITLES`, then others by name."""
    known = list(TASK_TITLES)
    return sorted(set(tasks), key=lambda t: (known.index(t) if t in known else len(known), t))


def task_title(task: str) -> str:
    return TASK_TITLES.get(task, task)


class _Results:
    """Records grouped by row, task and example id (the last duplicate wins)."""

    def __init__(self, records: Iterable[Record]) -> None:
        self.records = list(records)
        self.rows = find_rows(self.records)
        slug_of = {(row.mode, row.gamma): row.slug for row in self.rows}
        self.cells: dict[str, dict[str, dict[str, Record]]] = {row.slug: {} for row in self.rows}
        self.example_order: dict[str, dict[str, None]] = {}  # task -> ids in first-seen order
        for record in self.records:
            task, example_id = str(record["task"]), str(record["example_id"])
            self.cells[slug_of[_row_key(record)]].setdefault(task, {})[example_id] = record
            self.example_order.setdefault(task, {})[example_id] = None
        self.tasks = order_tasks(self.example_order)
        self.scored_tasks = [t for t in self.tasks if t not in OPEN_TASKS and self._has_score(t)]
        self.open_tasks = [t for t in self.tasks if t not in self.scored_tasks]

    def _has_score(self, task: str) -> bool:
        return any(
            record.get("primary") is not None
            for cells in self.cells.values()
            for record in cells.get(task, {}).values()
        )

    def cell(self, slug: str, task: str) -> dict[str, Record]:
        return self.cells.get(slug, {}).get(task, {})


# ----------------------------------------------------------------------------------------------
# Numbers


def _mean(values: Sequence[float]) -> float | None:
    return float(sum(values) / len(values)) if values else None


def _ratio(numerator: float, denominator: float) -> float | None:
    return float(numerator / denominator) if denominator else None


def ifeval_metrics(records: Iterable[Record]) -> dict[str, float | None]:
    """IFEval's four accuracies: prompt-level = mean over prompts, instruction-level = mean
    over all instructions of all prompts (the per-prompt lists flattened)."""
    scores = [record["score"] for record in records if record.get("score")]
    metrics: dict[str, float | None] = {}
    for name in IFEVAL_METRICS:
        if name.startswith("prompt"):
            values = [float(score[name]) for score in scores if name in score]
        else:
            values = [float(value) for score in scores for value in score.get(name, ())]
        metrics[name] = _mean(values)
    return metrics


def summarize_cell(records: Iterable[Record], task: str) -> dict[str, Any]:
    """Counts, mean primary score, speed and share nudged of one row on one task.

    ``n`` records, ``scored`` of them with a primary score, ``primary`` their mean (None for
    an open task), ``ifeval`` (IFEval only, :func:`ifeval_metrics`), ``answers`` non-empty
    answers, token and time sums, ``nudged_share`` token-weighted (all nudge tokens / all
    tokens), ``tokens_per_s`` (all tokens / summed wall time), ``cut`` answers stopped by the
    token limit.
    """
    records = list(records)
    primaries = [float(r["primary"]) for r in records if r.get("primary") is not None]
    tokens = sum(int(r.get("tokens") or 0) for r in records)
    nudge_tokens = sum(int(r.get("nudge_tokens") or 0) for r in records)
    wall_time = sum(float(r.get("wall_time") or 0.0) for r in records)
    return {
        "n": len(records),
        "scored": len(primaries),
        "primary": _mean(primaries),
        "ifeval": ifeval_metrics(records) if task == "ifeval" else None,
        "answers": sum(1 for r in records if str(r.get("answer") or "").strip()),
        "tokens": tokens,
        "nudge_tokens": nudge_tokens,
        "wall_time": wall_time,
        "nudged_share": _ratio(nudge_tokens, tokens),
        "tokens_per_s": _ratio(tokens, wall_time),
        "cut": sum(1 for r in records if r.get("finish_reason") == "length"),
    }


def paired_bootstrap_ci(
    differences: Sequence[float] | np.ndarray,
    *,
    seed: int = 0,
    resamples: int = 10_000,
    level: float = CI_LEVEL,
) -> tuple[float, float]:
    """Percentile interval of the mean of paired differences, resampling the pairs.

    ``resamples`` means of ``len(differences)`` pairs drawn with replacement by
    ``numpy.random.default_rng(seed)``; returns their ``(1 - level) / 2`` and
    ``(1 + level) / 2`` quantiles.
    """
    diffs = np.asarray(differences, dtype=float)
    if diffs.size == 0:
        raise ValueError("no paired differences to resample")
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    rng = np.random.default_rng(seed)
    n = diffs.size
    means = np.empty(resamples)
    step = max(1, _BOOTSTRAP_CHUNK // n)
    for start in range(0, resamples, step):
        stop = min(resamples, start + step)
        means[start:stop] = diffs[rng.integers(0, n, size=(stop - start, n))].mean(axis=1)
    low, high = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


def _compare(
    ours: Mapping[str, Record], theirs: Mapping[str, Record], seed: int, resamples: int
) -> dict[str, Any] | None:
    """Mean and interval of ours - theirs over the examples both scored (None if none)."""
    ids = sorted(
        i
        for i in ours.keys() & theirs.keys()
        if ours[i].get("primary") is not None and theirs[i].get("primary") is not None
    )
    if not ids:
        return None
    diffs = [float(ours[i]["primary"]) - float(theirs[i]["primary"]) for i in ids]
    low, high = paired_bootstrap_ci(diffs, seed=seed, resamples=resamples)
    return {"n": len(ids), "mean": float(np.mean(diffs)), "ci_low": low, "ci_high": high}


def _paired(results: _Results, seed: int, resamples: int) -> list[dict[str, Any]]:
    present = {row.slug for row in results.rows}
    comparisons = []
    for row in results.rows:
        if row.mode != "nudged":
            continue
        for baseline in (b for b in BASELINES if b in present):
            for task in results.scored_tasks:
                found = _compare(
                    results.cell(row.slug, task), results.cell(baseline, task), seed, resamples
                )
                if found is not None:
                    comparisons.append(
                        {"row": row.slug, "baseline": baseline, "task": task} | found
                    )
    return comparisons


def build_report(
    records: Iterable[Record], *, seed: int = 0, resamples: int = 10_000
) -> dict[str, Any]:
    """A JSON-serialisable summary of a run.

    Keys: ``rows`` (slug, label, mode, gamma), ``tasks`` / ``scored_tasks`` / ``open_tasks``,
    ``cells[row_slug][task]`` (see :func:`summarize_cell`; only the cells that were run),
    ``average[row_slug]`` (mean primary score over the scored tasks the row has, and those
    tasks), ``paired`` (one entry per nudged row, baseline and scored task: mean difference of
    primary scores over the examples both rows answered, its 95% paired-bootstrap interval
    ``ci_low``/``ci_high`` and ``n`` pairs; each interval uses a generator seeded by ``seed``),
    ``bootstrap`` (seed, resamples, level) and ``n_records``. Scores are fractions in 0..1.
    """
    return _summary(_Results(records), seed, resamples)


def _summary(results: _Results, seed: int, resamples: int) -> dict[str, Any]:
    cells = {
        row.slug: {
            task: summarize_cell(results.cell(row.slug, task).values(), task)
            for task in results.tasks
            if results.cell(row.slug, task)
        }
        for row in results.rows
    }
    average = {}
    for row in results.rows:
        scored = [
            task
            for task in results.scored_tasks
            if cells[row.slug].get(task, {}).get("primary") is not None
        ]
        if scored:
            primary = _mean([cells[row.slug][task]["primary"] for task in scored])
            average[row.slug] = {"primary": primary, "tasks": scored}
    return {
        "rows": [row.as_dict() for row in results.rows],
        "tasks": results.tasks,
        "scored_tasks": results.scored_tasks,
        "open_tasks": results.open_tasks,
        "cells": cells,
        "average": average,
        "paired": _paired(results, seed, resamples),
        "bootstrap": {"seed": seed, "resamples": resamples, "level": CI_LEVEL},
        "n_records": len(results.records),
    }


# ----------------------------------------------------------------------------------------------
# Tables


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


def main_table_cells(report: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the main table: a row per mode/gamma, a score column per scored task
    (percent), ``Avg``, and an answer count per open task.

    An ``Avg`` over fewer tasks than the table has is marked ``*``.
    """
    scored, open_tasks = report["scored_tasks"], report["open_tasks"]
    header = ["Row", *map(task_title, scored)]
    if scored:
        header.append("Avg")
    header += map(task_title, open_tasks)
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
        "written; `judge/` holds them in the input formats of their external judges.",
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
            share, speed = cell["nudged_share"], cell["tokens_per_s"]
            rows.append(
                [
                    row["label"],
                    task_title(task),
                    str(cell["n"]),
                    _MISSING if share is None else f"{100 * share:.1f}%",
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


# ----------------------------------------------------------------------------------------------
# Charts


def _row_colours(rows: Sequence[Mapping[str, Any]]) -> list[Any]:
    from matplotlib import colormaps

    nudged = [row for row in rows if row["mode"] == "nudged"]
    blues = colormaps["Blues"]
    fixed = {"base": "tab:gray", "nudging": "tab:orange"}
    colours = []
    for row in rows:
        if row["mode"] == "nudged":
            k = nudged.index(row)
            colours.append(blues(0.5 + 0.45 * k / max(1, len(nudged) - 1)))
        else:
            colours.append(fixed.get(row["mode"], "tab:green"))
    return colours


def plot_scores(report: Mapping[str, Any], path: Path) -> None:
    """Grouped bar chart: a group per scored task and Avg, a bar per row (percent)."""
    from matplotlib.figure import Figure

    rows, scored = report["rows"], report["scored_tasks"]
    groups = [*map(task_title, scored), "Avg"]
    width = 0.8 / max(1, len(rows))
    fig = Figure(figsize=(min(16.0, 3.0 + len(groups) * (0.5 + 0.3 * len(rows))), 4.5))
    ax = fig.add_subplot()
    x = np.arange(len(groups))
    for k, (row, colour) in enumerate(zip(rows, _row_colours(rows), strict=True)):
        cells = report["cells"][row["slug"]]
        values = [cells.get(task, {}).get("primary") for task in scored]
        values.append(report["average"].get(row["slug"], {}).get("primary"))
        heights = [math.nan if v is None else 100 * v for v in values]
        offset = (k - (len(rows) - 1) / 2) * width
        bars = ax.bar(x + offset, heights, width, color=colour, label=row["label"])
        labels = ["" if v is None else f"{100 * v:.1f}" for v in values]
        ax.bar_label(bars, labels=labels, fontsize=7, padding=1)
    ax.set_xticks(x, groups)
    ax.set_xlabel("Task")
    ax.set_ylabel("Score (%)")
    ax.set_ylim(0, 105)
    ax.set_title("Scores by task (IFEval: prompt-level strict; others: exact match)")
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=150)


def plot_gamma_sweep(report: Mapping[str, Any], path: Path) -> None:
    """Score and share nudged against gamma, a line per task; base (dashed) and nudging
    (dotted) scores as horizontal lines in the task's colour."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    nudged = sorted(
        (row for row in report["rows"] if row["mode"] == "nudged" and row["gamma"] is not None),
        key=lambda row: row["gamma"],
    )
    palette = colormaps["tab10"]
    colour = {task: palette(k % 10) for k, task in enumerate(report["tasks"])}
    fig = Figure(figsize=(11, 4.5))
    score_ax, share_ax = fig.subplots(1, 2)

    def series(task: str, key: str) -> tuple[list[float], list[float]]:
        points = [
            (row["gamma"], report["cells"][row["slug"]][task][key])
            for row in nudged
            if task in report["cells"][row["slug"]]
        ]
        points = [(g, 100 * v) for g, v in points if v is not None]
        return [g for g, _ in points], [v for _, v in points]

    for task in report["scored_tasks"]:
        score_ax.plot(*series(task, "primary"), "o-", color=colour[task], label=task_title(task))
        for baseline, style in zip(BASELINES, ("--", ":"), strict=True):
            cell = report["cells"].get(baseline, {}).get(task)
            if cell is not None and cell["primary"] is not None:
                score_ax.axhline(100 * cell["primary"], color=colour[task], ls=style, lw=1)
    for task in report["tasks"]:
        share_ax.plot(
            *series(task, "nudged_share"), "o-", color=colour[task], label=task_title(task)
        )

    styles = [
        Line2D([], [], color="gray", ls="--", label="base"),
        Line2D([], [], color="gray", ls=":", label="nudging"),
    ]
    score_ax.legend(handles=[*score_ax.get_legend_handles_labels()[0], *styles], fontsize=8)
    gammas = [row["gamma"] for row in nudged]
    for ax in (score_ax, share_ax):
        ax.set_xticks(gammas, [f"{g:g}" for g in gammas])
    score_ax.set_title("Score against gamma")
    score_ax.set_xlabel("gamma")
    score_ax.set_ylabel("Score (%)")
    share_ax.legend(fontsize=8)
    share_ax.set_title("Share of tokens written by the nudging model")
    share_ax.set_xlabel("gamma")
    share_ax.set_ylabel("Share nudged (%)")
    fig.tight_layout()
    fig.savefig(path, dpi=150)


# ----------------------------------------------------------------------------------------------
# Answer browser

_CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:1.5em;color:#222;background:#fafafa}
h2{border-bottom:2px solid #ccc;margin-top:2em}
article{background:#fff;border:1px solid #ddd;border-radius:6px;padding:.6em .9em;margin:1em 0}
h3{font-size:13px;margin:0 0 .4em;color:#555}
.g{display:grid;gap:.5em}
.p,.r{grid-column:1/-1;white-space:pre-wrap;padding:.4em .6em;border-radius:4px}
.p{background:#eef3fb}.r{background:#eef8ee}
.a{border:1px solid #e3e3e3;border-radius:4px;padding:.4em .6em;min-width:0}
.t{white-space:pre-wrap;overflow-wrap:anywhere}
.h{font-size:12px;color:#555;margin-bottom:.3em}
.ok{color:#1a7f37;font-weight:bold}.no{color:#c62828;font-weight:bold}
mark{background:#ffe08a;padding:0}
"""


def _answer_html(turn: Mapping[str, Any]) -> str:
    segments = turn.get("segments") or []
    if not segments:
        return html.escape(str(turn.get("answer") or ""))
    return "".join(
        f"<mark>{html.escape(s['text'])}</mark>"
        if s.get("source") == "nudge"
        else html.escape(s["text"])
        for s in segments
    )


def _mark(ok: Any) -> str:
    return '<span class="ok">✓</span>' if ok else '<span class="no">✗</span>'


def _badge(record: Record, task: str) -> str:
    parts = []
    score = record.get("score") or {}
    if task == "ifeval" and score:
        strict = score.get("inst_level_strict_acc") or []
        parts.append(
            f"strict {_mark(score.get('prompt_level_strict_acc'))} "
            f"loose {_mark(score.get('prompt_level_loose_acc'))} "
            f"· {sum(map(bool, strict))}/{len(strict)} instructions"
        )
    elif record.get("primary") is not None:
        parts.append(_mark(float(record["primary"]) >= 1.0))
        if score.get("extracted") is not None:
            parts.append("answer " + html.escape(str(score["extracted"])))
    parts.append(f"{int(record.get('tokens') or 0)} tok")
    if record.get("mode") == "nudged":
        share = record.get("nudged_share")
        if share is None:
            share = _ratio(record.get("nudge_tokens") or 0, record.get("tokens") or 0) or 0.0
        parts.append(f"{100 * share:.0f}% nudged")
    finish = record.get("finish_reason")
    if finish not in (None, "stop"):
        parts.append(html.escape(str(finish)))
    return " · ".join(parts)


def _turns(record: Record) -> list[Mapping[str, Any]]:
    if record.get("turns"):
        return list(record["turns"])
    prompt = (record.get("meta") or {}).get("instruction") or ""
    return [{"prompt": prompt, "answer": record.get("answer") or "", "segments": []}]


def render_answers_html(records: Iterable[Record]) -> str:
    """``answers.html``: every example of every task, the rows' answers side by side.

    Self-contained (inline CSS, no script). Text written by the nudging model is in
    ``<mark>``; each answer's header gives its score, its tokens and, for a nudged row, the
    share nudged.
    """
    return _answers_html(_Results(records))


def _example_html(task: str, example_id: str, answers: Sequence[tuple[Row, Record | None]]) -> str:
    """One example: its prompt(s) and reference across the page, then a column per row."""
    first = next(record for _, record in answers if record is not None)
    turns = _turns(first)
    references = (record.get("reference") for _, record in answers if record is not None)
    reference = next((r for r in references if r is not None), None)
    columns = f"grid-template-columns:repeat({len(answers)},minmax(0,1fr))"
    out = [f'<article><h3>{html.escape(example_id)}</h3><div class="g" style="{columns}">']
    for k, turn in enumerate(turns):
        prefix = f"Turn {k + 1}: " if len(turns) > 1 else ""
        out.append(f'<div class="p">{prefix}{html.escape(str(turn.get("prompt") or ""))}</div>')
        if k == 0 and reference is not None:
            out.append(f'<div class="r">Reference: {html.escape(str(reference))}</div>')
        for row, record in answers:
            head = f"<b>{html.escape(row.label)}</b>"
            if record is None:
                out.append(f'<div class="a"><div class="h">{head} · <i>not run</i></div></div>')
                continue
            own_turns = _turns(record)
            body = _answer_html(own_turns[k]) if k < len(own_turns) else ""
            info = _badge(record, task) if k == 0 else f"turn {k + 1}"
            out.append(f'<div class="a"><div class="h">{head} · {info}</div>')
            out.append(f'<div class="t">{body}</div></div>')
    out.append("</div></article>")
    return "\n".join(out)


def _answers_html(results: _Results) -> str:
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        "<title>Answers</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>Answers</h1>",
        "<p>Rows: "
        + ", ".join(html.escape(row.label) for row in results.rows)
        + ". <mark>Highlighted</mark> text was written by the nudging model.</p>",
        "<nav><ul>",
    ]
    anchors = {task: "task-" + re.sub(r"[^a-z0-9]+", "-", task.lower()) for task in results.tasks}
    for task in results.tasks:
        out.append(
            f'<li><a href="#{anchors[task]}">{html.escape(task_title(task))}</a> '
            f"({len(results.example_order[task])} examples)</li>"
        )
    out.append("</ul></nav>")

    for task in results.tasks:
        present = [row for row in results.rows if results.cell(row.slug, task)]
        out.append(f'<section id="{anchors[task]}"><h2>{html.escape(task_title(task))}</h2>')
        for example_id in results.example_order[task]:
            answers = [(row, results.cell(row.slug, task).get(example_id)) for row in present]
            out.append(_example_html(task, example_id, answers))
        out.append("</section>")
    out.append("</body></html>")
    return "\n".join(out)


# ----------------------------------------------------------------------------------------------
# Judge exports


def _int_or_str(value: Any) -> Any:
    text = str(value)
    return int(text) if text.isdigit() else value


def just_eval_entries(records: Iterable[Record], generator: str) -> list[dict[str, Any]]:
    """One row's Just-Eval answers in the just-eval repository's input format."""
    entries = []
    for record in records:
        meta = record.get("meta") or {}
        turns = _turns(record)
        entries.append(
            {
                "id": _int_or_str(record["example_id"]),
                "instruction": meta.get("instruction") or turns[0].get("prompt") or "",
                "source_id": meta.get("source_id"),
                "dataset": meta.get("dataset"),
                "category": meta.get("category"),
                "output": record.get("answer") or "",
                "generator": generator,
            }
        )
    return entries


def mt_bench_answers(
    records: Iterable[Record], model_id: str, *, tstamp: float | None = None
) -> list[dict[str, Any]]:
    """One row's MT-Bench answers as FastChat ``model_answer`` lines, by question id.

    ``answer_id`` is derived from the model id and question id, so it is stable across runs.
    """
    tstamp = time.time() if tstamp is None else tstamp
    answers = []
    for record in records:
        meta = record.get("meta") or {}
        question_id = _int_or_str(meta.get("question_id", record["example_id"]))
        digest = hashlib.sha256(f"{model_id}/{question_id}".encode()).hexdigest()[:22]
        turns = [str(turn.get("answer") or "") for turn in _turns(record)]
        answers.append(
            {
                "question_id": question_id,
                "answer_id": digest,
                "model_id": model_id,
                "choices": [{"index": 0, "turns": turns}],
                "tstamp": tstamp,
            }
        )
    return sorted(answers, key=lambda a: (isinstance(a["question_id"], str), a["question_id"]))


# ----------------------------------------------------------------------------------------------
# All files


def write_report(
    records: Iterable[Record],
    out_dir: str | Path,
    *,
    run: Mapping[str, Any] | None = None,
    seed: int = 0,
    resamples: int = 10_000,
) -> dict[str, Path]:
    """Write every report file into ``out_dir`` (created if needed); return their paths.

    Keys: ``markdown`` (report.md), ``json`` (report.json, :func:`build_report`),
    ``scores`` (scores.png; only with a scored task), ``gamma_sweep`` (gamma_sweep.png; only
    with two or more nudged gammas), ``answers`` (answers.html), and per open task and row
    ``judge/just-eval/<row-slug>`` (.json) and ``judge/mt-bench/<row-slug>`` (.jsonl).
    ``run`` (the models and settings the answers were made with) heads report.md and is
    kept in report.json.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results = _Results(records)
    report = _summary(results, seed, resamples)
    if run is not None:
        report["run"] = dict(run)
    paths: dict[str, Path] = {}

    if report["scored_tasks"]:
        paths["scores"] = out / "scores.png"
        plot_scores(report, paths["scores"])
    gammas = {row["gamma"] for row in report["rows"] if row["mode"] == "nudged"} - {None}
    if len(gammas) >= 2:
        paths["gamma_sweep"] = out / "gamma_sweep.png"
        plot_gamma_sweep(report, paths["gamma_sweep"])

    paths["markdown"] = out / "report.md"
    figures = [paths[k].name for k in ("scores", "gamma_sweep") if k in paths]
    paths["markdown"].write_text(render_markdown(report, figures=figures), encoding="utf-8")
    paths["json"] = out / "report.json"
    paths["json"].write_text(json.dumps(report, indent=2, ensure_ascii=False), encoding="utf-8")
    paths["answers"] = out / "answers.html"
    paths["answers"].write_text(_answers_html(results), encoding="utf-8")

    tstamp = time.time()
    for row in results.rows:
        just_eval = results.cell(row.slug, "just-eval")
        if just_eval:
            path = out / "judge" / "just-eval" / f"{row.slug}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            entries = just_eval_entries(just_eval.values(), row.label)
            path.write_text(json.dumps(entries, indent=2, ensure_ascii=False), encoding="utf-8")
            paths[f"judge/just-eval/{row.slug}"] = path
        mt_bench = results.cell(row.slug, "mt-bench")
        if mt_bench:
            path = out / "judge" / "mt-bench" / f"{row.slug}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            lines = mt_bench_answers(mt_bench.values(), row.slug, tstamp=tstamp)
            path.write_text(
                "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines),
                encoding="utf-8",
            )
            paths[f"judge/mt-bench/{row.slug}"] = path
    return paths
