"""Reports of an evaluation run: tables, paired differences, charts, an answer browser.

The input is the run's records, one per example and *row*: a row is a mode plus, for the
nudged pair, its gamma (``base``, ``nudging``, then one ``nudged`` row per gamma). From them:

* :func:`build_report` summarises each row and task (scores, IFEval metrics, share nudged,
  speed) and the paired differences nudged - base and nudged - nudging with bootstrap intervals
  (numbers.py);
* :func:`write_report` writes ``report.md``, ``report.json``, ``scores.png``,
  ``gamma_sweep.png`` (two or more gammas), ``answers.html`` and, for the tasks without an
  automatic score (Just-Eval, MT-Bench), the input files of their external judges (files.py,
  with tables.py, charts.py, answers.py and judge.py);
* :func:`main_table` builds the main table for the terminal (tables.py): scores, IFEval's
  instruction-level accuracies, share nudged and answers cut per row.

A record appearing twice for the same row, task and example counts once (the last one wins).
"""

from .answers import render_answers_html
from .charts import plot_gamma_sweep, plot_scores, score_groups, scores_figure, share_groups
from .files import write_report
from .judge import just_eval_entries, mt_bench_answers
from .numbers import (
    BASELINES,
    CI_LEVEL,
    build_report,
    ifeval_metrics,
    paired_bootstrap_ci,
    summarize_cell,
)
from .rows import OPEN_TASKS, TASK_TITLES, Row, find_rows, order_tasks, task_title
from .tables import main_table, main_table_cells, percent, render_markdown, signed_points

__all__ = [
    "BASELINES",
    "CI_LEVEL",
    "OPEN_TASKS",
    "TASK_TITLES",
    "Row",
    "build_report",
    "find_rows",
    "ifeval_metrics",
    "just_eval_entries",
    "main_table",
    "main_table_cells",
    "mt_bench_answers",
    "order_tasks",
    "paired_bootstrap_ci",
    "percent",
    "plot_gamma_sweep",
    "plot_scores",
    "render_answers_html",
    "render_markdown",
    "score_groups",
    "scores_figure",
    "share_groups",
    "signed_points",
    "summarize_cell",
    "task_title",
    "write_report",
]
