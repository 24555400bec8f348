"""The engine's guarantees under trouble, on tiny models: cancellation within one forward pass,
one pass at a time per model, one consumer per handle, a worker thread that dies, bounded
shutdown. Every wait has a timeout: a regression fails here instead of hanging."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest

from langchain_nudging.backends.base import Work
from langchain_nudging.backends.local import LocalModel
from langchain_nudging.config import NudgingConfig
from langchain_nudging.prompts import ChatMessage
from langchain_nudging.request import Request
from langchain_nudging.serving.engine import EngineWorkerError, NudgingEngine
from langchain_nudging.serving.events import Failed, Finished, SegmentEvent
from langchain_nudging.serving.generation import NudgingPair
from langchain_nudging.serving.handle import RequestHandle

pytestmark = pytest.mark.timeout(60)

QUESTIONS = ["What is the capital of France?", "Tell me a story.", "Why is the sky blue?"]
SHORT = NudgingConfig(max_tokens=24)
# One base window is 96 forward passes: cancelling between segments would take them all.
WINDOW = NudgingConfig(max_tokens=1500, chunk_tokens=96, max_rounds=1000, min_repeat_chars=100_000)
STORY = "Tell me a story."


def ask(question: str, config: NudgingConfig = SHORT, mode: Any = "nudged") -> Request:
    return Request([ChatMessage("user", question)], config, mode)


def alone(pair: NudgingPair, question: str, config: NudgingConfig = SHORT) -> str:
    return "".join(s.text for s in pair.generate(ask(question, config)))


def within(timeout: float, fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` in a thread of its own: its result, or its exception raised here; fails
    if it has not returned after ``timeout`` seconds (the thread is a daemon, left behind)."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = fn(*args)
        except BaseException as error:
            box["error"] = error

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), f"{getattr(fn, '__name__', fn)} still waiting after {timeout}s"
    if "error" in box:
        raise box["error"]
    return box["value"]


def outcome(handle: RequestHandle) -> Finished | BaseException:
    try:
        return handle.result()
    except Exception as error:
        return error


class Passes:
    """Counts the forward passes of each request as the pair's models run them (their
    ``run_together``); ``before(requests)`` runs first, in the thread running them, with the
    ids of the requests whose passes they are."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.counts: Counter[int] = Counter()
        self.before: Callable[[list[int]], None] | None = None
        self._lock = threading.Lock()
        self._owners: dict[int, int] = {}  # id(work) -> request id, while the work is asked
        scheduled, together = NudgingEngine._run, LocalModel.run_together

        def asked(engine: NudgingEngine, handle: RequestHandle, work: Work) -> Any:
            with self._lock:
                self._owners[id(work)] = handle.id
            try:
                return scheduled(engine, handle, work)
            finally:
                with self._lock:
                    del self._owners[id(work)]

        def counted(model: LocalModel, works: list[Work]) -> Any:
            with self._lock:
                requests = [self._owners.get(id(work), 0) for work in works]
                self.counts.update(requests)
            if self.before is not None:
                self.before(requests)
            return together(model, works)

        monkeypatch.setattr(NudgingEngine, "_run", asked)
        monkeypatch.setattr(LocalModel, "run_together", counted)

    def of(self, handle: RequestHandle) -> int:
        with self._lock:
            return self.counts[handle.id]

    def queued(self, engine: NudgingEngine, handle: RequestHandle) -> bool:
        """Whether a pass of ``handle`` waits for the engine's worker."""
        with engine._wakeup, self._lock:
            return any(self._owners.get(id(p.work)) == handle.id for p in engine._passes)


@pytest.fixture
def passes(monkeypatch: pytest.MonkeyPatch) -> Passes:
    return Passes(monkeypatch)


# -- cancellation within one forward pass ---------------------------------------------------------
def test_cancelling_a_lone_request_stops_it_within_one_forward_pass(
    engine: NudgingEngine, passes: Passes
) -> None:
    """Alone, the request runs its passes in its own thread (the fast path): a cancel during its
    5th pass is the last pass it runs, in the middle of a 96-token window."""
    box: dict[str, Any] = {}
    threads: set[str] = set()

    def before(requests: list[int]) -> None:
        threads.add(threading.current_thread().name)
        handle = box.get("handle")
        if handle is not None and "at" not in box and passes.of(handle) >= 5:
            handle.cancel()
            box["at"] = passes.of(handle)

    passes.before = before
    box["handle"] = handle = engine.submit(ask(STORY, WINDOW, mode="base"))
    end = within(30, handle.result)
    assert end.stats.finish_reason == "cancelled"
    assert "at" in box
    assert passes.of(handle) - box["at"] <= 1, "passes ran after the cancel"
    assert all(name.startswith("nudging-request-") for name in threads), threads
    assert engine.wait_idle(30)


def test_cancelling_a_batched_request_stops_it_within_one_forward_pass(
    engine: NudgingEngine, passes: Passes
) -> None:
    """With another request running, the passes go through the worker: a cancel during one of
    them (on the worker's thread) is the last pass the request runs; the other one goes on."""
    box: dict[str, Any] = {}

    def before(requests: list[int]) -> None:
        first = box.get("first")
        on_worker = threading.current_thread().name == "nudging-engine"
        if first is None or "at" in box or not on_worker or first.id not in requests:
            return
        if passes.of(first) >= 5:
            first.cancel()
            box["at"] = passes.of(first)

    passes.before = before
    box["first"] = first = engine.submit(ask(STORY, WINDOW, mode="base"))
    second = engine.submit(ask(QUESTIONS[0], WINDOW, mode="base"))
    end = within(30, first.result)
    assert end.stats.finish_reason == "cancelled"
    assert "at" in box, "no pass of the first request ran on the worker"
    assert passes.of(first) - box["at"] <= 1, "passes ran after the cancel"
    assert not second.done
    ran = passes.of(second)
    second.cancel()
    assert within(30, second.result).stats.finish_reason == "cancelled"
    assert passes.of(second) - ran <= 1
    assert engine.wait_idle(30)


def test_a_cancelled_pass_that_has_not_started_is_withdrawn(
    engine: NudgingEngine, passes: Passes
) -> None:
    """The worker is stuck in one request's pass; another request's pass waits behind it.
    Cancelling the waiting request ends it at once: its pass never runs."""
    gate = threading.Event()
    box: dict[str, Any] = {}

    def before(requests: list[int]) -> None:
        blocker = box.get("blocker")
        on_worker = threading.current_thread().name == "nudging-engine"
        mine = blocker is not None and blocker.id in requests
        if on_worker and mine and passes.of(blocker) >= 3:
            box["stuck"] = True
            gate.wait(30)

    passes.before = before
    try:
        box["blocker"] = blocker = engine.submit(ask(STORY, WINDOW, mode="base"))
        waiter = engine.submit(ask(QUESTIONS[2], WINDOW, mode="nudging"))  # the other model
        deadline = time.monotonic() + 30
        while not (box.get("stuck", False) and passes.queued(engine, waiter)):
            assert time.monotonic() < deadline, "the waiter's pass never queued"
            time.sleep(0.005)
        ran = passes.of(waiter)
        waiter.cancel()
        end = within(5, waiter.result)  # the worker is still stuck
        assert end.stats.finish_reason == "cancelled"
        assert passes.of(waiter) == ran, "the withdrawn pass ran"
        assert not passes.queued(engine, waiter)
        assert not blocker.done
    finally:
        gate.set()
    blocker.cancel()
    assert within(30, blocker.result).stats.finish_reason == "cancelled"
    assert engine.wait_idle(30)


# -- one forward pass at a time per model --------------------------------------------------------
def test_a_model_runs_one_forward_pass_at_a_time(
    pair: NudgingPair, llama_a: Any, gemma_b: Any
) -> None:
    """Requests arriving while one runs alone (its passes in its own thread) and the worker
    batching the others: never two passes of one model at once."""
    in_flight: Counter[str] = Counter()
    most: Counter[str] = Counter()
    threads: set[str] = set()
    lock = threading.Lock()
    hooks = []
    for name, loaded in (("base", llama_a), ("nudging", gemma_b)):  # the pair's models

        def pre(*_: Any, name: str = name) -> None:
            with lock:
                in_flight[name] += 1
                most[name] = max(most[name], in_flight[name])
                threads.add(threading.current_thread().name)
            time.sleep(0.003)  # a pass long enough for another to start meanwhile

        def post(*_: Any, name: str = name) -> None:
            with lock:
                in_flight[name] -= 1

        hooks.append(loaded.model.register_forward_pre_hook(pre))
        hooks.append(loaded.model.register_forward_hook(post))
    engine = NudgingEngine(pair, max_wait=0)  # the worker runs a pass as soon as it is asked
    try:
        configs = [
            (SHORT, "base"),
            (NudgingConfig(max_tokens=16), "nudged"),
            (SHORT, "nudging"),
        ]
        for k in range(6):
            config, mode = configs[k % 3]
            first = engine.submit(ask(QUESTIONS[k % 3], config, mode=mode))
            time.sleep(0.03)  # the first one runs alone for a while
            second = engine.submit(ask(QUESTIONS[(k + 1) % 3], config, mode=mode))
            third = engine.submit(ask(STORY, SHORT, mode="base"))
            for handle in (first, second, third):
                within(30, handle.result)
        assert engine.wait_idle(30)
    finally:
        for hook in hooks:
            hook.remove()
        engine.shutdown(timeout=30)
    assert "nudging-engine" in threads  # the worker ran passes ...
    assert any(name.startswith("nudging-request-") for name in threads)  # ... and a lone request
    assert most == {"base": 1, "nudging": 1}, dict(most)


# -- one consumer per handle -----------------------------------------------------------------------
def test_result_after_the_end_was_read_returns_the_kept_end(engine: NudgingEngine) -> None:
    handle = engine.submit(ask(QUESTIONS[0], SHORT))
    events = within(30, list, handle)
    assert isinstance(events[-1], Finished)
    assert within(5, handle.result) is events[-1]
    assert within(5, handle.result) is events[-1]
    for again in (iter, RequestHandle.segments):
        with pytest.raises(RuntimeError, match="already read to the end"):
            again(handle)
    with pytest.raises(RuntimeError, match="already read to the end"):
        for _event in handle:
            pass


async def test_aresult_after_the_end_was_read_returns_the_kept_end(
    engine: NudgingEngine,
) -> None:
    handle = engine.submit(ask(QUESTIONS[1], SHORT))
    first = await asyncio.wait_for(handle.aresult(), 30)
    assert await asyncio.wait_for(handle.aresult(), 5) is first
    assert within(5, handle.result) is first
    with pytest.raises(RuntimeError, match="already read to the end"):
        async for _event in handle:
            pass


def test_a_kept_failure_is_raised_again(engine: NudgingEngine, exploding_stop_check: str) -> None:
    handle = engine.submit(
        ask(QUESTIONS[2], NudgingConfig(max_tokens=24, stop=[exploding_stop_check]))
    )
    for _ in range(2):
        with pytest.raises(ValueError, match="stop check exploded"):
            within(30, handle.result)
    with pytest.raises(RuntimeError, match="already read to the end"):
        iter(handle)


def test_a_second_blocking_consumer_is_refused_at_once(engine: NudgingEngine) -> None:
    handle = engine.submit(ask(STORY, NudgingConfig(max_tokens=48)))
    events = iter(handle)
    assert isinstance(within(30, next, events), SegmentEvent)
    for again in (iter, RequestHandle.segments, RequestHandle.result):
        with pytest.raises(RuntimeError, match="being read by another consumer"):
            within(5, again, handle)
    rest = within(30, list, events)  # the first consumer still gets every event
    assert isinstance(rest[-1], Finished)
    assert rest[-1].stats.finish_reason != "cancelled"
    assert within(5, handle.result) is rest[-1]


async def test_a_second_asyncio_consumer_is_refused_at_once(engine: NudgingEngine) -> None:
    """Two tasks iterating one handle: the second raises at once and steals nothing (its
    wake-ups and events stay the first one's)."""
    handle = engine.submit(ask(STORY, NudgingConfig(max_tokens=48)))
    reading = asyncio.Event()

    async def consume() -> list[Any]:
        seen = []
        async for event in handle:
            seen.append(event)
            reading.set()
        return seen

    first = asyncio.create_task(consume())
    await asyncio.wait_for(reading.wait(), 30)
    second = asyncio.create_task(consume())
    with pytest.raises(RuntimeError, match="being read by another consumer"):
        await asyncio.wait_for(second, 5)
    with pytest.raises(RuntimeError, match="being read by another consumer"):
        await asyncio.wait_for(handle.aresult(), 5)
    seen = await asyncio.wait_for(first, 30)
    assert isinstance(seen[-1], Finished)
    assert seen[-1].stats.finish_reason != "cancelled"
    assert seen[-1].text == "".join(e.segment.text for e in seen[:-1])


def test_result_after_a_consumer_left_early_waits_for_the_end(engine: NudgingEngine) -> None:
    handle = engine.submit(ask(STORY, WINDOW))
    for _event in handle:
        break  # leaving cancels the request
    end = within(30, handle.result)
    assert end.stats.finish_reason == "cancelled"
    with pytest.raises(RuntimeError, match="already read"):
        iter(handle)


# -- a worker thread that dies ---------------------------------------------------------------------
def break_take_once(engine: NudgingEngine, monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """The worker's ``_take`` raises (an error outside any forward pass) the first time every
    request of ``QUESTIONS`` waits for it: then none is left to start a new worker before the
    waiting ones notice. The dead worker's thread is recorded."""
    real, dead = engine._take, []

    def take() -> Any:
        if not dead and len(engine._passes) == len(QUESTIONS):
            dead.append(threading.current_thread())
            raise RuntimeError("take broke")
        return real()

    monkeypatch.setattr(engine, "_take", take)
    return dead


def test_a_dead_worker_fails_the_waiting_passes_and_a_new_one_serves(
    engine: NudgingEngine, pair: NudgingPair, monkeypatch: pytest.MonkeyPatch
) -> None:
    dead = break_take_once(engine, monkeypatch)
    handles = [engine.submit(ask(q, SHORT)) for q in QUESTIONS]
    ends = [within(30, outcome, handle) for handle in handles]
    failed = [end for end in ends if isinstance(end, BaseException)]
    assert failed, "no pass was waiting for the worker"
    for error in failed:
        assert isinstance(error, EngineWorkerError), repr(error)
        assert "the engine's worker thread stopped: RuntimeError: take broke" in str(error)
    for question, end in zip(QUESTIONS, ends, strict=True):
        if isinstance(end, Finished):
            assert end.text == alone(pair, question)
    assert within(30, engine.submit(ask(QUESTIONS[1], SHORT)).result).text == alone(
        pair, QUESTIONS[1]
    )
    # Concurrent requests again: their passes need a worker, and a new one runs them.
    again = [engine.submit(ask(q, SHORT)) for q in QUESTIONS]
    assert [within(30, h.result).text for h in again] == [alone(pair, q) for q in QUESTIONS]
    assert engine._thread is not None
    assert engine._thread is not dead[0]
    assert engine.wait_idle(30)


def test_waiting_passes_notice_a_worker_gone_without_a_word(
    engine: NudgingEngine, pair: NudgingPair, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Even when nothing tells the waiting threads (the worker's own clean-up skipped), their
    bounded waits see the worker gone and fail their passes."""
    break_take_once(engine, monkeypatch)
    monkeypatch.setattr(engine, "_worker_died", lambda error: None, raising=False)
    handles = [engine.submit(ask(q, SHORT)) for q in QUESTIONS]
    ends = [within(30, outcome, handle) for handle in handles]
    failed = [end for end in ends if isinstance(end, BaseException)]
    assert failed
    assert all(isinstance(error, EngineWorkerError) for error in failed), failed
    assert within(30, engine.submit(ask(QUESTIONS[0], SHORT)).result).text == alone(
        pair, QUESTIONS[0]
    )
    assert engine.wait_idle(30)


class Abort(BaseException):
    """Not an ``Exception``: the kind a request's thread used to die of without an end."""


def test_a_base_exception_in_a_request_still_ends_it(
    engine: NudgingEngine, pair: NudgingPair, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = LocalModel.run_together
    armed = [True]

    def aborting(model: LocalModel, works: list[Work]) -> Any:
        if armed[0]:
            raise Abort("aborted")
        return real(model, works)

    monkeypatch.setattr(LocalModel, "run_together", aborting)
    handle = engine.submit(ask(QUESTIONS[0], SHORT))
    events = within(30, list, handle)
    assert isinstance(events[-1], Failed)
    assert isinstance(events[-1].error, Abort)
    armed[0] = False
    assert engine.wait_idle(30)
    assert within(30, engine.submit(ask(QUESTIONS[0], SHORT)).result).text == alone(
        pair, QUESTIONS[0]
    )


# -- shutdown and idleness -------------------------------------------------------------------------
def test_shutdown_stops_running_requests_within_one_pass(pair: NudgingPair, passes: Passes) -> None:
    engine = NudgingEngine(pair)
    started = threading.Event()
    box: dict[str, Any] = {}

    def before(requests: list[int]) -> None:
        if "handles" in box and all(passes.of(h) >= 5 for h in box["handles"]):
            started.set()
        time.sleep(0.002)

    passes.before = before
    box["handles"] = handles = [
        engine.submit(ask(q, WINDOW, mode="base")) for q in (STORY, QUESTIONS[0])
    ]
    assert started.wait(30)
    assert engine.shutdown(timeout=30) is True
    at = [passes.of(h) for h in handles]
    for handle, ran in zip(handles, at, strict=True):
        assert within(5, handle.result).stats.finish_reason == "cancelled"
        assert ran < WINDOW.chunk_tokens  # stopped inside the first window
    assert engine.live_requests == 0
    assert engine.live_sessions == 0


def test_shutdown_waits_a_bounded_time(pair: NudgingPair, passes: Passes) -> None:
    """A forward pass that does not return: shutdown(wait=True) gives up after its timeout and
    says so; once the pass returns, the request ends and shutdown says all ended."""
    engine = NudgingEngine(pair)
    gate, stuck = threading.Event(), threading.Event()

    def before(requests: list[int]) -> None:
        if sum(passes.counts.values()) >= 3:
            stuck.set()
            gate.wait(30)

    passes.before = before
    try:
        handle = engine.submit(ask(STORY, WINDOW, mode="base"))
        assert stuck.wait(30)
        start = time.monotonic()
        assert within(10, engine.shutdown, True, 0.5) is False
        assert time.monotonic() - start < 5
        assert not handle.done
    finally:
        gate.set()
    assert within(30, engine.shutdown, True, 30) is True
    assert within(5, handle.result).stats.finish_reason == "cancelled"
    assert engine.live_sessions == 0


def test_wait_idle(engine: NudgingEngine, pair: NudgingPair) -> None:
    assert engine.wait_idle(0)
    handle = engine.submit(ask(STORY, WINDOW, mode="base"))
    start = time.monotonic()
    assert engine.wait_idle(0.2) is False
    assert time.monotonic() - start < 5
    handle.cancel()
    assert engine.wait_idle(30)
    session = pair.base.session("an open session", NudgingConfig().base_sampling)
    assert engine.wait_idle(0.05) is False  # a session open outside the engine counts too
    session.close()
    assert engine.wait_idle(5)
