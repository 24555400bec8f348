"""The engine: one worker thread owns a loaded pair and serves many requests.

Callers (threads or asyncio tasks) ``submit`` a conversation and read events from the returned
:class:`RequestHandle`: segments as they are decided, then one :class:`Finished` (or an
:class:`Failed`). The worker advances every active request one step (one segment) at a time in
turn, so a long answer never holds up a short one, and no forward pass ever runs on a caller's
event loop. Cancelling a request ends it at its next step and frees its sessions.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import threading
import weakref
from collections import deque
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from itertools import count

from .algorithm import Mode, Segment
from .config import NudgingConfig
from .generation import Generation, GenerationStats, NudgingPair
from .models import LoadedModel
from .prompts import BasePromptFormat, ChatMessage
from .structured import OutputSpec

DEFAULT_MAX_REQUESTS = 64


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
    def __init__(self, handle: RequestHandle) -> None:
        self.handle = handle
        self.steps = iter(handle.generation)

    def step(self) -> bool:
        """Advance one segment; returns whether the job is still active."""
        handle = self.handle
        if handle.cancelled:
            self.close()
            handle.generation.stats.finish_reason = "cancelled"
            handle._push(Finished(handle.generation.text, handle.generation.stats))
            return False
        try:
            segment = next(self.steps)
        except StopIteration:
            handle._push(Finished(handle.generation.text, handle.generation.stats))
            return False
        except Exception as error:  # one request's failure is that request's alone
            self.close()
            handle._push(Failed(error))
            return False
        handle._push(SegmentEvent(segment))
        return True

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.steps.close()  # type: ignore[attr-defined]


class NudgingEngine:
    """A resident pair served by one worker thread."""

    def __init__(self, pair: NudgingPair, max_requests: int = DEFAULT_MAX_REQUESTS) -> None:
        if max_requests < 1:
            raise ValueError(f"max_requests must be >= 1, got {max_requests}")
        self.pair = pair
        self.max_requests = max_requests
        self._ids = count(1)
        self._incoming: deque[_Job] = deque()
        self._active: list[_Job] = []
        self._wakeup = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None
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
            self._wakeup.notify()
        return handle

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def live_requests(self) -> int:
        return len(self._incoming) + len(self._active)

    @property
    def live_sessions(self) -> int:
        return self.pair.live_sessions

    def shutdown(self, wait: bool = True) -> None:
        """Cancel what is running, end the worker; later submits raise EngineClosedError."""
        with self._wakeup:
            self._closed = True
            for job in (*self._incoming, *self._active):
                job.handle.cancelled = True
            self._wakeup.notify()
        thread = self._thread
        if wait and thread is not None and thread is not threading.current_thread():
            thread.join()

    # -- the worker ----------------------------------------------------------------------------
    def _notify(self) -> None:
        with self._wakeup:
            self._wakeup.notify()

    def _ensure_worker(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._work, name="nudging-engine", daemon=True)
            self._thread.start()

    def _work(self) -> None:
        while True:
            with self._wakeup:
                while not self._incoming and not self._active and not self._closed:
                    self._wakeup.wait()
                self._active.extend(self._incoming)
                self._incoming.clear()
                if self._closed and not self._active:
                    return
                jobs = list(self._active)
            finished = [job for job in jobs if not job.step()]
            if finished:
                with self._wakeup:
                    self._active = [job for job in self._active if job not in finished]


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
