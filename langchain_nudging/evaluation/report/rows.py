"""Rows and grouping: a run's records by row (a mode, and a nudged row's gamma), task and
example."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from ..tasks import TASKS

Record = Mapping[str, Any]

TASK_TITLES = {name: task.title for name, task in TASKS.items()}
"""Column titles, in the order the tables list the tasks; other tasks follow by name."""

OPEN_TASKS = tuple(name for name, task in TASKS.items() if not task.scored)
"""Tasks without an automatic score: their answers go to an external judge."""

_MODE_ORDER = ("base", "nudging", "nudged")


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


class Results:
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
