"""The engine: a loaded pair serving many requests, their forward passes batched.

Callers (threads or asyncio tasks) ``submit`` a conversation and read events from the returned
:class:`RequestHandle`: segments as they are decided, then one :class:`Finished` (or an
:class:`Failed`). Each request runs the nudging algorithm in a thread of its own; its forward
passes wait for the engine's worker thread, which runs the passes of one model that are waiting
together as one batched call (docs/concurrency.md). So a long answer never holds up a short one,
concurrent requests share each model step, and no forward pass ever runs on a caller's event
loop. Cancelling a request ends it at its next step and frees its sessions.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import threading
import time
import weakref
from collections import deque
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from itertools import count

import torch

from .algorithm import Mode, Segment
from .backends.local import LocalModel, Step, forward_together, serve_passes_through
from .config import NudgingConfig
from .generation import Generation, GenerationStats, NudgingPair
from .models import LoadedModel
from .prompts import BasePromptFormat, ChatMessage
from .structured import OutputSpec

DEFAULT_MAX_REQUESTS = 64
DEFAULT_MAX_BATCH = 16
# Seconds a batch may wait for requests still between passes. Threads released by a batch
# take a few GIL switches (5 ms each) to ask again; a short wait splits requests in one phase
# into alternating half batches.
DEFAULT_MAX_WAIT = 0.2
MAX_SKIPS = 16  # batches a waiting pass may be passed over before its group goes next


class EngineBusyError(RuntimeError):
    """More requests than the engine's ``max_requests`` are queued or running."""


class EngineClosedError(RuntimeError):
    """The engine was shut down."""


@dataclass(frozen=True, slots=True)
class SegmentEvent:
    segment: Segment


@dataclass(frozen=True, slots=True)
class Finished:
    """The request ended; ``stats.finish_reason`` is ``"cancelled"`` after :meth:`cancel`."""

    text: str
    stats: GenerationStats


@dataclass(frozen=True, slots=True)
class Failed:
    error: BaseException


Event = SegmentEvent | Finished | Failed


class RequestHandle:
    """One submitted request: its events, for a blocking or an asyncio consumer."""

    def __init__(self, engine: NudgingEngine, request_id: int, generation: Generation) -> None:
        self.id = request_id
        self.generation = generation
        self._engine = engine
        self._events: deque[Event] = deque()
        self._lock = threading.Condition()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wakeup: asyncio.Event | None = None
        self.cancelled = False
        self.done = False

    # -- consumer side -----------------------------------------------------------------------
    def cancel(self) -> None:
        """End the request at its next step; its sessions are freed by the worker."""
        self.cancelled = True
        self._engine._notify()

    def __iter__(self) -> Iterator[Event]:
        """Blocking iteration; leaving early cancels the request."""
        try:
            while True:
                with self._lock:
                    while not self._events:
                        self._lock.wait()
                    event = self._events.popleft()
                yield event
                if not isinstance(event, SegmentEvent):
                    return
        finally:
            if not self.done:
                self.cancel()

    async def __aiter__(self) -> AsyncIterator[Event]:
        """Asyncio iteration on the caller's running loop; leaving early cancels the request."""
        loop = asyncio.get_running_loop()
        wakeup = asyncio.Event()
        with self._lock:
            self._loop, self._wakeup = loop, wakeup
        try:
            while True:
                with self._lock:
                    event = self._events.popleft() if self._events else None
                    if event is None:
                        wakeup.clear()
                if event is None:
                    await wakeup.wait()
                    continue
                yield event
                if not isinstance(event, SegmentEvent):
                    return
        finally:
            if not self.done:
                self.cancel()

    def segments(self) -> Iterator[Segment]:
        """Blocking iteration over segments only; a failure raises here."""
        for event in self:
            if isinstance(event, SegmentEvent):
                yield event.segment
            elif isinstance(event, Failed):
                raise event.error

    def result(self) -> Finished:
        """Wait for the end; returns the :class:`Finished` event or raises the failure."""
        for event in self:
            if isinstance(event, Finished):
                return event
            if isinstance(event, Failed):
                raise event.error
        raise RuntimeError("the request's events were already consumed")

    async def aresult(self) -> Finished:
        async for event in self:
            if isinstance(event, Finished):
                return event
            if isinstance(event, Failed):
                raise event.error
        raise RuntimeError("the request's events were already consumed")

    # -- worker side -------------------------------------------------------------------------
    def _push(self, event: Event) -> None:
        with self._lock:
            if not isinstance(event, SegmentEvent):
                self.done = True
            self._events.append(event)
            self._lock.notify_all()
            loop, wakeup = self._loop, self._wakeup
        if loop is not None and wakeup is not None:
            with contextlib.suppress(RuntimeError):  # the consumer's loop is already closed
                loop.call_soon_threadsafe(wakeup.set)


class _Job:
    """One request, served by a thread of its own; its forward passes go through the engine."""

    def __init__(self, handle: RequestHandle) -> None:
        self.handle = handle
        self.steps = iter(handle.generation)

    def run(self) -> None:
        """Produce every segment, then the end event; stop at the first step after a cancel."""
        handle = self.handle
        generation = handle.generation
        while True:
            if handle.cancelled:
                self.close()
                generation.stats.finish_reason = "cancelled"
                handle._push(Finished(generation.text, generation.stats))
                return
            try:
                segment = next(self.steps)
            except StopIteration:
                handle._push(Finished(generation.text, generation.stats))
                return
            except Exception as error:  # one request's failure is that request's alone
                self.close()
                handle._push(Failed(error))
                return
            handle._push(SegmentEvent(segment))

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.steps.close()  # type: ignore[attr-defined]


@dataclass
class _Pass:
    """A forward pass a request's thread waits for."""

    model: LocalModel
    step: Step
    rows: torch.Tensor | None = None
    error: BaseException | None = None
    done: bool = False
    skipped: int = 0  # batches run while this pass waited


class NudgingEngine:
    """A resident pair serving many requests, their forward passes batched.

    Each request runs in a thread of its own; the worker thread runs the forward passes.
    Passes of one model that are waiting at the same time run as one batched call (up to
    ``max_batch``): the worker starts a batch once every running request is waiting for a
    pass, or ``max_wait`` seconds after the first one asked. Passes wait in arrival order, so
    no request starves; requests join and leave between passes.
    """

    def __init__(
        self,
        pair: NudgingPair,
        max_requests: int = DEFAULT_MAX_REQUESTS,
        max_batch: int = DEFAULT_MAX_BATCH,
        max_wait: float = DEFAULT_MAX_WAIT,
    ) -> None:
        if max_requests < 1:
            raise ValueError(f"max_requests must be >= 1, got {max_requests}")
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if max_wait < 0:
            raise ValueError(f"max_wait must be >= 0 seconds, got {max_wait}")
        self.pair = pair
        self.max_requests = max_requests
        self.max_batch = max_batch
        self.max_wait = max_wait
        self._ids = count(1)
        self._incoming: deque[_Job] = deque()
        self._jobs: set[_Job] = set()  # the requests being served
        self._serving = 0  # request threads alive
        self._running = 0  # of those, the ones not waiting for a pass
        self._passes: list[_Pass] = []
        self._first_wait = 0.0  # when the oldest waiting pass was asked for
        self._wakeup = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None
        self.batches = 0  # batched calls run, and the passes in them: the mean batch size
        self.batched_passes = 0
        self.batch_sizes: deque[int] = deque(maxlen=1000)  # the latest batches' sizes
        _ENGINES.add(self)

    # -- callers -------------------------------------------------------------------------------
    def submit(
        self,
        messages: Sequence[ChatMessage],
        config: NudgingConfig | None = None,
        mode: Mode = "nudged",
        base_format: BasePromptFormat | None = None,
        output: OutputSpec | None = None,
    ) -> RequestHandle:
        """Queue a request. Bad input and a full queue raise here, before anything runs."""
        generation = self.pair.generate(messages, config, mode, base_format, output)
        with self._wakeup:
            if self._closed:
                raise EngineClosedError("the engine was shut down")
            if self.live_requests >= self.max_requests:
                raise EngineBusyError(
                    f"{self.live_requests} requests are queued or running, the engine's "
                    f"max_requests is {self.max_requests}; retry later or raise max_requests"
                )
            handle = RequestHandle(self, next(self._ids), generation)
            self._incoming.append(_Job(handle))
            self._ensure_worker()
            self._wakeup.notify_all()
        return handle

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def live_requests(self) -> int:
        return len(self._incoming) + self._serving

    @property
    def live_sessions(self) -> int:
        return self.pair.live_sessions

    def shutdown(self, wait: bool = True) -> None:
        """Cancel what is running, end the worker; later submits raise EngineClosedError."""
        with self._wakeup:
            self._closed = True
            for job in (*self._incoming, *self._jobs):
                job.handle.cancelled = True
            self._wakeup.notify_all()
        thread = self._thread
        if wait and thread is not None and thread is not threading.current_thread():
            thread.join()

    # -- request threads -------------------------------------------------------------------
    def _notify(self) -> None:
        with self._wakeup:
            self._wakeup.notify_all()

    def _serve(self, job: _Job) -> None:
        serve_passes_through(self._run_pass)
        try:
            job.run()
        finally:
            serve_passes_through(None)
            with self._wakeup:
                self._jobs.discard(job)
                self._serving -= 1
                self._running -= 1
                self._wakeup.notify_all()

    def _run_pass(self, model: LocalModel, step: Step) -> torch.Tensor:
        """In a request's thread: wait for the worker to run this pass (in a batch).

        A request served alone runs its pass itself: there is nothing to batch with, and the
        hand-over to the worker would cost about 3% of a lone answer's time.
        """
        with self._wakeup:
            alone = self._serving == 1 and not self._passes and not self._incoming
        if alone:
            return forward_together(model, [step])[0]
        waiting = _Pass(model, step)
        with self._wakeup:
            if not self._passes:
                self._first_wait = time.monotonic()
            self._passes.append(waiting)
            self._running -= 1
            self._wakeup.notify_all()
            while not waiting.done:
                self._wakeup.wait()
        if waiting.error is not None:
            raise waiting.error
        assert waiting.rows is not None
        return waiting.rows

    # -- the worker ----------------------------------------------------------------------------
    def _ensure_worker(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._work, name="nudging-engine", daemon=True)
            self._thread.start()

    def _work(self) -> None:
        while True:
            with self._wakeup:
                batch = self._next_batch()
            if batch is None:
                return
            self._run_batch(batch)

    def _next_batch(self) -> list[_Pass] | None:
        """Under the lock: start new requests; wait until a batch is due (None: the end)."""
        while True:
            while self._incoming:
                job = self._incoming.popleft()
                if self._closed:
                    job.handle.cancelled = True
                self._jobs.add(job)
                self._serving += 1
                self._running += 1
                name = f"nudging-request-{job.handle.id}"
                threading.Thread(target=self._serve, args=(job,), name=name, daemon=True).start()
            if self._passes:
                due = self._first_wait + self.max_wait
                if self._running <= 0 or time.monotonic() >= due:
                    return self._take()
                self._wakeup.wait(timeout=max(0.0, due - time.monotonic()))
            elif self._closed and self._serving == 0:
                return None
            else:
                self._wakeup.wait()

    def _take(self) -> list[_Pass]:
        """Up to ``max_batch`` waiting passes of one model and one width class, in order.

        A batched call pads every pass to the widest: a prompt's first pass (hundreds of ids)
        batched with one-token steps would make each of them that wide, so passes are batched
        with passes of a similar width only (1; 2-16; 17-64; 65-256; ...). A session's first pass
        (a new request reading its prompt) goes ahead of steps, so a new request's first text
        does not wait behind others' steps. Otherwise the largest group goes first, so requests
        in the same phase (drafting, verifying, writing) keep stepping together. A pass passed
        over ``MAX_SKIPS`` times goes next, so none starves.
        """
        groups: dict[tuple[int, int], list[_Pass]] = {}
        for waiting in self._passes:
            key = (id(waiting.model), _width_class(len(waiting.step.new_ids)))
            groups.setdefault(key, []).append(waiting)
        oldest = self._passes[0]
        if oldest.skipped >= MAX_SKIPS:
            key = (id(oldest.model), _width_class(len(oldest.step.new_ids)))
            batch = groups[key][: self.max_batch]
        else:
            firsts = [group for group in groups.values() if any(p.step.first for p in group)]
            batch = max(firsts or groups.values(), key=len)[: self.max_batch]
        taken = {id(p) for p in batch}
        self._passes = [p for p in self._passes if id(p) not in taken]
        for waiting in self._passes:
            waiting.skipped += 1
        if self._passes:
            self._first_wait = time.monotonic()
        return batch

    def _run_batch(self, batch: list[_Pass]) -> None:
        try:
            rows = forward_together(batch[0].model, [p.step for p in batch])
            for waiting, row in zip(batch, rows, strict=True):
                waiting.rows = row
        except BaseException as error:  # every pass of a failed batch fails (its request only)
            for waiting in batch:
                waiting.error = error
        self.batches += 1
        self.batched_passes += len(batch)
        self.batch_sizes.append(len(batch))
        with self._wakeup:
            for waiting in batch:
                waiting.done = True
            # Counted as running from now: the next batch waits for them to ask again.
            self._running += len(batch)
            self._wakeup.notify_all()


def _width_class(width: int) -> int:
    """0 for one id (a decoding step), 1 for 2-16 (a draft verified, a short re-read), then
    2 for 17-64, 3 for 65-256, ... (prompts)."""
    if width <= 16:
        return 0 if width <= 1 else 1
    level, bound = 2, 64
    while width > bound:
        level, bound = level + 1, bound * 4
    return level


_ENGINES: weakref.WeakSet[NudgingEngine] = weakref.WeakSet()
_SHARED: dict[tuple[int, int], NudgingEngine] = {}
_SHARED_LOCK = threading.Lock()


def shared_engine(base: LoadedModel, nudging: LoadedModel) -> NudgingEngine:
    """The process-wide engine of a loaded pair: every caller of one pair shares one worker.

    ``LoadedModel`` objects come from the model registry, so callers asking for the same models
    with the same settings get the same engine. The engine keeps its models alive until
    :func:`close_shared_engines`.
    """
    key = (id(base), id(nudging))
    with _SHARED_LOCK:
        engine = _SHARED.get(key)
        if engine is None or engine.closed:
            engine = _SHARED[key] = NudgingEngine(NudgingPair(base, nudging))
        return engine


def close_shared_engines() -> None:
    """Shut every shared engine down (their models can then be unloaded)."""
    with _SHARED_LOCK:
        engines = list(_SHARED.values())
        _SHARED.clear()
    for engine in engines:
        engine.shutdown()


@atexit.register
def _shutdown_all() -> None:
    for engine in list(_ENGINES):
        engine.shutdown(wait=True)
