"""The engine: a loaded pair serving many requests, their forward passes batched.

Callers (threads or asyncio tasks) ``submit`` a conversation and read events from the returned
:class:`RequestHandle`: segments as they are decided, then one :class:`Finished` (or an
:class:`Failed`). Each request runs the nudging algorithm in a thread of its own; its forward
passes wait for the engine's worker thread, which runs the passes of one model that are waiting
together as one batched call (docs/concurrency.md). So a long answer never holds up a short one,
concurrent requests share each model step, and no forward pass ever runs on a caller's thread
or event loop. A model runs one forward pass at a time. Cancelling a request ends it within one
forward pass and frees its sessions.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import functools
import logging
import threading
import time
import weakref
from collections import deque
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from itertools import count
from typing import Any

import torch

from ..algorithm import Mode, Segment
from ..backends.local import LocalModel, Step, forward_together, serve_passes_through
from ..config import NudgingConfig
from .generation import Generation, GenerationStats, NudgingPair
from ..models import LoadedModel
from ..prompts import BasePromptFormat, ChatMessage
from ..structured import OutputSpec

logger = logging.getLogger(__name__)

DEFAULT_MAX_REQUESTS = 64
DEFAULT_MAX_BATCH = 16
# Seconds a batch may wait for requests still between passes. Threads released by a batch
# take a few GIL switches (5 ms each) to ask again; a short wait splits requests in one phase
# into alternating half batches.
DEFAULT_MAX_WAIT = 0.2
MAX_SKIPS = 16  # batches a waiting pass may be passed over before its group goes next
# Seconds between a waiting request thread's checks that the worker is still alive (a
# cancellation or a finished pass wakes it at once).
WORKER_CHECK_INTERVAL = 0.25
DEFAULT_SHUTDOWN_TIMEOUT = 30.0  # seconds shutdown(wait=True) waits for the threads to end
EXIT_TIMEOUT = 10.0  # seconds, all engines together, the interpreter's exit waits for them


class EngineBusyError(RuntimeError):
    """More requests than the engine's ``max_requests`` are queued or running."""


class EngineClosedError(RuntimeError):
    """The engine was shut down."""


class EngineWorkerError(RuntimeError):
    """The engine's worker thread stopped (an error outside a forward pass): the passes that
    were waiting for it, and the requests not yet started, fail with this error. The next pass
    or submit starts a new worker."""


class _Cancelled(BaseException):
    """Raised in a cancelled request's thread at its next forward pass; ends the request.

    A ``BaseException``, so that no ``except Exception`` on the way out of the algorithm
    mistakes it for a failure of the request.
    """


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
    """One submitted request: its events, for one consumer, blocking or asyncio.

    The events are read once, by one consumer: ``for event in handle``, ``async for``,
    :meth:`segments`, :meth:`result` or :meth:`aresult`. Iterating again (sync or async), or
    while another consumer reads, raises ``RuntimeError`` at once. :meth:`result` and
    :meth:`aresult` may follow any consumer: once the end was read they return the kept
    :class:`Finished` (or raise the kept failure) at once; after a consumer that left early
    they wait for the end themselves. While another consumer reads, they raise
    ``RuntimeError``.
    """

    def __init__(self, engine: NudgingEngine, request_id: int, generation: Generation) -> None:
        self.id = request_id
        self.generation = generation
        self._engine = engine
        self._events: deque[Event] = deque()
        self._lock = threading.Condition()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wakeup: asyncio.Event | None = None
        self._end: Finished | Failed | None = None  # the end event, kept once pushed
        self._claimed = False  # a consumer started reading the events
        self._reading = False  # ... and reads them now
        self._end_read = False  # the end event was read
        self.cancelled = False
        self.done = False

    # -- consumer side -----------------------------------------------------------------------
    def cancel(self) -> None:
        """End the request within one forward pass (the one running, if any, completes); its
        thread closes its sessions and the end is a :class:`Finished` whose
        ``stats.finish_reason`` is ``"cancelled"`` (unless it had already ended)."""
        self.cancelled = True
        self._engine._notify()

    def __iter__(self) -> Iterator[Event]:
        """Blocking iteration, once; leaving early cancels the request."""
        with self._lock:
            self._claim(takeover=False)
        return self._read()

    def __aiter__(self) -> AsyncIterator[Event]:
        """Asyncio iteration on the caller's running loop, once; leaving early cancels the
        request."""
        loop = asyncio.get_running_loop()
        with self._lock:
            self._claim(takeover=False)
            wakeup = self._listen(loop)
        return self._aread(wakeup)

    def segments(self) -> Iterator[Segment]:
        """Blocking iteration over segments only, once; a failure raises here."""
        with self._lock:
            self._claim(takeover=False)
        return self._segments(self._read())

    def result(self) -> Finished:
        """Wait for the end; returns the :class:`Finished` event or raises the failure.

        Segments not yet read are dropped. After the end was read (by any consumer), the kept
        end at once.
        """
        with self._lock:
            end = self._claim(takeover=True)
        if end is None:
            for event in self._read():
                if not isinstance(event, SegmentEvent):
                    end = event
        assert end is not None
        return _outcome(end)

    async def aresult(self) -> Finished:
        """:meth:`result` on the caller's running loop."""
        loop = asyncio.get_running_loop()
        with self._lock:
            end = self._claim(takeover=True)
            wakeup = self._listen(loop) if end is None else None
        if wakeup is not None:
            async for event in self._aread(wakeup):
                if not isinstance(event, SegmentEvent):
                    end = event
        assert end is not None
        return _outcome(end)

    def _claim(self, takeover: bool) -> Finished | Failed | None:
        """Under the lock: make the caller the consumer. ``takeover`` (``result``): after a
        consumer that left early, or the kept end if the end was read (None otherwise)."""
        if self._reading:
            raise RuntimeError(
                f"request {self.id}'s events are being read by another consumer; "
                "a RequestHandle has one consumer"
            )
        if self._end_read:
            if takeover:
                return self._end
            raise RuntimeError(
                f"request {self.id}'s events were already read to the end; a RequestHandle is "
                "iterated once (result() returns its end again)"
            )
        if self._claimed and not takeover:
            raise RuntimeError(
                f"request {self.id}'s events were already read by a consumer that left early; "
                "a RequestHandle is iterated once (result() waits for its end)"
            )
        self._claimed = self._reading = True
        return None

    def _listen(self, loop: asyncio.AbstractEventLoop) -> asyncio.Event:
        """Under the lock: wake ``loop`` at each new event."""
        wakeup = asyncio.Event()
        self._loop, self._wakeup = loop, wakeup
        return wakeup

    def _read(self) -> Iterator[Event]:
        try:
            while True:
                with self._lock:
                    while not self._events:
                        self._lock.wait()  # an end always comes: _serve pushes one
                    event = self._take_event()
                yield event
                if not isinstance(event, SegmentEvent):
                    return
        finally:
            self._stop_reading()

    async def _aread(self, wakeup: asyncio.Event) -> AsyncIterator[Event]:
        try:
            while True:
                with self._lock:
                    event = self._take_event() if self._events else None
                    if event is None:
                        wakeup.clear()
                if event is None:
                    await wakeup.wait()
                    continue
                yield event
                if not isinstance(event, SegmentEvent):
                    return
        finally:
            with self._lock:
                if self._wakeup is wakeup:
                    self._loop = self._wakeup = None
            self._stop_reading()

    @staticmethod
    def _segments(events: Iterator[Event]) -> Iterator[Segment]:
        for event in events:
            if isinstance(event, SegmentEvent):
                yield event.segment
            elif isinstance(event, Failed):
                raise event.error

    def _take_event(self) -> Event:
        """Under the lock: the next event (there is one)."""
        event = self._events.popleft()
        if not isinstance(event, SegmentEvent):
            self._end_read = True
        return event

    def _stop_reading(self) -> None:
        with self._lock:
            self._reading = False
        if not self.done:
            self.cancel()

    # -- worker side -------------------------------------------------------------------------
    def _push(self, event: Event) -> None:
        with self._lock:
            if self.done:
                return  # one end only
            if not isinstance(event, SegmentEvent):
                self.done = True
                self._end = event
            self._events.append(event)
            self._lock.notify_all()
            loop, wakeup = self._loop, self._wakeup
        if loop is not None and wakeup is not None:
            with contextlib.suppress(RuntimeError):  # the consumer's loop is already closed
                loop.call_soon_threadsafe(wakeup.set)


def _outcome(end: Finished | Failed) -> Finished:
    if isinstance(end, Failed):
        raise end.error
    return end


class _Job:
    """One request, served by a thread of its own; its forward passes go through the engine."""

    def __init__(self, handle: RequestHandle) -> None:
        self.handle = handle
        self.steps = iter(handle.generation)

    def run(self) -> None:
        """Produce every segment, then the end event, whatever happens; a cancel takes effect
        at the next forward pass (``_Cancelled``) or the next segment, whichever comes first."""
        handle = self.handle
        generation = handle.generation
        try:
            while True:
                if handle.cancelled:
                    raise _Cancelled
                try:
                    segment = next(self.steps)
                except StopIteration:
                    handle._push(Finished(generation.text, generation.stats))
                    return
                handle._push(SegmentEvent(segment))
        except _Cancelled:
            self.close()
            generation.stats.finish_reason = "cancelled"
            handle._push(Finished(generation.text, generation.stats))
        except BaseException as error:  # one request's failure is that request's alone
            self.close()
            handle._push(Failed(error))

    def close(self) -> None:
        with contextlib.suppress(BaseException):
            self.steps.close()  # type: ignore[attr-defined]


@dataclass(eq=False)  # passes compare by identity (fields would compare tensors)
class _Pass:
    """A forward pass a request's thread waits for."""

    model: LocalModel
    step: Step
    rows: torch.Tensor | None = None
    error: BaseException | None = None
    done: bool = False
    skipped: int = 0  # batches run while this pass waited
    started: bool = False  # taken into a batch: it can no longer be withdrawn


class NudgingEngine:
    """A resident pair serving many requests, their forward passes batched.

    Each request runs in a thread of its own; the worker thread runs the forward passes.
    Passes of one model that are waiting at the same time run as one batched call (up to
    ``max_batch``): the worker starts a batch once every running request is waiting for a
    pass, or ``max_wait`` seconds after the first one asked. Passes wait in arrival order, so
    no request starves; requests join and leave between passes.

    Each model runs one forward pass at a time (a lock per model, process-wide). A cancelled
    request ends within one forward pass. If the worker thread stops, the passes waiting for
    it fail with :class:`EngineWorkerError` and the next pass or submit starts a new one.
    :meth:`shutdown` and the interpreter's exit wait a bounded time.
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
        self._batch: list[_Pass] = []  # the batch the worker is running
        self._first_wait = 0.0  # when the oldest waiting pass was asked for
        self._wakeup = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None
        self._worker_stopped: str | None = None  # why the last worker thread stopped
        self._forward_locks = {id(m): forward_lock(m) for m in (pair.base, pair.nudging)}
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

    def wait_idle(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds until no request is queued or running and no session
        of the pair is open; whether that is so."""
        deadline = time.monotonic() + timeout
        with self._wakeup:
            while self.live_requests or self.live_sessions:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                # Sessions opened outside the engine close without a notification: poll too.
                self._wakeup.wait(timeout=min(left, 0.05))
        return True

    def shutdown(self, wait: bool = True, timeout: float | None = DEFAULT_SHUTDOWN_TIMEOUT) -> bool:
        """Cancel every request, end the worker; later submits raise EngineClosedError.

        A running request stops within one forward pass. With ``wait``, wait up to ``timeout``
        seconds (``None``: without a bound) for the request threads and the worker to end.
        Returns whether they all ended; they are daemon threads, so one still busy (a forward
        pass that does not return, say) does not keep the interpreter alive.
        """
        with self._wakeup:
            self._closed = True
            for job in (*self._incoming, *self._jobs):
                job.handle.cancelled = True
            self._wakeup.notify_all()
        # Called from one of this engine's own threads, waiting would wait for itself.
        inside = (
            getattr(_HERE, "engine", None) is self or threading.current_thread() is self._thread
        )
        if wait and not inside:
            deadline = None if timeout is None else time.monotonic() + timeout
            thread = self._thread
            if thread is not None:
                thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
            with self._wakeup:  # a worker that stopped on an error did not wait for them
                while self.live_requests:
                    left = None if deadline is None else deadline - time.monotonic()
                    if left is not None and left <= 0:
                        break
                    self._wakeup.wait(timeout=WORKER_CHECK_INTERVAL if left is None else left)
        with self._wakeup:
            thread = self._thread
            return self.live_requests == 0 and (thread is None or not thread.is_alive())

    # -- request threads -------------------------------------------------------------------
    def _notify(self) -> None:
        with self._wakeup:
            self._wakeup.notify_all()

    def _serve(self, job: _Job) -> None:
        try:
            _HERE.engine = self
            serve_passes_through(functools.partial(self._run_pass, job))
            job.run()
        finally:
            serve_passes_through(None)
            _HERE.engine = None
            if not job.handle.done:  # job.run pushes the end; this only if it could not
                job.handle._push(Failed(RuntimeError("the request's thread stopped early")))
            with self._wakeup:
                self._jobs.discard(job)
                self._serving -= 1
                self._running -= 1
                self._wakeup.notify_all()

    def _run_pass(self, job: _Job, model: LocalModel, step: Step) -> torch.Tensor:
        """In a request's thread: wait for the worker to run this pass (in a batch).

        A request served alone runs its pass itself: there is nothing to batch with, and the
        hand-over to the worker would cost about 3% of a lone answer's time. Either way the
        pass holds its model's lock, so a model runs one pass at a time.

        A cancelled request raises ``_Cancelled`` before its pass runs, and while it waits
        (its pass withdrawn, unless the worker has already started it). The wait is bounded:
        if the worker thread stops, the pass fails with :class:`EngineWorkerError`.
        """
        handle = job.handle
        if handle.cancelled:
            raise _Cancelled
        with self._wakeup:
            alone = self._serving == 1 and not self._passes and not self._incoming
        if alone:
            with self._lock_of(model):
                if handle.cancelled:
                    raise _Cancelled
                return forward_together(model, [step])[0]
        waiting = _Pass(model, step)
        with self._wakeup:
            self._ensure_worker()  # a stopped worker is replaced
            if not self._passes:
                self._first_wait = time.monotonic()
            self._passes.append(waiting)
            self._running -= 1
            self._wakeup.notify_all()
            while not waiting.done:
                if handle.cancelled and not waiting.started:
                    self._withdraw(waiting)
                    raise _Cancelled
                if not self._worker_alive():
                    self._withdraw(waiting)
                    raise self._worker_error()
                self._wakeup.wait(timeout=WORKER_CHECK_INTERVAL)
        if waiting.error is not None:
            raise waiting.error
        if handle.cancelled:
            raise _Cancelled
        assert waiting.rows is not None
        return waiting.rows

    def _withdraw(self, waiting: _Pass) -> None:
        """Under the lock: a pass its thread no longer waits for; the thread runs again."""
        self._passes = [p for p in self._passes if p is not waiting]
        waiting.done = True
        self._running += 1
        self._wakeup.notify_all()

    def _lock_of(self, model: LocalModel) -> threading.Lock:
        lock = self._forward_locks.get(id(model))
        return lock if lock is not None else forward_lock(model)

    # -- the worker ----------------------------------------------------------------------------
    def _ensure_worker(self) -> None:
        """Under the lock: start a worker thread if none is alive."""
        if not self._worker_alive():
            self._thread = threading.Thread(target=self._work, name="nudging-engine", daemon=True)
            self._thread.start()

    def _worker_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _worker_error(self) -> EngineWorkerError:
        why = self._worker_stopped or "it ended unexpectedly"
        return EngineWorkerError(f"the engine's worker thread stopped: {why}")

    def _work(self) -> None:
        try:
            while True:
                with self._wakeup:
                    batch = self._next_batch()
                    if batch is None:
                        return
                    for waiting in batch:
                        waiting.started = True
                    self._batch = batch
                self._run_batch(batch)
        except BaseException as error:
            self._worker_died(error)

    def _worker_died(self, error: BaseException) -> None:
        """The worker thread is ending on an error: every pass waiting for it and every request
        not yet started fails with :class:`EngineWorkerError`; the next pass or submit starts a
        new worker."""
        logger.error("the nudging engine's worker thread stopped", exc_info=error)
        with self._wakeup:
            if self._thread is threading.current_thread():
                self._thread = None
            self._worker_stopped = f"{type(error).__name__}: {error}"
            failed = [*self._passes, *(p for p in self._batch if not p.done)]
            self._passes, self._batch = [], []
            for waiting in failed:
                waiting.error = self._worker_error()
                waiting.error.__cause__ = error
                waiting.done = True
            self._running += len(failed)
            incoming = list(self._incoming)
            self._incoming.clear()
            self._wakeup.notify_all()
        for job in incoming:
            failure = self._worker_error()
            failure.__cause__ = error
            job.handle._push(Failed(failure))

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
                try:
                    threading.Thread(
                        target=self._serve, args=(job,), name=name, daemon=True
                    ).start()
                except BaseException as error:  # no thread for it (too many threads, say)
                    self._jobs.discard(job)
                    self._serving -= 1
                    self._running -= 1
                    job.handle._push(Failed(error))
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
            with self._lock_of(batch[0].model):
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
            self._batch = []
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


_HERE = threading.local()  # in a request's thread: its engine
_FORWARD_LOCKS: weakref.WeakKeyDictionary[Any, threading.Lock] = weakref.WeakKeyDictionary()
_FORWARD_LOCKS_GUARD = threading.Lock()


def forward_lock(model: LocalModel) -> threading.Lock:
    """The lock an engine holds around each forward pass of ``model``'s weights: one per
    module, process-wide, so engines sharing a model (two pairs with one base model) do not
    run it twice at once either."""
    key: Any = model.model
    with _FORWARD_LOCKS_GUARD:
        try:
            lock = _FORWARD_LOCKS.get(key)
            if lock is None:
                lock = _FORWARD_LOCKS[key] = threading.Lock()
        except TypeError:  # a model object that cannot be weakly referenced: one per wrapper
            lock = model.__dict__.setdefault("_engine_forward_lock", threading.Lock())
        return lock


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
    """At exit: cancel every engine's requests, then wait for them ``EXIT_TIMEOUT`` seconds at
    most in all (a pass that does not return must not keep the interpreter from exiting)."""
    engines = list(_ENGINES)
    for engine in engines:
        engine.shutdown(wait=False)
    deadline = time.monotonic() + EXIT_TIMEOUT
    for engine in engines:
        engine.shutdown(wait=True, timeout=max(0.0, deadline - time.monotonic()))
