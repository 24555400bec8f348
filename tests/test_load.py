"""Under load: many concurrent streams, some cancelled, some failing, on the tiny pair.

The survivors get the text they would get alone; the engine's live requests, sessions and the
process's threads return to where they started.
"""

from __future__ import annotations

import asyncio
import random
import threading
from typing import Any

import pytest
from langchain_core.callbacks import AsyncCallbackHandler

from langchain_nudging import NudgedChatModel
from langchain_nudging.algorithm import AnswerWriter

STREAMS = 32
QUESTIONS = [
    "What is the capital of France?",
    "Tell me a story.",
    "Why is the sky blue?",
    "Write a short poem about the sea and the sky.",
]
EXPLODE = "<<explode>>"  # a stop string whose check throws, for the requests meant to fail


class StopCheckError(RuntimeError):
    pass


class FailOnToken(AsyncCallbackHandler):
    """A callback that raises on the n-th streamed token (``raise_error``: it propagates)."""

    raise_error = True

    def __init__(self, n: int) -> None:
        self.n = n
        self.seen = 0

    async def on_llm_new_token(self, token: str, **kwargs: Any) -> None:
        self.seen += 1
        if self.seen == self.n:
            raise RuntimeError("callback failed")


@pytest.fixture
def exploding_stop_check(monkeypatch: pytest.MonkeyPatch) -> None:
    append = AnswerWriter.append

    def checked(self: AnswerWriter, segment: Any) -> Any:
        if EXPLODE in self._config.stop and len(self.answer) > 8:
            raise StopCheckError("the stop string check threw")
        return append(self, segment)

    monkeypatch.setattr(AnswerWriter, "append", checked)


async def test_32_streams_with_cancellations_and_failures(
    llama_a: Any, gemma_b: Any, exploding_stop_check: None
) -> None:
    model = NudgedChatModel(model=llama_a, nudging_model=gemma_b, max_tokens=40)
    engine = model.get_engine()
    expected = {q: (await model.ainvoke(q)).content for q in QUESTIONS}  # each alone
    assert await asyncio.to_thread(engine.wait_idle, 30)
    threads = {t.name for t in threading.enumerate()}

    rng = random.Random(7)
    plans = ["ok"] * STREAMS
    for index in rng.sample(range(STREAMS), STREAMS // 3):
        plans[index] = "cancel"
    for index in rng.sample([i for i, p in enumerate(plans) if p == "ok"], 3):
        plans[index] = "engine error"
    for index in rng.sample([i for i, p in enumerate(plans) if p == "ok"], 2):
        plans[index] = "callback error"

    async def stream(index: int) -> tuple[str, str]:
        question = QUESTIONS[index % len(QUESTIONS)]
        plan = plans[index]
        stop = [EXPLODE] if plan == "engine error" else None
        callbacks = [FailOnToken(2)] if plan == "callback error" else []
        text = ""
        async for chunk in model.astream(question, stop=stop, config={"callbacks": callbacks}):
            text += chunk.content
            if plan == "cancel" and len(text) > 1 + index % 5:
                raise asyncio.CancelledError  # the client goes away mid-answer
        return question, text

    tasks = [asyncio.create_task(stream(i)) for i in range(STREAMS)]
    results = await asyncio.gather(*tasks, return_exceptions=True)

    for plan, result in zip(plans, results, strict=True):
        if plan == "ok":
            assert not isinstance(result, BaseException), result
            question, text = result
            assert text == expected[question]
        elif plan == "cancel":
            assert isinstance(result, asyncio.CancelledError)
        elif plan == "engine error":
            assert isinstance(result, StopCheckError)
        else:
            assert isinstance(result, RuntimeError)
            assert "callback failed" in str(result)

    # Cancellations take effect within one forward pass of each request.
    assert await asyncio.to_thread(engine.wait_idle, 30)
    assert engine.live_requests == 0
    assert engine.live_sessions == 0
    # No thread is left but the engine's worker, which the first batch started.
    assert {t.name for t in threading.enumerate()} - threads <= {"nudging-engine"}
    assert max(engine.batch_sizes) > 4  # the streams' passes ran together
    assert (await model.ainvoke(QUESTIONS[0])).content == expected[QUESTIONS[0]]  # still serving
