"""The `nudging` command end to end, in a subprocess, on the bundled pair."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from typing import Any

import pytest

from langchain_nudging import ChatMessage, NudgingConfig, NudgingPair
from langchain_nudging.cli import CLOSE_MARK, OPEN_MARK
from langchain_nudging.request import Request

# Each test runs the command in a subprocess that loads both models (up to two minutes on two
# busy cores) besides the session's own pair.
pytestmark = pytest.mark.timeout(600)


def nudging(*args: str, timeout: float = 600, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "langchain_nudging", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_chat_json_segments_add_up(pair: NudgingPair) -> None:
    question = "Give me three tips for staying healthy."
    done = nudging("chat", "--json", "--max-tokens", "32", stdin=question + "\n")  # piped
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
    same = pair.generate(Request([ChatMessage("user", question)], NudgingConfig(max_tokens=32)))
    assert "".join(s.text for s in same) == payload["text"]  # the piped question was asked


def test_chat_marks_nudged_words_and_prints_a_summary() -> None:
    done = nudging("chat", "--max-tokens", "24", "What is the capital of France?")
    assert done.returncode == 0, done.stderr
    assert OPEN_MARK in done.stdout
    assert CLOSE_MARK in done.stdout
    assert "nudged" in done.stderr
    assert re.search(r"\b\d+ rounds? ·", done.stderr)
    assert "finish:" in done.stderr
    assert "Loading weights" not in done.stderr  # transformers' progress bars are hidden


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


def test_a_truncated_gguf_file_fails_before_anything_converts(tmp_path) -> None:
    """A fresh cache would convert the bundled base first (a minute); the truncated nudging
    model is reported at once, by name and sizes."""
    from langchain_nudging.backends.registry import BUNDLED_NUDGING_ID
    from langchain_nudging.models.bundled import bundled_gguf

    real = bundled_gguf(BUNDLED_NUDGING_ID)
    part = tmp_path / real.name
    with real.open("rb") as whole, part.open("wb") as out:
        out.write(whole.read(real.stat().st_size // 2))
    cache = tmp_path / "fresh-cache"
    done = nudging("chat", "--cache-dir", str(cache), "--nudging", str(part), "hi", timeout=120)
    assert done.returncode == 2
    message = " ".join(done.stderr.split())
    assert "truncated" in message
    assert str(part) in message
    assert f"{part.stat().st_size:,} bytes" in message
    assert "Traceback" not in done.stderr
    assert not cache.exists()  # nothing was converted


def test_compare_shows_the_three_modes_side_by_side() -> None:
    done = nudging("chat", "--compare", "--max-tokens", "12", "Name a primary colour.")
    assert done.returncode == 0, done.stderr
    for title in ("base model alone", "nudging model alone", "nudged"):
        assert title in done.stdout
    assert done.stdout.count("finish:") == 3


def test_compare_json_has_one_answer_per_mode() -> None:
    done = nudging("chat", "--compare", "--json", "--max-tokens", "12", "Name a primary colour.")
    assert done.returncode == 0, done.stderr
    payload = json.loads(done.stdout.splitlines()[-1])
    assert set(payload) == {"base", "nudging", "nudged"}
    assert {s["source"] for s in payload["base"]["segments"]} == {"base"}
    assert {s["source"] for s in payload["nudging"]["segments"]} == {"nudge"}
    for answer in payload.values():
        assert "".join(s["text"] for s in answer["segments"]) == answer["text"]


# A job started in the background by a non-interactive shell (as `make test &` is) inherits
# SIGINT ignored, and Python then never turns it into KeyboardInterrupt. A terminal's Ctrl-C
# always reaches a foreground program: restore that before running the command.
AS_FROM_A_TERMINAL = (
    "import runpy, signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
    "runpy.run_module('langchain_nudging', run_name='__main__')"
)


class Terminal:
    """The command with a terminal on stdin; its stdout and stderr collected as they come."""

    def __init__(self, *args: str) -> None:
        master, slave = os.openpty()
        self.master = master
        self.process = subprocess.Popen(
            [sys.executable, "-c", AS_FROM_A_TERMINAL, *args],
            stdin=slave,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        os.close(slave)
        self.out = bytearray()
        self.err = bytearray()
        for stream, buffer in ((self.process.stdout, self.out), (self.process.stderr, self.err)):
            threading.Thread(target=self._collect, args=(stream, buffer), daemon=True).start()

    @staticmethod
    def _collect(stream: Any, buffer: bytearray) -> None:
        while chunk := os.read(stream.fileno(), 4096):
            buffer.extend(chunk)

    def type(self, line: str) -> None:
        os.write(self.master, line.encode() + b"\n")

    def wait_for(self, buffer: bytearray, text: str, count: int = 1, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while buffer.decode(errors="replace").count(text) < count:
            assert self.process.poll() is None, (self.out.decode(), self.err.decode())
            assert time.monotonic() < deadline, f"no {text!r}: {buffer.decode()!r}"
            time.sleep(0.05)


def test_interactive_chat_keeps_the_conversation_and_ctrl_c_cancels_one_answer() -> None:
    terminal = Terminal("chat", "--max-tokens", "24")
    try:
        terminal.wait_for(terminal.out, "you>")
        terminal.process.send_signal(signal.SIGINT)  # Ctrl-C at the prompt: a new prompt
        terminal.wait_for(terminal.err, "conversation is kept")
        terminal.wait_for(terminal.out, "you>", count=2)
        terminal.type("Tell me a story about a dragon.")
        terminal.wait_for(terminal.out, OPEN_MARK)  # the answer is streaming
        terminal.process.send_signal(signal.SIGINT)
        terminal.wait_for(terminal.err, "[answer cancelled]")
        terminal.wait_for(terminal.out, "you>", count=3)
        terminal.type("What is the capital of France?")
        terminal.wait_for(terminal.err, "finish:")
        terminal.wait_for(terminal.out, "you>", count=4)
        terminal.type("/history")
        terminal.wait_for(terminal.out, "assistant:")
        os.write(terminal.master, b"\x04")  # Ctrl-D
        assert terminal.process.wait(timeout=60) == 0
    finally:
        if terminal.process.poll() is None:
            terminal.process.kill()
        os.close(terminal.master)
    out = terminal.out.decode()
    history = out[out.rindex("you>", 0, out.index("assistant:")) :]
    assert "user: What is the capital of France?" in history
    # The cancelled exchange is shown, marked, before the answered one.
    assert "user: Tell me a story about a dragon.\nassistant [answer cancelled]:" in history
    assert history.index("dragon") < history.index("France")
