"""Running an evaluation: every example of every task in every mode, on one resident pair.

Results are appended to ``<out>/results/<task>.jsonl`` as each answer is scored, one JSON
record per (mode, gamma, example), so an interrupted run resumes where it stopped: a rerun
with the same ``--out`` skips what is already there. ``<out>/run.json`` records what makes
results comparable (the models, their dtype, the algorithm's knobs); a rerun with other values
is refused rather than mixed in. Answers are read from the engine's events only.
"""

from __future__ import annotations

import asyncio
import copy
import json
import os
from collections.abc import Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator
from pydantic.fields import FieldInfo
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from ..backends.base import TextModel
from ..config import ALGORITHM_KNOBS, NudgingConfig
from ..prompts import ChatMessage
from ..request import Mode, Request
from ..serving.engine import NudgingEngine
from ..serving.generation import NudgingPair
from .tasks import TASKS, Example, Task, get_task, load_examples, sample

MODES: tuple[Mode, ...] = ("base", "nudging", "nudged")
#: The algorithm's knobs a run sets once, as NudgingConfig declares them (gamma is swept).
KNOBS: tuple[str, ...] = tuple(name for name in ALGORITHM_KNOBS if name != "gamma")
_DEFAULTS = {name: NudgingConfig.model_fields[name].default for name in KNOBS}


def _knob(name: str) -> tuple[Any, FieldInfo]:
    """A knob's field: its type, range, default and description, as NudgingConfig has them."""
    info = NudgingConfig.model_fields[name]
    return info.annotation, copy.copy(info)


if TYPE_CHECKING:  # the knobs are read by name (knobs()), so a type checker needs none
    _Knobs = BaseModel
else:
    _Knobs = create_model(
        "_Knobs",
        __config__=ConfigDict(frozen=True, extra="forbid"),
        **{name: _knob(name) for name in KNOBS},
    )


class EvalSettings(_Knobs):
    """What to run. Validated at the boundary: each message names the field and its range.

    Besides the fields below, every knob of :data:`KNOBS` (``max_tokens``, ``draft_tokens``,
    ...) is a field with NudgingConfig's default and range; ``max_tokens`` is the budget of
    each turn.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    tasks: tuple[str, ...] = Field(min_length=1, description=f"Any of {', '.join(TASKS)}.")
    modes: tuple[Mode, ...] = Field(default=MODES, min_length=1)
    gammas: tuple[float, ...] = Field(
        default=(NudgingConfig.model_fields["gamma"].default,),
        min_length=1,
        description="Nudged runs, one per gamma, each in [0, 1].",
    )
    limit: int | None = Field(default=None, ge=1, description="Examples per task (a sample).")
    seed: int = Field(default=0, ge=0, description="Seed of the sample drawn under limit.")
    concurrency: int = Field(
        default=4, ge=1, le=64, description="Requests in flight at once (batched by the engine)."
    )
    data_dir: str | None = Field(
        default=None, description="Folder of task files; None reads the Hugging Face hub."
    )

    @field_validator("tasks")
    @classmethod
    def _known_tasks(cls, tasks: tuple[str, ...]) -> tuple[str, ...]:
        for name in tasks:
            get_task(name)
        return tuple(dict.fromkeys(tasks))

    @field_validator("modes")
    @classmethod
    def _distinct_modes(cls, modes: tuple[Mode, ...]) -> tuple[Mode, ...]:
        return tuple(m for m in MODES if m in modes)

    @field_validator("gammas")
    @classmethod
    def _gammas_in_range(cls, gammas: tuple[float, ...]) -> tuple[float, ...]:
        for gamma in gammas:
            if not 0.0 <= gamma <= 1.0:
                raise ValueError(f"each gamma must be in [0, 1], got {gamma}")
        return tuple(sorted(set(gammas)))

    def cells(self) -> list[tuple[Mode, float | None]]:
        """(mode, gamma) pairs to run: gamma matters only to the nudged pair."""
        cells: list[tuple[Mode, float | None]] = []
        for mode in self.modes:
            if mode == "nudged":
                cells.extend((mode, gamma) for gamma in self.gammas)
            else:
                cells.append((mode, None))
        return cells

    def knobs(self) -> dict[str, Any]:
        """Each knob of :data:`KNOBS` and its value."""
        return {name: getattr(self, name) for name in KNOBS}

    def config(self, gamma: float | None) -> NudgingConfig:
        """The config of a cell: the knobs, and the cell's gamma (a nudged row's)."""
        cell = {} if gamma is None else {"gamma": gamma}
        return NudgingConfig.model_validate({**self.knobs(), **cell})

    def samples(self) -> dict[str, list[Example]]:
        """Each task's sample; a missing or malformed data file raises TaskDataError."""
        return {
            name: sample(load_examples(name, self.data_dir), self.limit, self.seed)
            for name in self.tasks
        }


class RunMismatchError(ValueError):
    """The output folder holds results made with other models or settings."""


_MODEL_KEYS = ("base", "nudging")


def model_identity(name: str) -> str:
    """A model's name without the address of its server (``model.gguf @ http://...``): the
    servers ``--runtime llamacpp`` starts listen on a free port, another one each run, and the
    same model on another server gives the same answers."""
    return name.split(" @ ", 1)[0]


def run_identity(pair: NudgingPair, settings: EvalSettings) -> dict[str, Any]:
    """What must match for results in one output folder to be comparable."""
    return {
        "base": model_identity(pair.base.name),
        "nudging": model_identity(pair.nudging.name),
        "dtype": _weights_dtype(pair.base),
        **settings.knobs(),
    }


def _weights_dtype(model: TextModel) -> str | None:
    """The dtype of a model's weights held in this process (``None`` for a backend that holds
    none here, such as a server)."""
    loaded = getattr(model, "loaded", None)
    return None if loaded is None else str(loaded.model.dtype).removeprefix("torch.")


def claim_output(out_dir: Path, identity: dict[str, Any]) -> None:
    """Create the output folder, or check that its results were made the same way."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "run.json"
    if path.is_file():
        # A knob a folder does not record was at its default (it was not a setting then).
        recorded = {**_DEFAULTS, **json.loads(path.read_text(encoding="utf-8"))}
        for key in _MODEL_KEYS:  # a folder may record a server's address with its model
            if isinstance(recorded.get(key), str):
                recorded[key] = model_identity(recorded[key])
        for key, value in identity.items():
            if recorded.get(key) != value:
                raise RunMismatchError(
                    f"{out_dir} holds results made with {key}={recorded.get(key)!r}; this run "
                    f"has {key}={value!r}: use another output folder or the same setting"
                )
        return
    path.write_text(json.dumps(identity, indent=2) + "\n", encoding="utf-8")


def _key(mode: str, gamma: float | None, example_id: str) -> tuple[str, float | None, str]:
    return mode, None if gamma is None else round(gamma, 6), example_id


class ResultStore:
    """One task's results file: read once, appended to record by record."""

    def __init__(self, out_dir: Path, task: str) -> None:
        self.path = out_dir / "results" / f"{task}.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.records: dict[tuple[str, float | None, str], dict[str, Any]] = {}
        if self.path.is_file():
            self._load()

    def _load(self) -> None:
        text = self.path.read_text(encoding="utf-8")
        lines = text.split("\n")
        kept: list[str] = []
        for index, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                if index == len(lines) - 1:  # a line cut short by an interruption: dropped
                    break
                raise RunMismatchError(f"{self.path}: line {index + 1} is not JSON") from None
            self.records[_key(record["mode"], record["gamma"], record["example_id"])] = record
            kept.append(line)
        if not text.endswith("\n") and text:
            self.path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")

    def has(self, mode: str, gamma: float | None, example_id: str) -> bool:
        return _key(mode, gamma, example_id) in self.records

    def add(self, record: dict[str, Any]) -> None:
        with self.path.open("a", encoding="utf-8") as file:
            file.write(json.dumps(record, ensure_ascii=False) + "\n")
            file.flush()
            os.fsync(file.fileno())
        self.records[_key(record["mode"], record["gamma"], record["example_id"])] = record


@dataclass(frozen=True)
class _Job:
    task: Task
    example: Example
    mode: Mode
    gamma: float | None


async def answer(engine: NudgingEngine, job: _Job, config: NudgingConfig) -> dict[str, Any]:
    """Ask every turn of one example in one mode; the record, scored."""
    task, example = job.task, job.example
    messages = [ChatMessage("system", task.system)]
    turns: list[dict[str, Any]] = []
    totals = {"tokens": 0, "nudge_tokens": 0, "wall_time": 0.0}
    finish_reason = None
    for text in example.turns:
        messages.append(ChatMessage("user", text))
        handle = engine.submit(Request(messages, config, job.mode, task.base_format))
        try:
            finished = await handle.aresult()
        finally:
            handle.cancel()  # no-op once finished; frees the request when the wait is cancelled
        stats = finished.stats
        turns.append(
            {
                "prompt": text,
                "answer": finished.text,
                "segments": [{"text": s.text, "source": s.source} for s in finished.segments],
            }
        )
        totals["tokens"] += stats.base_tokens + stats.nudge_tokens
        totals["nudge_tokens"] += stats.nudge_tokens
        totals["wall_time"] += stats.wall_time
        finish_reason = stats.finish_reason
        messages.append(ChatMessage("assistant", finished.text))
    result = task.score(example, turns[-1]["answer"])
    tokens = totals["tokens"]
    return {
        "task": task.name,
        "example_id": example.id,
        "mode": job.mode,
        "gamma": job.gamma,
        "turns": turns,
        "answer": turns[-1]["answer"],
        "reference": example.reference,
        "score": None if result is None else result.details,
        "primary": None if result is None else result.primary,
        "tokens": tokens,
        "nudge_tokens": totals["nudge_tokens"],
        "nudged_share": round(totals["nudge_tokens"] / tokens, 4) if tokens else 0.0,
        "wall_time": round(totals["wall_time"], 3),
        "finish_reason": finish_reason,
        "meta": dict(example.meta),
    }


def cell_label(task: str, mode: str, gamma: float | None) -> str:
    return f"{task} · {mode}" + ("" if gamma is None else f" γ={gamma:g}")


def slot_limit(pair: Any) -> int | None:
    """The fewest request slots of the pair's models, or None when neither has a limit.

    A llama.cpp server model pins one of its slots (``total_slots``) for each live request, and
    a request that finds them all held fails after waiting; more answers in flight than that
    would fail rather than queue.
    """
    limits = [getattr(model, "total_slots", None) for model in (pair.base, pair.nudging)]
    found = [n for n in limits if isinstance(n, int) and n > 0]
    return min(found) if found else None


async def _run_jobs(
    engine: NudgingEngine,
    settings: EvalSettings,
    concurrency: int,
    jobs: list[_Job],
    stores: dict[str, ResultStore],
    progress: Progress,
    bars: dict[tuple[str, Mode, float | None], Any],
    failures: list[str],
) -> None:
    queue: asyncio.Queue[_Job] = asyncio.Queue()
    for job in jobs:
        queue.put_nowait(job)

    async def worker() -> None:
        while not queue.empty():
            job = queue.get_nowait()
            try:
                record = await answer(engine, job, settings.config(job.gamma))
            except Exception as exc:  # one failed answer must not end the run; rerun retries it
                failures.append(
                    f"{cell_label(job.task.name, job.mode, job.gamma)} example {job.example.id}: "
                    f"{type(exc).__name__}: {exc}"
                )
                continue
            stores[job.task.name].add(record)
            progress.advance(bars[job.task.name, job.mode, job.gamma])

    await asyncio.gather(*(worker() for _ in range(min(concurrency, len(jobs)) or 1)))


def _run_to_end(work: Coroutine[Any, Any, None]) -> None:
    """Run on a loop of its own; beside the caller's loop when there is one (a notebook)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        asyncio.run(work)
        return
    with ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, work).result()


@dataclass
class EvalRun:
    """What a run produced: every selected record, and the answers that failed."""

    records: list[dict[str, Any]]
    failures: list[str]
    generated: int  # answers produced by this run (the rest were already in the folder)


def run_eval(
    pair: NudgingPair,
    settings: EvalSettings,
    out_dir: str | Path,
    *,
    console: Console | None = None,
    progress: bool = True,
    engine: NudgingEngine | None = None,
    samples: dict[str, list[Example]] | None = None,
) -> EvalRun:
    """Answer and score every selected example in every (mode, gamma) not yet in ``out_dir``.

    ``samples`` are ``settings.samples()`` when the caller has them already.
    """
    out_dir = Path(out_dir)
    claim_output(out_dir, run_identity(pair, settings))
    samples = samples if samples is not None else settings.samples()
    stores = {name: ResultStore(out_dir, name) for name in settings.tasks}
    # Example by example, every mode in turn: a run cut short leaves complete comparisons.
    jobs = [
        _Job(get_task(name), example, mode, gamma)
        for name in settings.tasks
        for example in samples[name]
        for mode, gamma in settings.cells()
        if not stores[name].has(mode, gamma, example.id)
    ]
    bars_console = console or Console(stderr=True)
    concurrency, slots = settings.concurrency, slot_limit(pair)
    if slots is not None and concurrency > slots:
        bars_console.print(
            f"concurrency {concurrency} is above the {slots} request slots of the pair's "
            f"server: {slots} answers at a time"
        )
        concurrency = slots
    own_engine = engine is None
    engine = engine or NudgingEngine(pair)
    failures: list[str] = []
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
    )
    try:
        with Progress(*columns, console=bars_console, disable=not progress) as bars_view:
            bars = {
                (name, mode, gamma): bars_view.add_task(
                    cell_label(name, mode, gamma),
                    total=len(samples[name]),
                    completed=sum(stores[name].has(mode, gamma, e.id) for e in samples[name]),
                )
                for name in settings.tasks
                for mode, gamma in settings.cells()
            }
            if jobs:
                _run_to_end(
                    _run_jobs(
                        engine, settings, concurrency, jobs, stores, bars_view, bars, failures
                    )
                )
    finally:
        if own_engine:
            engine.shutdown()
    records = [
        stores[name].records[key]
        for name in settings.tasks
        for mode, gamma in settings.cells()
        for example in samples[name]
        if (key := _key(mode, gamma, example.id)) in stores[name].records
    ]
    return EvalRun(records, failures, len(jobs) - len(failures))
