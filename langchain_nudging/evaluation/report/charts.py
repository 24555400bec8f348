"""Charts: scores and share nudged by task (``scores.png``), and the sweep over gamma
(``gamma_sweep.png``)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .numbers import BASELINES
from .rows import task_title
from .tables import INSTRUCTION_LEVEL


def _row_colours(rows: Sequence[Mapping[str, Any]]) -> list[Any]:
    from matplotlib import colormaps

    nudged = [row for row in rows if row["mode"] == "nudged"]
    blues = colormaps["Blues"]
    fixed = {"base": "tab:gray", "nudging": "tab:orange"}
    colours: list[Any] = []
    for row in rows:
        if row["mode"] == "nudged":
            k = nudged.index(row)
            colours.append(blues(0.5 + 0.45 * k / max(1, len(nudged) - 1)))
        else:
            colours.append(fixed.get(row["mode"], "tab:green"))
    return colours


def score_groups(report: Mapping[str, Any]) -> list[tuple[str, dict[str, float | None]]]:
    """The scores chart's groups: each scored task's primary score, ``Avg`` (as in the main
    table), then IFEval's instruction-level accuracies (strict, loose; with IFEval only); each
    a value per row slug."""
    cells = report["cells"]
    groups: list[tuple[str, dict[str, float | None]]] = []
    for task in report["scored_tasks"]:
        values = {slug: cells[slug].get(task, {}).get("primary") for slug in cells}
        groups.append((task_title(task), values))
    average = {slug: report["average"].get(slug, {}).get("primary") for slug in cells}
    groups.append(("Avg", average))
    if "ifeval" in report["scored_tasks"]:
        for name, title in INSTRUCTION_LEVEL:
            values = {}
            for slug in cells:
                metrics = (cells[slug].get("ifeval") or {}).get("ifeval") or {}
                values[slug] = metrics.get(name)
            groups.append((title, values))
    return groups


def share_groups(report: Mapping[str, Any]) -> list[tuple[str, dict[str, float | None]]]:
    """The share-nudged chart's groups: a task each, then ``All``; a share per row slug."""
    cells = report["cells"]
    groups = [
        (task_title(task), {slug: cells[slug].get(task, {}).get("nudged_share") for slug in cells})
        for task in report["tasks"]
    ]
    totals = report["totals"]
    groups.append(("All", {slug: totals[slug]["nudged_share"] for slug in totals}))
    return groups


def _bars(
    ax: Any,
    rows: Sequence[Mapping[str, Any]],
    groups: Sequence[tuple[str, Mapping[str, float | None]]],
    unit: str,
    decimals: int,
) -> float:
    """A group of bars per entry of ``groups``, a bar per row, labelled with its value;
    returns the tallest bar (percent)."""
    width = 0.8 / max(1, len(rows))
    x = np.arange(len(groups))
    tallest = 0.0
    for k, (row, colour) in enumerate(zip(rows, _row_colours(rows), strict=True)):
        values = [values.get(row["slug"]) for _, values in groups]
        heights = [math.nan if v is None else 100 * v for v in values]
        tallest = max([tallest, *(h for h in heights if not math.isnan(h))])
        offset = (k - (len(rows) - 1) / 2) * width
        bars = ax.bar(x + offset, heights, width, color=colour, label=row["label"])
        labels = ["" if v is None else f"{100 * v:.{decimals}f}{unit}" for v in values]
        ax.bar_label(bars, labels=labels, fontsize=6, padding=1)
    ax.set_xticks(x, [title for title, _ in groups], fontsize=8)
    return tallest


def scores_figure(report: Mapping[str, Any]) -> Any:
    """The ``scores.png`` figure: scores by task and IFEval's instruction-level accuracies
    (left), the share of tokens the nudging model wrote (right), a bar per row.

    The score axis ends a little above the tallest bar (at least 10%, at most 105%), so that
    low scores still show as bars.
    """
    from matplotlib.figure import Figure

    rows = report["rows"]
    scores, shares = score_groups(report), share_groups(report)
    per_group = 0.5 + 0.3 * len(rows)
    fig = Figure(figsize=(min(20.0, 4.0 + (len(scores) + len(shares)) * per_group), 4.5))
    score_ax, share_ax = fig.subplots(
        1, 2, gridspec_kw={"width_ratios": [len(scores), max(2, len(shares))]}
    )
    tallest = _bars(score_ax, rows, scores, "", 1)
    score_ax.set_ylabel("Score (%)")
    score_ax.set_ylim(0, min(105.0, max(10.0, 1.2 * tallest)))
    score_ax.set_title("Scores (IFEval: prompt-level strict; inst.: instruction-level)", fontsize=9)
    _bars(share_ax, rows, shares, "%", 0)
    share_ax.set_ylabel("Share nudged (% of tokens)")
    share_ax.set_ylim(0, 115)
    share_ax.set_title("Tokens written by the nudging model", fontsize=9)
    share_ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    return fig


def plot_scores(report: Mapping[str, Any], path: Path) -> None:
    """Write :func:`scores_figure` to ``path`` (PNG)."""
    scores_figure(report).savefig(path, dpi=150)


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
