"""Bad input on the real pair: a clear error before any generation, nothing left behind."""

from __future__ import annotations

import pytest

from langchain_nudging import ChatMessage, NudgingConfig, NudgingPair
from langchain_nudging.backends.hf import PromptTooLongError


def live(pair: NudgingPair) -> int:
    return pair.base.live_sessions + pair.nudging.live_sessions


def test_prompt_longer_than_the_context_window(pair: NudgingPair) -> None:
    window = pair.nudging.loaded.context_window
    assert window is not None
    long_text = "word " * (window + 10)
    with pytest.raises(PromptTooLongError, match="context window"):
        pair.generate([ChatMessage("user", long_text)])
    assert live(pair) == 0


def test_empty_conversation(pair: NudgingPair) -> None:
    with pytest.raises(ValueError, match="messages"):
        pair.generate([])


@pytest.mark.parametrize(("field", "value"), [("gamma", -0.1), ("gamma", 1.01), ("max_tokens", 0)])
def test_out_of_range_config(field: str, value: float) -> None:
    with pytest.raises(ValueError, match=field):
        NudgingConfig(**{field: value})


def test_leaving_an_answer_early_frees_its_sessions(pair: NudgingPair) -> None:
    generation = pair.generate([ChatMessage("user", "Say hello.")], NudgingConfig(max_tokens=32))
    segments = iter(generation)
    next(segments)
    assert live(pair) == 2
    segments.close()
    assert live(pair) == 0
    with pytest.raises(RuntimeError, match="once"):
        next(iter(generation))
