"""The nudged pair on real llama.cpp servers (xllamacpp, started on 127.0.0.1 by the fixtures):
answers with both sources, the uncached oracle's equality, the chat model's entry points,
tools and structured output, mixed pairs, cancellation freeing slots, and faults."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from langchain_core.messages import AIMessageChunk
from langchain_core.tools import tool
from pydantic import BaseModel, Field
from test_oracle_equality import PROMPTS  # the ten prompts of the in-process oracle test

from langchain_nudging import ChatMessage, NudgedChatModel, NudgingConfig, NudgingPair
from langchain_nudging.backends.base import ContextWindowError
from langchain_nudging.backends.http import ServerError
from langchain_nudging.backends.llamacpp import LlamaCppModel, UncachedModel
from langchain_nudging.backends.llamacpp_runtime import LlamaCppServer, ServerSettings
from langchain_nudging.backends.registry import text_model
from langchain_nudging.cli import main
from langchain_nudging.models import BUNDLED_BASE_ID
from langchain_nudging.models.bundled import bundled_gguf
from langchain_nudging.prompts import render_prompts
from langchain_nudging.reference import reference_nudge
from langchain_nudging.request import Request
from langchain_nudging.serving.engine import NudgingEngine
from langchain_nudging.serving.events import Failed, Finished, SegmentEvent

pytestmark = pytest.mark.timeout(900)
SERVER_ORACLE_PROMPTS = ("multi_turn", "non_ascii")
DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
U, A, S = "user", "assistant", "system"
Servers = tuple[LlamaCppServer, LlamaCppServer]


def ask(text: str) -> list[ChatMessage]:
    return [ChatMessage(U, text)]


def slots_busy(url: str) -> list[bool]:
    slots = httpx.get(f"{url}/slots", timeout=10, trust_env=False).json()
    return [bool(slot["is_processing"]) for slot in slots]


def wait_slots_idle(url: str, within: float = 10.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if not any(slots_busy(url)):
            return True
        time.sleep(0.05)
    return False


# -- answers ---------------------------------------------------------------------------------


def test_both_models_write_on_servers(server_pair: NudgingPair) -> None:
    generation = server_pair.generate(
        Request(ask("Give me three tips for staying healthy."), NudgingConfig(max_tokens=48))
    )
    segments = list(generation)
    sources = {segment.source for segment in segments}
    assert sources == {"base", "nudge"}
    assert "".join(s.text for s in segments) == generation.text
    assert generation.stats.finish_reason in ("length", "stop")
    assert isinstance(server_pair.base, LlamaCppModel)
    assert server_pair.base.live_sessions == 0
    assert server_pair.nudging.live_sessions == 0


def test_a_server_model_is_shared_by_spec(llamacpp_servers: Servers) -> None:
    base, _ = llamacpp_servers
    assert text_model(base.url) is text_model(base.url)
    assert text_model(f"llamacpp+{base.url}") is not None


def test_cached_sessions_write_what_the_uncached_oracle_writes(server_pair: NudgingPair) -> None:
    """Greedy, 64 tokens, two of test_oracle_equality.py's prompts (a multi-turn chat,
    non-ASCII text: the in-process oracles cover all ten): the library
    (pinned warm slots, streamed windows, reused choices) and an oracle asking the same
    servers every question afresh (``cache_prompt: false``, the whole text re-read) write the
    same text."""
    config = NudgingConfig(max_tokens=64)
    base, nudging = server_pair.base, server_pair.nudging
    assert isinstance(base, LlamaCppModel)
    assert isinstance(nudging, LlamaCppModel)
    differing = {}
    for name in SERVER_ORACLE_PROMPTS:
        messages = PROMPTS[name]
        generation = server_pair.generate(Request(messages, config))
        streamed = "".join(segment.text for segment in generation)
        prompts = render_prompts(messages, nudging.chat_template, server_pair.base_format)
        oracle = reference_nudge(
            UncachedModel(base),  # type: ignore[arg-type]
            UncachedModel(nudging),  # type: ignore[arg-type]
            prompts.base,
            prompts.nudging,
            config,
            prompts.stop,
        )
        if (streamed, generation.stats.finish_reason) != (oracle.text, oracle.finish_reason):
            differing[name] = (streamed, oracle.text)
    assert not differing, json.dumps(differing, indent=1, ensure_ascii=False)


def test_the_server_evaluates_each_prompt_token_about_once(server_pair: NudgingPair) -> None:
    """What the servers evaluated (their own /metrics) for one answer: the prompt and the
    answer, each read about once, not once per question."""
    base, nudging = server_pair.base, server_pair.nudging
    assert isinstance(base, LlamaCppModel)
    assert isinstance(nudging, LlamaCppModel)
    messages = ask("Describe a busy market in a small town, in a few sentences.")
    before = {m: prompt_tokens_total(m.url) for m in (base, nudging)}
    generation = server_pair.generate(Request(messages, NudgingConfig(max_tokens=64)))
    list(generation)
    text = generation.text
    stats = generation.stats
    assert stats.base_tokens + stats.nudge_tokens >= 32, text
    prompts = render_prompts(messages, nudging.chat_template, server_pair.base_format)
    for model, prompt in ((base, prompts.base), (nudging, prompts.nudging)):
        evaluated = prompt_tokens_total(model.url) - before[model]
        needed = model.prompt_tokens(prompt) + len(model.tokenize(text))
        assert evaluated <= 1.2 * needed + 8, (model.name, evaluated, needed, stats)


def prompt_tokens_total(url: str) -> float:
    metrics = httpx.get(f"{url}/metrics", timeout=10, trust_env=False).text
    for line in metrics.splitlines():
        if line.startswith("llamacpp:prompt_tokens_total"):
            return float(line.split()[-1])
    raise AssertionError(f"no prompt_tokens_total in {url}/metrics")


# -- the chat model ----------------------------------------------------------------------------


@pytest.fixture
def server_llm(llamacpp_servers: Servers) -> NudgedChatModel:
    base, nudging = llamacpp_servers
    return NudgedChatModel(
        model=base.url, nudging_model=nudging.url, max_tokens=48, max_json_string_length=32
    )


def test_chat_model_invoke_stream_batch(server_llm: NudgedChatModel) -> None:
    message = server_llm.invoke("Why is the sky blue?")
    assert message.text.strip()
    assert message.response_metadata["finish_reason"] in ("length", "stop")
    assert message.usage_metadata
    assert message.usage_metadata["output_tokens"] > 0

    async def streamed() -> list[AIMessageChunk]:
        return [chunk async for chunk in server_llm.astream("Describe the sea in detail.")]

    chunks = asyncio.run(streamed())
    assert len(chunks) > 2
    assert "".join(c.text for c in chunks).strip()
    sources = {s["source"] for c in chunks for s in c.response_metadata.get("segments", [])}
    assert sources <= {"base", "nudge"}
    assert sources
    answers = server_llm.batch(["Say hello.", "Name a fruit."])
    assert all(a.text.strip() for a in answers)


@tool
def get_weather(location: str) -> str:
    """Get the current weather at a location."""
    return f"It is sunny in {location}."


def test_tool_calls_on_servers_parse_against_their_schema(server_llm: NudgedChatModel) -> None:
    message = server_llm.bind_tools([get_weather], tool_choice="any").invoke(
        "What is the weather in Paris?"
    )
    (call,) = message.tool_calls
    assert call["name"] == "get_weather"
    assert isinstance(call["args"]["location"], str)


class Joke(BaseModel):
    """A joke."""

    setup: str = Field(description="the question")
    punchline: str = Field(description="the answer")


def test_structured_output_on_servers_validates(server_llm: NudgedChatModel) -> None:
    joke = server_llm.with_structured_output(Joke).invoke("Tell me a joke about cats.")
    assert isinstance(joke, Joke)


def test_tool_call_threshold_is_refused_on_a_server_nudging_model(
    llamacpp_servers: Servers,
) -> None:
    base, nudging = llamacpp_servers
    llm = NudgedChatModel(model=base.url, nudging_model=nudging.url, tool_call_threshold=0.5)
    with pytest.raises(ValueError, match="tool_call_threshold"):
        llm.bind_tools([get_weather]).invoke("What is the weather in Paris?")


@pytest.mark.filterwarnings("ignore:create_react_agent has been moved")
def test_langgraph_agent_on_servers(server_llm: NudgedChatModel) -> None:
    from langchain_core.messages import AIMessage, ToolMessage
    from langgraph.prebuilt import create_react_agent

    with_call = server_llm.bind_tools([get_weather], tool_choice="any")
    with_answer = server_llm.bind_tools([get_weather], tool_choice="none")

    def choose(state: dict[str, Any], runtime: Any) -> Any:
        return with_answer if isinstance(state["messages"][-1], ToolMessage) else with_call

    agent = create_react_agent(choose, tools=[get_weather])
    state = agent.invoke({"messages": [("user", "What is the weather in Paris?")]})
    messages = state["messages"]
    assert any(isinstance(m, ToolMessage) and "sunny" in m.content for m in messages)
    assert isinstance(messages[-1], AIMessage)
    assert not messages[-1].tool_calls


# -- mixed pairs --------------------------------------------------------------------------------


@pytest.mark.parametrize("server_role", ["base", "nudging"])
def test_mixed_pairs(pair: NudgingPair, llamacpp_servers: Servers, server_role: str) -> None:
    base_server, nudging_server = llamacpp_servers
    if server_role == "base":
        mixed = NudgingPair(text_model(base_server.url), pair.nudging)
    else:
        mixed = NudgingPair(pair.base, text_model(nudging_server.url))
    generation = mixed.generate(Request(ask("Name two oceans."), NudgingConfig(max_tokens=32)))
    segments = list(generation)
    assert generation.text.strip()
    assert {s.source for s in segments} <= {"base", "nudge"}


# -- cancellation, concurrency ------------------------------------------------------------------


def test_cancel_closes_the_stream_and_frees_the_slots(
    server_pair: NudgingPair, llamacpp_servers: Servers
) -> None:
    engine = NudgingEngine(server_pair)
    try:
        handle = engine.submit(
            Request(ask("Write a long story about a dragon."), NudgingConfig(max_tokens=400))
        )
        events = iter(handle)
        first = next(events)
        assert isinstance(first, SegmentEvent)
        handle.cancel()
        rest = list(events)
        assert isinstance(rest[-1], Finished)
        assert rest[-1].stats.finish_reason == "cancelled"
        assert engine.wait_idle(10)
        for server in llamacpp_servers:
            assert wait_slots_idle(server.url), slots_busy(server.url)
        assert server_pair.base.live_sessions == 0
        assert server_pair.nudging.live_sessions == 0
    finally:
        engine.shutdown()


def test_leaving_astream_early_frees_the_slots(
    server_llm: NudgedChatModel, llamacpp_servers: Servers
) -> None:
    async def first_chunks() -> None:
        stream = server_llm.astream("Write a long story about a dragon.", max_tokens=400)
        async for _chunk in stream:
            break
        await stream.aclose()

    asyncio.run(first_chunks())
    for server in llamacpp_servers:
        assert wait_slots_idle(server.url), slots_busy(server.url)


def test_concurrent_requests_run_concurrently_without_a_worker(server_pair: NudgingPair) -> None:
    engine = NudgingEngine(server_pair)
    try:
        seen = 0
        handles = [
            engine.submit(Request(ask(q), NudgingConfig(max_tokens=40)))
            for q in ("Name three rivers.", "Name three mountains.", "Name three lakes.")
        ]
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and engine.live_requests:
            seen = max(seen, server_pair.base.live_sessions)
            time.sleep(0.01)
        results = [h.result() for h in handles]
        assert all(r.text.strip() for r in results)
        assert seen >= 2  # two requests held base-server slots at once
        assert engine._thread is None  # nothing queued behind a local worker
    finally:
        engine.shutdown()


# -- faults and bad input -----------------------------------------------------------------------


def test_nothing_listening_is_a_clear_error_within_the_timeout() -> None:
    started = time.monotonic()
    with pytest.raises(ServerError, match=r"127\.0\.0\.1:9"):
        NudgingPair.load("http://127.0.0.1:9", "http://127.0.0.1:9", timeout=2, max_retries=0)
    assert time.monotonic() - started < 30


@pytest.fixture
def not_llamacpp() -> Iterator[str]:
    """A real HTTP server on loopback that is not a serving engine."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = b'{"status": "ok"}' if self.path == "/health" else b"{}"
            self.send_response(200 if self.path == "/health" else 404)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body)

        do_POST = do_GET  # noqa: N815

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_a_server_that_is_not_llamacpp_is_refused(not_llamacpp: str) -> None:
    with pytest.raises(ServerError, match="not as a known serving engine"):
        text_model(not_llamacpp)
    with pytest.raises(ServerError, match=r"llama\.cpp"):
        text_model(f"llamacpp+{not_llamacpp}")


def test_context_overflow_raises_context_window_error(server_pair: NudgingPair) -> None:
    long = "word " * 5000
    with pytest.raises(ContextWindowError):
        list(server_pair.generate(Request(ask(long), NudgingConfig(max_tokens=8))))
    assert server_pair.base.live_sessions == 0


def test_a_server_killed_mid_answer_fails_that_request_only(
    llamacpp_servers: Servers,
) -> None:
    _, nudging = llamacpp_servers
    before = set(threading.enumerate())  # other modules' engines may have threads of their own
    doomed = LlamaCppServer(bundled_gguf(BUNDLED_BASE_ID), ServerSettings(threads=1))
    try:
        pair = NudgingPair.load(doomed.url, nudging.url, timeout=10, max_retries=1)
        healthy = NudgingPair.load(llamacpp_servers[0].url, nudging.url)
        engine = NudgingEngine(pair)
        other = NudgingEngine(healthy)
        handle = engine.submit(
            Request(ask("Write a long story about a dragon."), NudgingConfig(max_tokens=400))
        )
        survivor = other.submit(Request(ask("Name three birds."), NudgingConfig(max_tokens=40)))
        events = iter(handle)
        assert isinstance(next(events), SegmentEvent)
        doomed.stop()
        rest = list(events)
        failed = rest[-1]
        assert isinstance(failed, Failed), rest[-1]
        assert doomed.url.split("//")[1] in str(failed.error), failed.error
        assert survivor.result().text.strip()
        assert engine.wait_idle(10)
        assert other.wait_idle(10)
        left = [t for t in set(threading.enumerate()) - before if t.name.startswith("nudging")]
        for thread in left:
            thread.join(timeout=10)  # a request's thread ends just after its last event
        assert not [t for t in left if t.is_alive()], left
        engine.shutdown()
        other.shutdown()
    finally:
        doomed.stop()


def test_nudging_chat_streams_from_two_servers(
    llamacpp_servers: Servers, capsys: pytest.CaptureFixture[str]
) -> None:
    base, nudging = llamacpp_servers
    code = main(["chat", "--base", base.url, "--nudging", nudging.url, "--max-tokens", "24", "Hi!"])
    out = capsys.readouterr().out
    assert code == 0
    assert out.strip()


def test_a_timeout_cancels_and_frees_the_slots(
    llamacpp_servers: Servers,
) -> None:
    base, nudging = llamacpp_servers
    llm = NudgedChatModel(model=base.url, nudging_model=nudging.url, max_tokens=400, timeout=1.5)
    with pytest.raises(TimeoutError):
        llm.invoke("Write a long story about a dragon.")
    for server in llamacpp_servers:
        assert wait_slots_idle(server.url), slots_busy(server.url)


def test_nudging_eval_scores_a_pair_on_servers(llamacpp_servers: Servers, tmp_path: Path) -> None:
    base, nudging = llamacpp_servers
    out = tmp_path / "eval"
    argv = [
        "eval",
        "--base",
        base.url,
        "--nudging",
        nudging.url,
        "--task",
        "gsm8k",
        "--limit",
        "2",
        "--max-tokens",
        "32",
        "--data",
        str(DATA),
        "--out",
        str(out),
        "--no-progress",
    ]
    assert main(argv) == 0
    lines = (out / "results" / "gsm8k.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert {r["mode"] for r in records} == {"base", "nudging", "nudged"}
    assert all(r["answer"] is not None for r in records)


def test_the_chat_model_starts_llamacpp_servers_itself() -> None:
    """``runtime="llamacpp"``: the bundled pair on servers this process starts (or has)."""
    llm = NudgedChatModel(runtime="llamacpp", max_tokens=16)
    assert llm.invoke("Say hello.").text.strip()
    base, nudging = llm._text_models(llm.base_model)
    assert isinstance(base, LlamaCppModel)
    assert isinstance(nudging, LlamaCppModel)
    assert base.url.startswith("http://127.0.0.1:")
