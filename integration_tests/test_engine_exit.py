"""The engine ends cleanly when the interpreter exits with a request still running."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

SCRIPT = textwrap.dedent(
    """
    from langchain_nudging import ChatMessage, NudgingConfig, NudgingPair
    from langchain_nudging.engine import NudgingEngine

    engine = NudgingEngine(NudgingPair.load(progress=False))
    handle = engine.submit(
        [ChatMessage("user", "Tell me a long story about a lighthouse.")],
        NudgingConfig(max_tokens=500),
    )
    events = iter(handle)
    next(events)
    print("streaming", engine.live_requests, engine.live_sessions, flush=True)
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
