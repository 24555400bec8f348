"""Judge exports: the answers of the tasks without an automatic score, in the input formats
of their external judges (Just-Eval, MT-Bench)."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterable
from typing import Any

from .answers import record_turns
from .rows import Record


def _int_or_str(value: Any) -> Any:
    text = str(value)
    return int(text) if text.isdigit() else value


def just_eval_entries(records: Iterable[Record], generator: str) -> list[dict[str, Any]]:
    """One row's Just-Eval answers in the just-eval repository's input format."""
    entries = []
    for record in records:
        meta = record.get("meta") or {}
        turns = record_turns(record)
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
        turns = [str(turn.get("answer") or "") for turn in record_turns(record)]
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
