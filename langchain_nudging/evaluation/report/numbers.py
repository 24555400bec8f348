"""Numbers: each row's scores per task, and the paired differences with bootstrap intervals."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from ..scoring import IFEVAL_METRICS
from .rows import Record, Results

BASELINES = ("base", "nudging")
"""The rows each nudged row is compared with."""

CI_LEVEL = 0.95
"""Coverage of the paired-bootstrap intervals."""

_BOOTSTRAP_CHUNK = 1 << 21  # resampled indices held at once


def _mean(values: Sequence[float]) -> float | None:
    return float(sum(values) / len(values)) if values else None


def ratio(numerator: float, denominator: float) -> float | None:
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
        "nudged_share": ratio(nudge_tokens, tokens),
        "tokens_per_s": ratio(tokens, wall_time),
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


def _paired(results: Results, seed: int, resamples: int) -> list[dict[str, Any]]:
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
    tasks), ``totals[row_slug]`` (the row over all its tasks: ``n``, ``tokens``,
    ``nudge_tokens``, token-weighted ``nudged_share``, ``cut``), ``paired`` (one entry per
    nudged row, baseline and scored task: mean difference of primary scores over the examples
    both rows answered, its 95% paired-bootstrap interval ``ci_low``/``ci_high`` and ``n``
    pairs; each interval uses a generator seeded by ``seed``), ``bootstrap`` (seed,
    resamples, level) and ``n_records``. Scores are fractions in 0..1.
    """
    return summarize(Results(records), seed, resamples)


def _row_totals(cells: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """A row over all its tasks: answers, tokens, share nudged (token-weighted), answers cut."""
    cells = list(cells)
    tokens = sum(cell["tokens"] for cell in cells)
    nudge_tokens = sum(cell["nudge_tokens"] for cell in cells)
    return {
        "n": sum(cell["n"] for cell in cells),
        "tokens": tokens,
        "nudge_tokens": nudge_tokens,
        "nudged_share": ratio(nudge_tokens, tokens),
        "cut": sum(cell["cut"] for cell in cells),
    }


def summarize(results: Results, seed: int, resamples: int) -> dict[str, Any]:
    cells = {
        row.slug: {
            task: summarize_cell(results.cell(row.slug, task).values(), task)
            for task in results.tasks
            if results.cell(row.slug, task)
        }
        for row in results.rows
    }
    totals = {slug: _row_totals(by_task.values()) for slug, by_task in cells.items()}
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
        "totals": totals,
        "paired": _paired(results, seed, resamples),
        "bootstrap": {"seed": seed, "resamples": resamples, "level": CI_LEVEL},
        "n_records": len(results.records),
    }
