"""A new backend is one module plus one registration line (tests/scripted_backend.py): it
serves whole requests through the pair, the engine, the chat model and the CLI."""

from __future__ import annotations

import json

import pytest
import scripted_backend
from scripted_backend import SCRIPT

from langchain_nudging import NudgedChatModel, NudgingPair
from langchain_nudging.cli import main
from langchain_nudging.prompts import ChatMessage
from langchain_nudging.request import Request
from langchain_nudging.serving.engine import NudgingEngine

BASE, NUDGING = f"{scripted_backend.PREFIX}base", f"{scripted_backend.PREFIX}chat"
QUESTION = [ChatMessage("user", "What is the capital of France?")]


def test_the_pair_writes_the_script_with_both_models() -> None:
    generation = NudgingPair.load(BASE, NUDGING).generate(Request(QUESTION))
    segments = list(generation)
    assert generation.text == SCRIPT
    assert {s.source for s in segments} == {"base", "nudge"}
    assert generation.stats.finish_reason == "stop"
    assert generation.stats.base_tokens + generation.stats.nudge_tokens == len(SCRIPT)


def test_the_engine_serves_concurrent_requests() -> None:
    engine = NudgingEngine(NudgingPair.load(BASE, NUDGING))
    try:
        handles = [engine.submit(Request(QUESTION)) for _ in range(4)]
        assert [h.result().text for h in handles] == [SCRIPT] * 4
        assert engine.wait_idle(timeout=10)
    finally:
        assert engine.shutdown(timeout=10)


def test_the_chat_model_invokes_streams_and_batches() -> None:
    model = NudgedChatModel(model=BASE, nudging_model=NUDGING)
    assert model.invoke("What is the capital of France?").content == SCRIPT
    assert [m.content for m in model.batch(["Capital?", "Of France?"])] == [SCRIPT] * 2


@pytest.mark.asyncio
async def test_the_chat_model_streams_asynchronously() -> None:
    model = NudgedChatModel(model=BASE, nudging_model=NUDGING)
    chunks = [chunk async for chunk in model.astream("What is the capital of France?")]
    assert "".join(str(c.content) for c in chunks) == SCRIPT
    assert len(chunks) > 2


def test_the_cli_answers(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["chat", "--base", BASE, "--nudging", NUDGING, "--json", "Capital?"]) == 0
    answer = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert answer["text"] == SCRIPT
