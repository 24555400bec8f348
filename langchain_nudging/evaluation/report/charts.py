"""Charts: scores by task (``scores.png``) and the sweep over gamma (``gamma_sweep.png``)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .numbers import BASELINES
from .rows import task_title


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
