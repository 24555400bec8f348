"""Measure nudging on a pair: the base model alone, the nudging model alone and the nudged
pair on the paper's tasks, scored offline, with a report (tables, plots, an HTML page)."""

from .runner import EvalRun, EvalSettings, RunMismatchError, run_eval
from .scoring import Score, ScoringSetupError
from .tasks import TASKS, Example, Task, TaskDataError, load_examples, sample

__all__ = [
    "TASKS",
    "EvalRun",
    "EvalSettings",
    "Example",
    "RunMismatchError",
    "Score",
    "ScoringSetupError",
    "Task",
    "TaskDataError",
    "load_examples",
    "run_eval",
    "sample",
]
