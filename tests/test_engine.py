"""The engine on tiny models: concurrency, fairness, cancellation, failures, modes, and where
model work runs (the worker for batchable backends, the request's thread otherwise)."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest

from langchain_nudging.backends.base import Capabilities
from langchain_nudging.backends.local import LocalModel
from langchain_nudging.config import NudgingConfig
from langchain_nudging.prompts import ChatMessage
from langchain_nudging.request import Request
from langchain_nudging.serving.engine import EngineBusyError, EngineClosedError, NudgingEngine
from langchain_nudging.serving.events import Failed, Finished, SegmentEvent
from langchain_nudging.serving.generation import Generation, NudgingPair

QUESTIONS = ["What is the capital of France?", "Tell me a story.", "Why is the sky blue?"]
SHORT = NudgingConfig(max_tokens=24)
LONG = NudgingConfig(max_tokens=400, max_rounds=400, min_repeat_chars=1000)
STORY = "Tell me a story."  # runs to max_tokens on the tiny pair


def ask(question: str, config: NudgingConfig = SHORT, mode: Any = "nudged") -> Request:
    return Request([ChatMessage("user", question)], config, mode)


def alone(pair: NudgingPair, question: str, config: NudgingConfig = SHORT, mode: Any = "nudged"):
    return "".join(s.text for s in pair.generate(ask(question, config, mode)))


def test_threads_get_the_text_they_would_get_alone(
    engine: NudgingEngine, pair: NudgingPair
) -> None:
    expected = {q: alone(pair, q) for q in QUESTIONS}
    results: dict[str, str] = {}

    def worker(question: str) -> None:
        results[question] = engine.submit(ask(question, SHORT)).result().text

    threads = [threading.Thread(target=worker, args=(q,)) for q in QUESTIONS * 2]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert results == expected


async def test_asyncio_consumers_get_the_text_they_would_get_alone(
    engine: NudgingEngine, pair: NudgingPair
) -> None:
    expected = [alone(pair, q) for q in QUESTIONS]

    async def consume(question: str) -> str:
        pieces = []
        async for event in engine.submit(ask(question, SHORT)):
            if isinstance(event, SegmentEvent):
                pieces.append(event.segment.text)
            else:
                assert isinstance(event, Finished)
                assert event.text == "".join(pieces)
        return "".join(pieces)

    assert await asyncio.gather(*(consume(q) for q in QUESTIONS)) == expected


def test_forward_passes_run_on_the_engines_threads(
    engine: NudgingEngine, llama_a: Any, gemma_b: Any
) -> None:
    threads: set[str] = set()
    hooks = [
        loaded.model.register_forward_pre_hook(
            lambda *_: threads.add(threading.current_thread().name)
        )
        for loaded in (llama_a, gemma_b)  # the pair's models
    ]
    try:
        engine.submit(ask(QUESTIONS[0], SHORT)).result()  # alone: its own thread runs them
        handles = [engine.submit(ask(q, SHORT)) for q in QUESTIONS]
        for handle in handles:
            handle.result()
    finally:
        for hook in hooks:
            hook.remove()
    assert "nudging-engine" in threads  # concurrent requests: the worker batches their passes
    assert all(name.startswith("nudging-") for name in threads), threads  # never the caller's


def test_a_short_request_finishes_while_a_long_one_runs(engine: NudgingEngine) -> None:
    long = engine.submit(ask(STORY, LONG))
    events = iter(long)  # kept: dropping the iterator would cancel the request
    assert isinstance(next(events), SegmentEvent)
    short = engine.submit(ask(QUESTIONS[0], NudgingConfig(max_tokens=6)))
    short.result()
    assert not long.done, "the short request waited for the long one"
    events.close()
    assert long.cancelled
    assert engine.wait_idle(30)


def test_cancel_mid_answer_frees_everything(engine: NudgingEngine, pair: NudgingPair) -> None:
    handle = engine.submit(ask(STORY, LONG))
    events = iter(handle)
    assert isinstance(next(events), SegmentEvent)
    assert engine.live_sessions == 2
    handle.cancel()
    rest = list(events)
    assert isinstance(rest[-1], Finished)
    assert rest[-1].stats.finish_reason == "cancelled"
    assert engine.wait_idle(30)
    assert engine.live_sessions == 0
    assert engine.submit(ask(QUESTIONS[1], SHORT)).result().text == alone(pair, QUESTIONS[1])


def test_leaving_the_iteration_early_cancels(engine: NudgingEngine) -> None:
    handle = engine.submit(ask(STORY, LONG))
    for _event in handle:
        break
    assert handle.cancelled
    assert engine.wait_idle(30)
    assert engine.live_sessions == 0


async def test_cancelling_an_asyncio_consumer_cancels_the_request(engine: NudgingEngine) -> None:
    handle = engine.submit(ask(STORY, LONG))
    started = asyncio.Event()

    async def consume() -> None:
        async for _event in handle:
            started.set()

    task = asyncio.create_task(consume())
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert handle.cancelled
    assert await asyncio.to_thread(engine.wait_idle, 30)
    assert engine.live_sessions == 0


def test_a_failing_request_leaves_the_others_correct(
    pair: NudgingPair, exploding_stop_check: str
) -> None:
    engine = NudgingEngine(pair)
    try:
        expected = {q: alone(pair, q) for q in QUESTIONS}
        handles = {q: engine.submit(ask(q, SHORT)) for q in QUESTIONS}
        boom = NudgingConfig(max_tokens=24, stop=[exploding_stop_check])
        bad = engine.submit(ask("What now?", boom))
        events = list(bad)
        assert isinstance(events[-1], Failed)
        assert "stop check exploded" in str(events[-1].error)
        with pytest.raises(ValueError, match="stop check exploded"):
            engine.submit(ask("And again?", boom)).result()
        assert {q: h.result().text for q, h in handles.items()} == expected
        assert engine.wait_idle(30)
        assert engine.live_sessions == 0
    finally:
        engine.shutdown()


@pytest.mark.parametrize(
    ("mode", "sources", "models"),
    [
        ("nudged", {"base", "nudge"}, {"base", "nudging"}),
        ("base", {"base"}, {"base"}),
        ("nudging", {"nudge"}, {"nudging"}),
    ],
)
def test_modes(
    engine: NudgingEngine, pair: NudgingPair, mode: Any, sources: set[str], models: set[str]
) -> None:
    handle = engine.submit(ask(QUESTIONS[2], SHORT, mode=mode))
    segments = list(handle.segments())
    end = handle.result()
    assert end.segments == tuple(segments)
    assert end.text == "".join(s.text for s in segments)
    stats = end.stats
    assert {s.source for s in segments} == sources
    assert set(stats.forward_passes) == models
    assert "".join(s.text for s in segments) == alone(pair, QUESTIONS[2], SHORT, mode)
    assert stats.finish_reason in {"length", "stop", "repetition"}
    assert stats.time_to_first_segment is not None
    assert 0 < stats.time_to_first_segment <= stats.wall_time
    tokens = stats.base_tokens + stats.nudge_tokens
    assert 0 < tokens <= SHORT.max_tokens
    assert tokens == pair.base.counter().count(end.text)


def test_bad_input_raises_at_submit(engine: NudgingEngine) -> None:
    with pytest.raises(ValueError, match="messages"):
        engine.submit(Request([], SHORT))
    assert engine.live_requests == 0
    assert engine.wait_idle(0)


def test_a_full_queue_is_refused_clearly(pair: NudgingPair) -> None:
    engine = NudgingEngine(pair, max_requests=2)
    try:
        handles = [engine.submit(ask(q, LONG)) for q in QUESTIONS[:2]]
        with pytest.raises(EngineBusyError, match="max_requests is 2"):
            engine.submit(ask(QUESTIONS[2], SHORT))
        for handle in handles:
            handle.cancel()
        assert engine.wait_idle(30)
        engine.submit(ask(QUESTIONS[2], SHORT)).result()
    finally:
        engine.shutdown()


def test_shutdown_cancels_running_requests_and_ends_the_worker(pair: NudgingPair) -> None:
    engine = NudgingEngine(pair)
    handles = [engine.submit(ask(q, LONG)) for q in (STORY, QUESTIONS[1])]
    streams = [iter(handle) for handle in handles]  # kept: dropping one would cancel it
    for events in streams:
        next(events)
    thread = engine._thread  # two requests running: the worker batches their passes
    assert thread is not None
    assert engine.shutdown()
    assert not thread.is_alive()
    assert all(handle.done for handle in handles)
    assert engine.live_requests == 0
    assert engine.live_sessions == 0
    with pytest.raises(EngineClosedError):
        engine.submit(ask("hi", SHORT))


# -- batching ------------------------------------------------------------------------------------
NEAR_TIE = 1e-4  # probabilities this close may order differently in a batched pass


def decisions(trace: list[Any]) -> list[tuple[Any, ...]]:
    """What each round decided, as text: the draft, the accepted words, the base tokens."""
    return [
        (
            tuple(t.text for t in r.draft),
            r.nudge_text,
            None if r.boundary is None else r.boundary.text,
            tuple(t.text for t in r.base_tokens),
        )
        for r in trace
    ]


def near_tie(alone: list[Any], batched: list[Any], gamma: float) -> bool:
    """Whether the first round where the traces part was decided by a numeric near-tie."""
    for a, b in zip(alone, batched, strict=False):
        if decisions([a]) != decisions([b]):
            tokens = [*a.draft, *([a.boundary] if a.boundary else []), *a.base_tokens]
            return any(
                t.top1_prob - t.top2_prob < NEAR_TIE or abs(t.top1_prob - gamma) < NEAR_TIE
                for t in tokens
            )
    return False


@pytest.mark.parametrize("max_batch", [16, 3])
def test_batched_requests_decide_as_they_would_alone(
    pair: NudgingPair, max_batch: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Many requests at once, their passes batched (ragged caches, crops, mixed widths): each
    request's decision trace equals its trace alone, unless a numeric near-tie parted them."""
    questions = [*QUESTIONS, "Write a short poem about the sea.", "What is 6 times 7?"] * 2
    configs = [SHORT, NudgingConfig(max_tokens=48, draft_tokens=4, chunk_tokens=3)]
    requests = [ask(q, configs[i % 2]) for i, q in enumerate(questions)]
    alone_runs = []
    for request in requests:
        generation = pair.generate(request)
        list(generation)
        alone_runs.append(generation)
    served: list[Generation] = []  # the engine's generations, for their traces
    generate = pair.generate

    def kept(request: Request, scheduler: Any) -> Generation:
        served.append(generate(request, scheduler))
        return served[-1]

    monkeypatch.setattr(pair, "generate", kept)
    engine = NudgingEngine(pair, max_batch=max_batch)
    try:
        ends = [end.result() for end in [engine.submit(request) for request in requests]]
        assert engine.batched_passes / engine.batches > 1.5, "passes were not batched"
        assert max(engine.batch_sizes) <= max_batch
        excluded = []
        for request, alone, batched, end in zip(requests, alone_runs, served, ends, strict=True):
            question = request.messages[0].content
            if decisions(batched.trace) != decisions(alone.trace):
                assert near_tie(alone.trace, batched.trace, request.config.gamma), question
                excluded.append(question)
                continue
            assert end.text == alone.text
        assert len(excluded) <= 1, f"near-ties excluded: {excluded}"
        assert engine.wait_idle(30)
        assert engine.live_sessions == 0
    finally:
        engine.shutdown()


def test_bad_batching_settings_are_refused(pair: NudgingPair) -> None:
    with pytest.raises(ValueError, match="max_batch must be >= 1"):
        NudgingEngine(pair, max_batch=0)
    with pytest.raises(ValueError, match="max_wait must be >= 0"):
        NudgingEngine(pair, max_wait=-1)


# -- a backend that batches by itself -----------------------------------------------------------
class SelfBatching(LocalModel):
    """The tiny models as a serving engine would offer them: their work is not batchable, the
    backend batching concurrent requests by itself."""

    capabilities = Capabilities(batches_itself=True, grammars=True, grammar_mass=True)
    batchable = False


def test_a_backend_that_batches_by_itself_runs_its_work_in_the_request_threads(
    pair: NudgingPair, llama_a: Any, gemma_b: Any
) -> None:
    """Concurrent requests over a pair whose runners are not batchable: every forward pass runs
    in its request's own thread, and the engine never starts a worker thread."""
    threads: list[str] = []
    hooks = [
        loaded.model.register_forward_pre_hook(
            lambda *_: threads.append(threading.current_thread().name)
        )
        for loaded in (llama_a, gemma_b)
    ]
    engine = NudgingEngine(NudgingPair(SelfBatching(llama_a), SelfBatching(gemma_b)))
    try:
        handles = [engine.submit(ask(q)) for q in QUESTIONS * 2]
        texts = [handle.result().text for handle in handles]
        assert engine.wait_idle(30)
    finally:
        for hook in hooks:
            hook.remove()
        assert engine.shutdown(timeout=30)
    assert texts == [alone(pair, q) for q in QUESTIONS * 2]
    assert engine._thread is None, "a worker thread was started"
    names = {f"nudging-request-{handle.id}" for handle in handles}
    assert set(threads) <= names
    assert len(set(threads)) == len(handles)  # each request ran its own passes
