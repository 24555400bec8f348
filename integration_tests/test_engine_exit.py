"""The engine ends cleanly, and in bounded time, when the interpreter exits with a request
still running."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1] / "tests"

SCRIPT = textwrap.dedent(
    """
    from langchain_nudging import ChatMessage, NudgingConfig, NudgingPair
    from langchain_nudging.request import Request
    from langchain_nudging.serving.engine import NudgingEngine

    engine = NudgingEngine(NudgingPair.load(progress=False))
    handle = engine.submit(
        Request(
            [ChatMessage("user", "Tell me a long story about a lighthouse.")],
            NudgingConfig(max_tokens=500),
        )
    )
    events = iter(handle)
    next(events)
    print("streaming", engine.live_requests, engine.live_sessions, flush=True)
    """
)

# The tiny random-weight pair of tests/tiny_models.py, its base model slowed down (each forward
# pass takes PASS seconds, or never returns with HANG), and a never-consumed base-mode request
# whose window is 96 passes: cancelling it between windows would take 96 * PASS seconds.
TINY = textwrap.dedent(
    """
    import sys, threading, time
    sys.path.insert(0, {tests!r})
    from tiny_models import build_gemma, build_llama, tokenizer_maker
    from langchain_nudging import ChatMessage, NudgingConfig, NudgingPair
    from langchain_nudging.backends.registry import text_model
    from langchain_nudging.request import Request
    from langchain_nudging.serving.engine import NudgingEngine

    PASS, HANG = {seconds!r}, {hang!r}
    make = tokenizer_maker()
    base = build_llama(make("byte"))
    pair = NudgingPair(text_model(base), text_model(build_gemma(make("sp"))))
    passes = []
    never = threading.Event()

    def slow(*_):
        passes.append(1)
        if HANG and len(passes) > 3:
            never.wait()
        time.sleep(PASS)

    base.model.register_forward_pre_hook(slow)
    engine = NudgingEngine(pair)
    config = NudgingConfig(
        max_tokens=1500, chunk_tokens=96, max_rounds=1000, min_repeat_chars=100000
    )
    handle = engine.submit(Request([ChatMessage("user", "Tell me a story.")], config, "base"))
    deadline = time.monotonic() + 60
    while len(passes) < 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    print("exiting", len(passes), time.time(), flush=True)
    """
)


def test_interpreter_exit_with_a_running_request() -> None:
    start = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr
    assert "streaming 1 2" in done.stdout
    assert "Traceback" not in done.stderr
    assert time.monotonic() - start < 120


def exit_seconds(seconds: float, hang: bool) -> float:
    """Run the tiny script; seconds from its last line to the process's exit."""
    script = TINY.format(tests=str(TESTS), seconds=seconds, hang=hang)
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False
    )
    ended = time.time()
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    words = done.stdout.split()
    assert words[:1] == ["exiting"], done.stdout
    assert int(words[1]) >= 4, "the request never ran"
    return ended - float(words[2])


def test_exit_cancels_a_never_consumed_request_within_one_pass() -> None:
    """At exit, the running request stops within one forward pass (0.5 s), not at the end of
    its 96-pass window (48 s)."""
    assert exit_seconds(0.5, hang=False) < 15


def test_exit_does_not_wait_for_a_pass_that_never_returns() -> None:
    """A forward pass that never returns: the exit waits its bound (10 s), then exits."""
    assert exit_seconds(0.0, hang=True) < 30
