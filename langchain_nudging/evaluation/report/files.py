"""All files: every report file of a run, written into one folder."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from .answers import answers_page
from .charts import plot_gamma_sweep, plot_scores
from .judge import just_eval_entries, mt_bench_answers
from .numbers import summarize
from .rows import Record, Results
from .tables import render_markdown


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
    results = Results(records)
    report = summarize(results, seed, resamples)
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
    paths["answers"].write_text(answers_page(results), encoding="utf-8")

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
