"""Evaluation tasks and scorers: the data files, the sample, and hand-made right and wrong
answers for every scorer (IFEval through lm-eval's checkers, offline)."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path
from typing import Any

import pytest

from langchain_nudging.evaluation import TASKS, Example, TaskDataError, load_examples, sample
from langchain_nudging.evaluation.scoring import (
    date_options,
    extract_choice,
    extract_last_number,
    ifeval_module,
    punkt_tab_dir,
    sports_options,
    word_options,
)
from langchain_nudging.evaluation.tasks import REASONING_SYSTEM, get_task

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason="../shared/data is not there")

EXPECTED_SIZES = {
    "ifeval": 541,
    "gsm8k": 1319,
    "bigbench-date": 369,
    "bigbench-sports": 1000,
    "strategyqa": 2290,
    "just-eval": 1000,
    "mt-bench": 80,
}


# -- data --------------------------------------------------------------------------------------
@needs_data
@pytest.mark.parametrize("name", list(TASKS))
def test_every_task_loads_from_the_shared_data(name: str) -> None:
    examples = load_examples(name, DATA)
    assert len(examples) == EXPECTED_SIZES[name]
    assert len({e.id for e in examples}) == len(examples)  # ids identify results
    assert all(e.turns and all(t.strip() for t in e.turns) for e in examples)
    task = get_task(name)
    if task.scored and name != "ifeval":
        assert all(e.reference for e in examples)
    if task.name in ("bigbench-date", "bigbench-sports", "strategyqa"):
        assert all(e.reference in e.choices for e in examples)


@needs_data
def test_prompts_follow_the_paper() -> None:
    gsm8k, ifeval = get_task("gsm8k"), get_task("ifeval")
    assert gsm8k.system == REASONING_SYSTEM
    assert gsm8k.base_format.user_prefix == "Question: "
    assert ifeval.system == "You are a helpful assistant."
    assert ifeval.base_format.user_prefix == "Instruction: "
    first = load_examples("gsm8k", DATA)[0]
    assert first.reference == "18"
    assert first.turns[0].startswith("Janet’s ducks lay 16 eggs")


@needs_data
def test_date_options_are_shuffled_once_and_lettered() -> None:
    examples = load_examples("bigbench-date", DATA)
    positions = {e.choices.index(e.reference) for e in examples}
    assert len(positions) > 3  # the file lists the right option first; the prompt does not
    first = examples[0]
    assert "\nOptions:\n(A) " in first.turns[0]
    assert load_examples("bigbench-date", DATA)[0] == first  # the same order every time
    assert len(load_examples("mt-bench", DATA)[0].turns) == 2


@needs_data
def test_sample_is_seeded_and_grows_by_adding() -> None:
    examples = load_examples("gsm8k", DATA)
    ten, twenty = sample(examples, 10, seed=3), sample(examples, 20, seed=3)
    assert [e.id for e in ten] == [e.id for e in sample(examples, 10, seed=3)]
    assert {e.id for e in ten} <= {e.id for e in twenty}
    assert [e.id for e in ten] != [e.id for e in sample(examples, 10, seed=4)]
    assert [int(e.id) for e in ten] == sorted(int(e.id) for e in ten)
    assert sample(examples, None, 0) == examples
    assert sample(examples, 5000, 0) == examples


def test_unknown_task_and_missing_file_are_clear(tmp_path: Path) -> None:
    with pytest.raises(TaskDataError, match=r"task: 'gsm9k' is not one of ifeval, gsm8k"):
        load_examples("gsm9k", tmp_path)
    with pytest.raises(TaskDataError, match=r"gsm8k: no file 'gsm8k_test.jsonl' in the data"):
        load_examples("gsm8k", tmp_path)


def test_malformed_records_are_clear(tmp_path: Path) -> None:
    (tmp_path / "gsm8k_test.jsonl").write_text('{"question": "1+1?", "answer": "2"}\n')
    with pytest.raises(TaskDataError, match=r"gsm8k: record 0 has no '#### <number>'"):
        load_examples("gsm8k", tmp_path)
    (tmp_path / "gsm8k_test.jsonl").write_text('{"question": "1+1?"}\n')
    with pytest.raises(TaskDataError, match=r"gsm8k: a record is malformed \(KeyError"):
        load_examples("gsm8k", tmp_path)
    (tmp_path / "gsm8k_test.jsonl").write_text("{not json\n")
    with pytest.raises(TaskDataError, match=r"gsm8k_test.jsonl: not valid JSON"):
        load_examples("gsm8k", tmp_path)
    (tmp_path / "gsm8k_test.jsonl").write_text("")
    with pytest.raises(TaskDataError, match=r"gsm8k: the data holds no examples"):
        load_examples("gsm8k", tmp_path)


def test_hub_rows_go_through_the_datasets_package(monkeypatch: pytest.MonkeyPatch) -> None:
    """The hub cannot be reached here: a stand-in `datasets` module returns rows in the hub's
    shapes (IFEval's null kwargs, tasksource/bigbench's columns, MT-bench prompts)."""
    asked: list[tuple[str, str | None, str]] = []
    rows: dict[str, list[dict[str, Any]]] = {
        "google/IFEval": [
            {
                "key": 7,
                "prompt": "Say hi in one sentence.",
                "instruction_id_list": ["length_constraints:number_sentences"],
                "kwargs": [{"num_sentences": 1, "relation": "less than", "num_words": None}],
            }
        ],
        "tasksource/bigbench": [
            {
                "inputs": "Q: Is water wet? A:",
                "multiple_choice_targets": ["Yes", "No"],
                "multiple_choice_scores": [1, 0],
            }
        ],
        "HuggingFaceH4/mt_bench_prompts": [
            {"prompt": ["Hi?", "And?"], "prompt_id": 81, "category": "writing"}
        ],
    }

    def load_dataset(path: str, name: str | None = None, split: str = "train") -> Any:
        asked.append((path, name, split))
        return rows[path]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    (ifeval,) = load_examples("ifeval")
    assert ifeval.data["kwargs"] == [{"num_sentences": 1, "relation": "less than"}]
    (question,) = load_examples("strategyqa")
    assert question.turns == ("Is water wet?",)
    assert question.reference == "Yes"
    (mt,) = load_examples("mt-bench")
    assert mt.turns == ("Hi?", "And?")
    assert mt.meta["question_id"] == 81
    assert asked == [
        ("google/IFEval", None, "train"),
        ("tasksource/bigbench", "strategyqa", "train"),
        ("HuggingFaceH4/mt_bench_prompts", None, "train"),
    ]


def test_hub_without_datasets_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(TaskDataError, match=r"pip install datasets\); or pass a data folder"):
        load_examples("gsm8k")


# -- scorers -----------------------------------------------------------------------------------
def ifeval_example(instructions: list[str], kwargs: list[dict[str, Any]]) -> Example:
    data = {"key": 1, "prompt": "p", "instruction_id_list": instructions, "kwargs": kwargs}
    return Example(id="1", turns=("p",), data=data)


def test_punkt_tab_tables_are_written_offline() -> None:
    english = punkt_tab_dir() / "tokenizers" / "punkt_tab" / "english"
    files = {p.name for p in english.iterdir()}
    assert {
        "abbrev_types.txt",
        "collocations.tab",
        "ortho_context.tab",
        "sent_starters.txt",
    } <= files
    ifeval_module()
    import nltk

    # NLTK itself now splits sentences with them, abbreviations included.
    text = "Dr. Smith went home at 3 p.m. today. He was tired."
    assert nltk.sent_tokenize(text) == ["Dr. Smith went home at 3 p.m. today.", "He was tired."]


@pytest.mark.parametrize(
    ("instruction", "kwargs", "right", "wrong"),
    [
        # needs punkt_tab: sentences are counted with NLTK's Punkt tables
        (
            "length_constraints:number_sentences",
            {"relation": "less than", "num_sentences": 3},
            "Dr. Smith went home. He was tired.",
            "One. Two. Three. Four.",
        ),
        # needs punkt_tab: word_tokenize splits sentences first
        (
            "change_case:capital_word_frequency",
            {"capital_relation": "at least", "capital_frequency": 2},
            "The NASA and ESA teams met.",
            "The teams met.",
        ),
        ("punctuation:no_comma", {}, "No commas here.", "Commas, here."),
        (
            "detectable_format:number_bullet_lists",
            {"num_bullets": 2},
            "* one\n* two",
            "* one",
        ),
        ("change_case:english_lowercase", {}, "all lower case.", "Not lower."),
        ("language:response_language", {"language": "en"}, "This is English.", "Das ist gut."),
    ],
)
def test_ifeval_checkers(instruction: str, kwargs: dict[str, Any], right: str, wrong: str) -> None:
    example = ifeval_example([instruction], [kwargs])
    good, bad = TASKS["ifeval"].score(example, right), TASKS["ifeval"].score(example, wrong)
    assert good is not None
    assert bad is not None
    assert good.primary == 1.0
    assert good.details["inst_level_strict_acc"] == [True]
    assert bad.primary == 0.0
    assert bad.details["prompt_level_loose_acc"] is False


def test_ifeval_reports_all_four_metrics() -> None:
    example = ifeval_example(["punctuation:no_comma", "change_case:english_lowercase"], [{}, {}])
    result = TASKS["ifeval"].score(example, "**Title**\nall lower, with a comma\nthe end")
    assert result is not None
    assert set(result.details) == {
        "prompt_level_strict_acc",
        "inst_level_strict_acc",
        "prompt_level_loose_acc",
        "inst_level_loose_acc",
    }
    assert result.details["inst_level_strict_acc"] == [False, False]
    # loose: the first line (with capitals) dropped -> lower case holds; the comma stays
    assert result.details["inst_level_loose_acc"] == [False, True]


def test_ifeval_checks_are_seeded() -> None:
    """A missing argument is drawn at random by the checker: seeded, the same every time."""
    example = ifeval_example(["detectable_format:number_bullet_lists"], [{}])
    answers = ["* a", "* a\n* b", "* a\n* b\n* c", "* a\n* b\n* c\n* d", "* a\n* b\n* c\n* d\n* e"]
    first = [TASKS["ifeval"].score(example, a).primary for a in answers]  # type: ignore[union-attr]
    assert [TASKS["ifeval"].score(example, a).primary for a in answers] == first  # type: ignore[union-attr]
    assert sum(first) == 1  # exactly one bullet count is right


@pytest.mark.parametrize(
    ("answer", "extracted"),
    [
        ("She makes 9 * 2 = $18 every day.", "18"),
        ("The total is 1,234 apples.", "1234"),
        ("It costs $5.50.", "5.50"),
        ("First 3, then 4, so the answer is -7.", "-7"),
        ("No number here.", None),
    ],
)
def test_gsm8k_takes_the_last_number(answer: str, extracted: str | None) -> None:
    assert extract_last_number(answer) == extracted


def test_gsm8k_exact_match() -> None:
    example = Example(id="0", turns=("q",), reference="18")
    assert TASKS["gsm8k"].score(example, "16 - 3 - 4 = 9 eggs; 9 * 2 = 18.").primary == 1.0  # type: ignore[union-attr]
    assert TASKS["gsm8k"].score(example, "The answer is 18 dollars, not 20.").primary == 0.0  # type: ignore[union-attr]
    result = TASKS["gsm8k"].score(example, "9 eggs")
    assert result is not None
    assert result.details == {"exact_match": 0, "extracted": "9"}


DATE = Example(
    id="0",
    turns=("q",),
    reference="05/01/2021",
    choices=("04/29/2021", "05/01/2021", "02/23/2021"),
)
SPORTS = Example(
    id="0", turns=("q",), reference="implausible", choices=("plausible", "implausible")
)
YES_NO = Example(id="0", turns=("q",), reference="No", choices=("Yes", "No"))
CHOICE_RULES = {
    "bigbench-date": (date_options, False),
    "bigbench-sports": (sports_options, False),
    "strategyqa": (word_options, True),  # StrategyQA answers open with their verdict
}


@pytest.mark.parametrize(
    ("task", "example", "answer", "extracted"),
    [
        ("bigbench-date", DATE, "Yesterday was 04/30, so today is (B).", "05/01/2021"),
        ("bigbench-date", DATE, "It is not 04/29/2021; it is 05/01/2021.", "05/01/2021"),
        ("bigbench-date", DATE, "So the answer is (A) 04/29/2021.", "04/29/2021"),
        ("bigbench-date", DATE, "I cannot tell.", None),
        ("bigbench-sports", SPORTS, "This is implausible.", "implausible"),
        ("bigbench-sports", SPORTS, "It sounds plausible, but it is not plausible.", "implausible"),
        ("bigbench-sports", SPORTS, "The answer is plausible.", "plausible"),
        ("strategyqa", YES_NO, "No. Frost needs cold; yes, it happens.", "No"),
        ("strategyqa", YES_NO, "Yes, maybe. So the answer is no.", "No"),
        ("strategyqa", YES_NO, "Frost is common, yes.", "Yes"),
    ],
)
def test_choice_extraction(task: str, example: Example, answer: str, extracted: str | None) -> None:
    options, verdict_first = CHOICE_RULES[task]
    assert extract_choice(example, answer, options, verdict_first) == extracted
    result = TASKS[task].score(example, answer)
    assert result is not None
    assert result.primary == float(extracted is not None and extracted == example.reference)


def test_each_task_carries_its_title_and_scorer() -> None:
    assert [task.title for task in TASKS.values()] == [
        "IFEval", "GSM8K", "BB Date", "BB Sports", "StrategyQA", "Just-Eval", "MT-Bench",
    ]  # fmt: skip
    assert [name for name, task in TASKS.items() if not task.scored] == ["just-eval", "mt-bench"]
    assert all(task.scored == (task.scorer is not None) for task in TASKS.values())


def test_open_tasks_have_no_automatic_score() -> None:
    example = Example(id="1", turns=("Write a poem.",))
    assert TASKS["just-eval"].score(example, "A poem.") is None
    assert TASKS["mt-bench"].score(example, "A poem.") is None


def test_records_of_real_data_score(tmp_path: Path) -> None:
    """A BIG-bench task.json in the shape the data folder has."""
    folder = tmp_path / "bigbench"
    folder.mkdir()
    task = {
        "examples": [
            {
                "input": "Tom Brady threw a touchdown",
                "target_scores": {"plausible": 1, "implausible": 0},
            }
        ]
    }
    (folder / "sports_understanding.json").write_text(json.dumps(task))
    (example,) = load_examples("bigbench-sports", tmp_path)
    assert example.turns == (
        'Is the following statement plausible or implausible? "Tom Brady threw a touchdown."',
    )
    assert TASKS["bigbench-sports"].score(example, "That is plausible.").primary == 1.0  # type: ignore[union-attr]
