"""Evaluation tasks: where each task's data lives, how an example is asked, what the gold is,
how an answer is scored and what the reports call the task. A new task is one :class:`Task`
entry in :data:`TASKS` (docs/evaluation.md).

Prompts follow the nudging paper (arXiv 2410.09300): reasoning tasks get the system prompt
"Answer the question by walking through the reasoning steps." and the question prefix
"Question: "; open-ended tasks get "You are a helpful assistant." and "Instruction: ". The base
model reads ``"{system}\\n{prefix}{question}\\nAnswer: "``; the nudging model reads the same
system prompt and question through its chat template. All three modes get the same prompts.
"""

from __future__ import annotations

import json
import random
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..prompts import BasePromptFormat
from .scoring import Score, score_date, score_gsm8k, score_ifeval, score_sports, score_strategyqa

REASONING_SYSTEM = "Answer the question by walking through the reasoning steps."
OPEN_SYSTEM = "You are a helpful assistant."
DATA_ENV_VAR = "LANGCHAIN_NUDGING_EVAL_DATA"


class TaskDataError(ValueError):
    """A task's data is missing or malformed, or the task is unknown."""


@dataclass(frozen=True)
class Example:
    """One question of a task. ``turns`` are the user messages (MT-bench has two)."""

    id: str
    turns: tuple[str, ...]
    reference: str | None = None  # the gold answer as shown in reports; None for open tasks
    choices: tuple[str, ...] = ()  # answer options of a choice task, in the order shown
    data: dict[str, Any] = field(default_factory=dict)  # what the scorer needs
    meta: dict[str, Any] = field(default_factory=dict)  # carried into the results


@dataclass(frozen=True)
class HubSource:
    """Where the task lives on the Hugging Face datasets hub (used without ``--data``)."""

    path: str
    name: str | None
    split: str


@dataclass(frozen=True)
class Task:
    """One task: its data, its prompts, its scorer."""

    name: str
    title: str  # as the reports' tables and charts show it
    kind: Literal["reasoning", "open"]
    file: str  # the file's path under the data folder
    hub: HubSource
    parse: Callable[[list[dict[str, Any]]], list[Example]]
    scorer: Callable[[Example, str], Score] | None  # None: answers go to an external judge

    @property
    def scored(self) -> bool:
        return self.scorer is not None

    def score(self, example: Example, answer: str) -> Score | None:
        """The answer's score, or ``None`` for a task that needs an external judge."""
        return None if self.scorer is None else self.scorer(example, answer)

    @property
    def system(self) -> str:
        return REASONING_SYSTEM if self.kind == "reasoning" else OPEN_SYSTEM

    @property
    def base_format(self) -> BasePromptFormat:
        prefix = "Question: " if self.kind == "reasoning" else "Instruction: "
        return BasePromptFormat(system=self.system, user_prefix=prefix)


# -- parsers: raw records (local file or hub rows) to examples ---------------------------------
def _ifeval(rows: list[dict[str, Any]]) -> list[Example]:
    return [
        Example(
            id=str(row["key"]),
            turns=(row["prompt"],),
            data={
                "key": row["key"],
                "prompt": row["prompt"],
                "instruction_id_list": list(row["instruction_id_list"]),
                "kwargs": [_drop_nones(k) for k in row["kwargs"]],
            },
            meta={"instructions": list(row["instruction_id_list"])},
        )
        for row in rows
    ]


def _drop_nones(kwargs: dict[str, Any]) -> dict[str, Any]:
    # The hub's copy of IFEval fills every kwarg name with null; the checkers want only set ones.
    return {k: v for k, v in kwargs.items() if v is not None}


def _gsm8k(rows: list[dict[str, Any]]) -> list[Example]:
    examples = []
    for index, row in enumerate(rows):
        gold = row["answer"].rsplit("####", 1)
        if len(gold) != 2:
            raise TaskDataError(f"gsm8k: record {index} has no '#### <number>' in its answer")
        examples.append(Example(id=str(index), turns=(row["question"],), reference=gold[1].strip()))
    return examples


def _target_scores(row: dict[str, Any]) -> dict[str, float]:
    """BIG-bench's ``target_scores``, or the hub's multiple_choice_targets/scores columns."""
    if "target_scores" in row:
        return dict(row["target_scores"])
    return dict(zip(row["multiple_choice_targets"], row["multiple_choice_scores"], strict=True))


def _bigbench_rows(rows: list[dict[str, Any]]) -> list[tuple[str, dict[str, float]]]:
    out = []
    for row in rows:
        question = row.get("input", row.get("inputs"))
        if question is None:
            raise TaskDataError("bigbench: a record has neither 'input' nor 'inputs'")
        out.append((str(question).strip(), _target_scores(row)))
    return out


def _gold(scores: dict[str, float]) -> str:
    return max(scores, key=lambda option: scores[option])


def _date(rows: list[dict[str, Any]]) -> list[Example]:
    """Options are shown as (A)...(F) in an order shuffled once per example (the file lists
    the right one first)."""
    examples = []
    for index, (question, scores) in enumerate(_bigbench_rows(rows)):
        options = sorted(scores)
        random.Random(index).shuffle(options)
        lines = [f"({string.ascii_uppercase[i]}) {option}" for i, option in enumerate(options)]
        text = question + "\nOptions:\n" + "\n".join(lines)
        examples.append(
            Example(id=str(index), turns=(text,), reference=_gold(scores), choices=tuple(options))
        )
    return examples


def _sports(rows: list[dict[str, Any]]) -> list[Example]:
    return [
        Example(
            id=str(index),
            turns=(f'Is the following statement plausible or implausible? "{question}."',),
            reference=_gold(scores),
            choices=("plausible", "implausible"),
        )
        for index, (question, scores) in enumerate(_bigbench_rows(rows))
    ]


def _strategyqa(rows: list[dict[str, Any]]) -> list[Example]:
    examples = []
    for index, (question, scores) in enumerate(_bigbench_rows(rows)):
        # The hub's copy puts "Q: ... A:" around the question; the local file does not.
        question = question.removeprefix("Q:").removesuffix("A:").strip()
        gold = _gold(scores)
        examples.append(Example(str(index), (question,), reference=gold, choices=("Yes", "No")))
    return examples


def _just_eval(rows: list[dict[str, Any]]) -> list[Example]:
    return [
        Example(
            id=str(row["id"]),
            turns=(row["instruction"],),
            meta={k: row.get(k) for k in ("source_id", "dataset", "category")},
        )
        for row in rows
    ]


def _mt_bench(rows: list[dict[str, Any]]) -> list[Example]:
    examples = []
    for row in rows:
        turns = row.get("turns", row.get("prompt"))
        question_id = row.get("question_id", row.get("prompt_id"))
        if not turns or question_id is None:
            raise TaskDataError("mt-bench: a record lacks 'turns' or 'question_id'")
        examples.append(
            Example(
                id=str(question_id),
                turns=tuple(turns),
                meta={"question_id": int(question_id), "category": row.get("category")},
            )
        )
    return examples


_BIGBENCH = "tasksource/bigbench"
TASKS: dict[str, Task] = {
    task.name: task
    for task in (
        Task(
            "ifeval",
            "IFEval",
            "open",
            "ifeval_input_data.jsonl",
            HubSource("google/IFEval", None, "train"),
            _ifeval,
            score_ifeval,
        ),
        Task(
            "gsm8k",
            "GSM8K",
            "reasoning",
            "gsm8k_test.jsonl",
            HubSource("openai/gsm8k", "main", "test"),
            _gsm8k,
            score_gsm8k,
        ),
        Task(
            "bigbench-date",
            "BB Date",
            "reasoning",
            "bigbench/date_understanding.json",
            HubSource(_BIGBENCH, "date_understanding", "train"),
            _date,
            score_date,
        ),
        Task(
            "bigbench-sports",
            "BB Sports",
            "reasoning",
            "bigbench/sports_understanding.json",
            HubSource(_BIGBENCH, "sports_understanding", "train"),
            _sports,
            score_sports,
        ),
        Task(
            "strategyqa",
            "StrategyQA",
            "reasoning",
            "bigbench/strategyqa.json",
            HubSource(_BIGBENCH, "strategyqa", "train"),
            _strategyqa,
            score_strategyqa,
        ),
        Task(
            "just-eval",
            "Just-Eval",
            "open",
            "just_eval_instruct_1000.jsonl",
            HubSource("re-align/just-eval-instruct", None, "test"),
            _just_eval,
            None,
        ),
        Task(
            "mt-bench",
            "MT-Bench",
            "open",
            "mt_bench_question.jsonl",
            HubSource("HuggingFaceH4/mt_bench_prompts", None, "train"),
            _mt_bench,
            None,
        ),
    )
}


def get_task(name: str) -> Task:
    try:
        return TASKS[name]
    except KeyError:
        known = ", ".join(TASKS)
        raise TaskDataError(f"task: {name!r} is not one of {known}") from None


# -- loading ------------------------------------------------------------------------------------
def read_records(path: Path) -> list[dict[str, Any]]:
    """A JSONL file, a JSON list, or a BIG-bench task.json (its ``examples``)."""
    if not path.is_file():
        raise TaskDataError(f"{path}: no such file")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".jsonl":
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise TaskDataError(f"{path}: not valid JSON ({exc})") from exc
    if isinstance(data, dict) and "examples" in data:
        return list(data["examples"])
    if isinstance(data, list):
        return data
    raise TaskDataError(f"{path}: expected a list of records or a BIG-bench task.json")


def _hub_rows(source: HubSource) -> list[dict[str, Any]]:
    try:
        import datasets  # optional: only for data taken from the hub
    except ImportError as exc:
        raise TaskDataError(
            "reading tasks from the Hugging Face hub needs the optional `datasets` package "
            "(pip install datasets); or pass a data folder holding the task files"
        ) from exc
    rows = datasets.load_dataset(source.path, source.name, split=source.split)
    return [dict(row) for row in rows]


def load_examples(task: Task | str, data_dir: str | Path | None = None) -> list[Example]:
    """Every example of a task, from ``data_dir/<task file>`` or, without a folder, the hub."""
    task = get_task(task) if isinstance(task, str) else task
    if data_dir is None:
        rows = _hub_rows(task.hub)
    else:
        path = Path(data_dir) / task.file
        if not path.is_file():
            raise TaskDataError(
                f"{task.name}: no file {task.file!r} in the data folder {str(data_dir)!r}"
            )
        rows = read_records(path)
    try:
        examples = task.parse(rows)
    except (KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, TaskDataError):
            raise
        raise TaskDataError(f"{task.name}: a record is malformed ({exc!r})") from exc
    if not examples:
        raise TaskDataError(f"{task.name}: the data holds no examples")
    return examples


def sample(examples: Sequence[Example], limit: int | None, seed: int) -> list[Example]:
    """``limit`` examples drawn with ``seed``, in file order. A larger limit with the same seed
    keeps every example of a smaller one, so results already written are reused."""
    if limit is None or limit >= len(examples):
        return list(examples)
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    return [examples[i] for i in sorted(order[:limit])]
