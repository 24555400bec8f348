"""`nudging eval` end to end on the bundled pair and the shared evaluation data."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from langchain_nudging import NudgingPair
from langchain_nudging.cli import main
from langchain_nudging.evaluation import TASKS

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason="../shared/data is not there")
MODEL_OPTIONS = ["--dtype", "float32", "--device", "cpu"]  # the session pair's registry entry


def records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.timeout(900)  # 44 answers of the bundled pair on two shared cores
def test_every_task_in_every_mode(pair: NudgingPair, tmp_path: Path) -> None:
    out = tmp_path / "eval"
    argv = ["eval", "--task", *TASKS, "--limit", "2", "--max-tokens", "16", "--concurrency", "8"]
    argv += ["--data", str(DATA), "--out", str(out), "--no-progress", *MODEL_OPTIONS]
    assert main(argv) == 0
    for task in TASKS:
        written = records(out / "results" / f"{task}.jsonl")
        assert sorted((r["mode"], r["gamma"]) for r in written) == sorted(
            [("base", None), ("nudging", None), ("nudged", 0.4)] * 2
        )
        assert len({r["example_id"] for r in written}) == 2
        for record in written:
            assert record["tokens"] <= 16 * len(record["turns"])
            assert record["answer"] == record["turns"][-1]["answer"]
            if TASKS[task].scored:
                assert record["primary"] in (0.0, 1.0)
            else:
                assert record["score"] is None
        assert len(written[0]["turns"]) == (2 if task == "mt-bench" else 1)
    report = json.loads((out / "report.json").read_text())
    assert [row["label"] for row in report["rows"]] == ["base", "nudging", "nudged"]
    assert set(report["scored_tasks"]) == {t for t in TASKS if TASKS[t].scored}
    assert report["run"]["base"] == "bundled:gemma-3-270m"
    assert report["run"]["max_tokens"] == 16
    markdown = (out / "report.md").read_text()
    assert "| nudged |" in markdown
    assert "GSM8K" in markdown
    assert "| IFEval inst. strict | IFEval inst. loose | Share nudged | Cut |" in markdown
    assert report["totals"]["nudging"]["nudged_share"] == 1.0
    assert (out / "scores.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (out / "answers.html").read_text()
    nudged = records(out / "results" / "gsm8k.jsonl")
    nudge_text = next(
        s["text"] for r in nudged for s in r["turns"][0]["segments"] if s["source"] == "nudge"
    )
    assert "<mark" in page
    assert nudge_text.strip()[:10] in page
    just_eval = json.loads((out / "judge" / "just-eval" / "nudged.json").read_text())
    assert len(just_eval) == 2
    assert {"id", "instruction", "output", "generator"} <= set(just_eval[0])
    (mt_line, *_) = (out / "judge" / "mt-bench" / "base.jsonl").read_text().splitlines()
    assert len(json.loads(mt_line)["choices"][0]["turns"]) == 2


@pytest.mark.timeout(900)  # a second process loads the pair, then 12 answers
def test_an_interrupted_run_resumes_where_it_stopped(pair: NudgingPair, tmp_path: Path) -> None:
    """The command is killed as soon as its first answer is written; the same command then
    answers only what is missing, and a sweep over gamma adds only the new gamma's answers."""
    out = tmp_path / "eval"
    argv = ["eval", "--task", "gsm8k", "--limit", "3", "--max-tokens", "24", "--concurrency", "1"]
    argv += ["--data", str(DATA), "--out", str(out), "--no-progress", *MODEL_OPTIONS]
    results = out / "results" / "gsm8k.jsonl"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    child = subprocess.Popen([sys.executable, "-m", "langchain_nudging", *argv], env=env)
    try:
        deadline = time.monotonic() + 300
        while not (results.is_file() and results.read_text().count("\n") >= 1):
            assert child.poll() is None, "the run ended before it was interrupted"
            assert time.monotonic() < deadline
            time.sleep(0.2)
        child.send_signal(signal.SIGKILL)
    finally:
        child.wait()
    before = results.read_text().splitlines()
    assert 1 <= len(before) < 9
    assert main(argv) == 0
    after = results.read_text().splitlines()
    assert after[: len(before)] == before  # what was written is kept, not redone
    assert len(after) == 9
    assert len({(r["mode"], r["example_id"]) for r in records(results)}) == 9
    sweep = tmp_path / "sweep"
    assert main([*argv, "--gamma", "0.2", "0.4", "--report", str(sweep)]) == 0
    assert len(results.read_text().splitlines()) == 12
    assert (sweep / "gamma_sweep.png").is_file()
    assert not (out / "gamma_sweep.png").exists()
