"""The evaluation runner on tiny models: records, resume, refusals, failures, the report."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from langchain_nudging.backends.registry import text_model
from langchain_nudging.config import ALGORITHM_KNOBS, NudgingConfig
from langchain_nudging.evaluation import EvalSettings, RunMismatchError, run_eval
from langchain_nudging.evaluation.report import write_report
from langchain_nudging.evaluation.runner import KNOBS, claim_output, model_identity, slot_limit
from langchain_nudging.evaluation.tasks import get_task
from langchain_nudging.prompts import ChatMessage
from langchain_nudging.request import Request
from langchain_nudging.serving.generation import NudgingPair

QUESTIONS = ["What is 2 + 3?", "Tom has 4 apples and eats 1. How many are left?", "What is 6 * 7?"]
GOLD = ["5", "3", "42"]


@pytest.fixture(scope="module")
def pair(llama_a: Any, gemma_b: Any) -> NudgingPair:
    return NudgingPair(text_model(llama_a), text_model(gemma_b))


@pytest.fixture
def data(tmp_path: Path) -> Path:
    folder = tmp_path / "data"
    folder.mkdir()
    with (folder / "gsm8k_test.jsonl").open("w") as file:
        for question, gold in zip(QUESTIONS, GOLD, strict=True):
            file.write(json.dumps({"question": question, "answer": f"So.\n#### {gold}"}) + "\n")
    with (folder / "mt_bench_question.jsonl").open("w") as file:
        file.write(
            json.dumps({"question_id": 81, "category": "writing", "turns": ["Hi.", "More."]}) + "\n"
        )
    return folder


def settings(data: Path, **changes: Any) -> EvalSettings:
    values: dict[str, Any] = {
        "tasks": ["gsm8k", "mt-bench"],
        "gammas": [0.4],
        "max_tokens": 12,
        "concurrency": 3,
        "data_dir": str(data),
    }
    return EvalSettings(**{**values, **changes})


def lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_every_example_in_every_mode_is_written_and_scored(
    pair: NudgingPair, data: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    run = run_eval(pair, settings(data), out, progress=False)
    assert run.failures == []
    assert run.generated == (3 + 1) * 3
    gsm8k = lines(out / "results" / "gsm8k.jsonl")
    assert {(r["mode"], r["gamma"]) for r in gsm8k} == {
        ("base", None),
        ("nudging", None),
        ("nudged", 0.4),
    }
    for record in gsm8k:
        assert record["primary"] in (0.0, 1.0)
        assert record["score"]["exact_match"] == int(record["primary"])
        assert record["reference"] == GOLD[int(record["example_id"])]
        (turn,) = record["turns"]
        assert "".join(s["text"] for s in turn["segments"]) == turn["answer"] == record["answer"]
        assert 0 < record["tokens"] <= 12
    share = {r["mode"]: r["nudged_share"] for r in gsm8k}
    assert share["base"] == 0.0
    assert share["nudging"] == 1.0
    (mt,) = [r for r in lines(out / "results" / "mt-bench.jsonl") if r["mode"] == "nudged"]
    assert [t["prompt"] for t in mt["turns"]] == ["Hi.", "More."]
    assert mt["score"] is None
    assert mt["meta"] == {"question_id": 81, "category": "writing"}
    identity = json.loads((out / "run.json").read_text())
    assert identity == {
        "base": "tiny-llama",
        "nudging": "tiny-gemma3",
        "dtype": "float32",
        **{name: NudgingConfig.model_fields[name].default for name in KNOBS},
        "max_tokens": 12,
    }


def test_answers_are_what_the_pair_gives_alone(
    pair: NudgingPair, data: Path, tmp_path: Path
) -> None:
    """The same prompts as the paper's: the task's system prompt and question prefix, in
    every mode; the second MT-bench turn sees the first answer."""
    run = run_eval(pair, settings(data, concurrency=1), tmp_path / "out", progress=False)
    config = NudgingConfig(gamma=0.4, max_tokens=12)
    for record in run.records:
        task = get_task(record["task"])
        messages = [ChatMessage("system", task.system)]
        for turn in record["turns"]:
            messages.append(ChatMessage("user", turn["prompt"]))
            request = Request(messages, config, record["mode"], task.base_format)
            generation = pair.generate(request)
            assert "".join(s.text for s in generation) == turn["answer"]
            messages.append(ChatMessage("assistant", turn["answer"]))


def test_a_rerun_resumes_and_an_interrupted_line_is_dropped(
    pair: NudgingPair, data: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    first = run_eval(pair, settings(data, tasks=["gsm8k"]), out, progress=False)
    path = out / "results" / "gsm8k.jsonl"
    kept = path.read_text().splitlines()
    # as if the run had been killed while writing its last record
    path.write_text("\n".join(kept[:-1]) + "\n" + kept[-1][: len(kept[-1]) // 2])
    again = run_eval(pair, settings(data, tasks=["gsm8k"]), out, progress=False)
    assert again.generated == 1
    assert path.read_text().splitlines()[:-1] == kept[:-1]
    assert len(lines(path)) == len(kept)
    assert {r["example_id"] for r in again.records} == {r["example_id"] for r in first.records}
    # nothing left to do: a rerun answers nothing and gives the same records
    assert run_eval(pair, settings(data, tasks=["gsm8k"]), out, progress=False).generated == 0
    # a sweep adds only the new gamma's answers
    sweep = run_eval(pair, settings(data, tasks=["gsm8k"], gammas=[0.2, 0.4]), out, progress=False)
    assert sweep.generated == 3
    assert {r["gamma"] for r in sweep.records if r["mode"] == "nudged"} == {0.2, 0.4}


async def test_runs_inside_a_running_event_loop(
    pair: NudgingPair, data: Path, tmp_path: Path
) -> None:
    """As in a notebook: the caller's loop is running; the run uses a loop of its own."""
    run = run_eval(pair, settings(data, tasks=["gsm8k"], limit=1), tmp_path / "out")
    assert run.failures == []
    assert len(run.records) == 3


def test_other_settings_are_refused_not_mixed(
    pair: NudgingPair, data: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    run_eval(pair, settings(data, tasks=["gsm8k"], limit=1), out, progress=False)
    with pytest.raises(RunMismatchError, match=r"made with max_tokens=12; this run has max_tok"):
        run_eval(pair, settings(data, tasks=["gsm8k"], max_tokens=20), out, progress=False)
    with pytest.raises(RunMismatchError, match=r"made with max_rounds=150; this run has max_r"):
        run_eval(pair, settings(data, tasks=["gsm8k"], max_rounds=3), out, progress=False)


def test_a_folder_that_records_fewer_knobs_ran_the_rest_at_their_defaults(
    pair: NudgingPair, data: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    run_eval(pair, settings(data, tasks=["gsm8k"], limit=1), out, progress=False)
    path = out / "run.json"
    written = json.loads(path.read_text())
    older = {k: v for k, v in written.items() if k not in ("max_rounds", "min_repeat_chars")}
    path.write_text(json.dumps(older))
    again = run_eval(pair, settings(data, tasks=["gsm8k"], limit=1), out, progress=False)
    assert again.generated == 0


def test_the_settings_knobs_are_the_configs() -> None:
    """Each algorithm knob but gamma (a run sweeps gammas) is a setting, declared once in
    NudgingConfig: its default, range and description come from there."""
    assert set(KNOBS) == set(ALGORITHM_KNOBS) - {"gamma"}
    fields = EvalSettings.model_fields
    for name in KNOBS:
        assert fields[name].default == NudgingConfig.model_fields[name].default
        assert fields[name].description == NudgingConfig.model_fields[name].description
    chosen = EvalSettings(tasks=["gsm8k"], max_rounds=7, loop_passage_words=2)
    assert chosen.config(0.3) == NudgingConfig(gamma=0.3, max_rounds=7, loop_passage_words=2)
    assert chosen.config(None).gamma == NudgingConfig().gamma
    with pytest.raises(ValidationError, match=r"draft_tokens\n.*less than or equal to 4096"):
        EvalSettings(tasks=["gsm8k"], draft_tokens=5000)


def test_a_failed_answer_is_reported_and_the_rest_are_kept(
    pair: NudgingPair, data: Path, tmp_path: Path
) -> None:
    with (data / "gsm8k_test.jsonl").open("a") as file:
        long = "word " * 5000  # beyond the tiny models' context windows
        file.write(json.dumps({"question": long, "answer": "#### 1"}) + "\n")
    run = run_eval(pair, settings(data, tasks=["gsm8k"], modes=["base"]), tmp_path / "out")
    assert len(run.failures) == 1
    assert "gsm8k · base example 3: PromptTooLongError: the prompt" in run.failures[0]
    assert len(run.records) == 3


def test_the_report_is_written_from_the_records(
    pair: NudgingPair, data: Path, tmp_path: Path
) -> None:
    run = run_eval(pair, settings(data, gammas=[0.2, 0.6]), tmp_path / "out", progress=False)
    paths = write_report(run.records, tmp_path / "out", run={"base": "tiny-llama"})
    assert {"markdown", "json", "scores", "gamma_sweep", "answers"} <= set(paths)
    report = json.loads(paths["json"].read_text())
    assert report["run"] == {"base": "tiny-llama"}
    assert {row["slug"] for row in report["rows"]} >= {"base", "nudging"}
    assert "mt-bench" in report["open_tasks"]
    assert (tmp_path / "out" / "judge" / "mt-bench" / "base.jsonl").is_file()


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"tasks": ["gsm9k"]}, r"tasks\n.*'gsm9k' is not one of ifeval"),
        ({"tasks": []}, r"tasks\n.*at least 1 item"),
        ({"gammas": [1.5]}, r"gammas\n.*each gamma must be in \[0, 1\], got 1.5"),
        ({"modes": ["solo"]}, r"modes\.0\n.*'nudged', 'base' or 'nudging'"),
        ({"limit": 0}, r"limit\n.*greater than or equal to 1"),
        ({"concurrency": 65}, r"concurrency\n.*less than or equal to 64"),
        ({"max_tokens": 0}, r"max_tokens\n.*greater than or equal to 1"),
    ],
)
def test_bad_settings_name_the_field(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        EvalSettings(**{"tasks": ["gsm8k"], **changes})


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--task", "gsm9k"], "nudging: invalid option: tasks: Value error, task: 'gsm9k' is not"),
        (["--task", "gsm8k", "--gamma", "0.2,2"], "gammas: Value error, each gamma must be in"),
        (["--task", "gsm8k", "--modes", "base,solo"], "modes.1: Input should be 'nudged'"),
        (["--task", "gsm8k", "--data", "{empty}"], "nudging: gsm8k: no file 'gsm8k_test.jsonl'"),
    ],
)
def test_eval_command_refuses_bad_input_before_loading_models(
    argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from langchain_nudging.cli import main

    argv = [a.replace("{empty}", str(tmp_path)) for a in argv]
    assert main(["eval", "--data", str(tmp_path), "--out", str(tmp_path / "o"), *argv]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_answers_in_flight_are_capped_at_the_servers_slots() -> None:
    class Model:
        def __init__(self, total_slots: int | None = None) -> None:
            if total_slots is not None:
                self.total_slots = total_slots

    class Pair:
        def __init__(self, base: Model, nudging: Model) -> None:
            self.base, self.nudging = base, nudging

    assert slot_limit(Pair(Model(), Model())) is None  # models in this process: no limit
    assert slot_limit(Pair(Model(4), Model())) == 4
    assert slot_limit(Pair(Model(8), Model(2))) == 2


def test_a_server_models_address_is_not_part_of_the_runs_identity(tmp_path: Path) -> None:
    # The llama.cpp servers the library starts listen on another free port each run.
    assert model_identity("gemma.gguf @ http://127.0.0.1:41607") == "gemma.gguf"
    assert model_identity("org/model") == "org/model"
    out = tmp_path / "out"
    out.mkdir()
    (out / "run.json").write_text(
        json.dumps({"base": "gemma.gguf @ http://127.0.0.1:41607", "nudging": "smol"})
    )
    defaults = {name: NudgingConfig.model_fields[name].default for name in KNOBS}
    identity = {**defaults, "base": "gemma.gguf", "nudging": "smol", "dtype": None}
    claim_output(out, identity)  # an earlier folder, with the address: accepted
    with pytest.raises(RunMismatchError, match=r"base='other\.gguf'"):
        claim_output(out, {**identity, "base": "other.gguf"})
