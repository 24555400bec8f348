"""The `nudging` command end to end, in a subprocess, on the bundled pair."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from langchain_nudging import ChatMessage, NudgingConfig, NudgingPair
from langchain_nudging.cli import CLOSE_MARK, OPEN_MARK


def nudging(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "langchain_nudging", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_chat_json_segments_add_up(pair: NudgingPair) -> None:
    question = "Give me three tips for staying healthy."
    done = nudging("chat", "--json", "--max-tokens", "32", question)
    assert done.returncode == 0, done.stderr
    payload = json.loads(done.stdout)
    assert set(payload) >= {"text", "segments", "stats"}
    assert "".join(s["text"] for s in payload["segments"]) == payload["text"]
    assert {s["source"] for s in payload["segments"]} == {"base", "nudge"}
    stats = payload["stats"]
    assert stats["base_tokens"] + stats["nudge_tokens"] <= 32
    assert stats["finish_reason"] in {"length", "stop", "repetition"}
    assert 0 < stats["nudged_share"] < 1
    # The command and the library give the same greedy answer.
    same = pair.generate([ChatMessage("user", question)], NudgingConfig(max_tokens=32))
    assert "".join(s.text for s in same) == payload["text"]


def test_chat_marks_nudged_words_and_prints_a_summary() -> None:
    done = nudging("chat", "--max-tokens", "24", "What is the capital of France?")
    assert done.returncode == 0, done.stderr
    assert OPEN_MARK in done.stdout
    assert CLOSE_MARK in done.stdout
    assert "nudged" in done.stderr
    assert "rounds" in done.stderr
    assert "finish:" in done.stderr


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--gamma", "1.5"], "gamma"),
        (["--max-tokens", "0"], "max_tokens"),
        (["--base", "/no/such/model"], "/no/such/model"),
        (["--dtype", "float8"], "dtype"),
    ],
)
def test_bad_options_fail_clearly(args: list[str], needle: str) -> None:
    done = nudging("chat", *args, "hello", timeout=120)
    assert done.returncode == 2
    assert needle in done.stderr
    assert "Traceback" not in done.stderr


def test_not_a_gguf_file(tmp_path) -> None:
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"not a gguf file at all")
    done = nudging("chat", "--nudging", str(fake), "hello", timeout=120)
    assert done.returncode == 2
    assert "GGUF" in done.stderr
