"""The engine: a pair serving many requests, the model work of requests running together batched.

Callers (threads or asyncio tasks) ``submit`` a :class:`~langchain_nudging.request.Request` and
read events from the returned :class:`~.handle.RequestHandle`: segments as they are decided,
then one :class:`~.events.Finished` (or a :class:`~.events.Failed`). Each request runs the
nudging algorithm in a thread of its own. Its sessions hand each unit of model work (a forward
pass) to the request's scheduler, which the engine supplies: works of a backend that batches
(``runner.batchable``) wait for the engine's worker thread, which runs the works of one runner
that are waiting together as one call (:func:`~.batching.choose_batch`); works of a backend that
batches by itself (a serving engine) run in the request's own thread. So a long answer never
holds up a short one, concurrent requests share each model step, and no model work ever runs on
a caller's thread or event loop. Cancelling a request ends it within one forward pass and frees
its sessions (docs/concurrency.md).
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import threading
import time
import weakref
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import count
from typing import Any

from ..algorithm import Segment
from ..backends.base import Work
from ..request import Request
from .batching import Waiting, choose_batch
from .events import Failed, Finished, SegmentEvent
from .generation import Generation, NudgingPair
from .handle import RequestHandle

logger = logging.getLogger(__name__)

DEFAULT_MAX_REQUESTS = 64
DEFAULT_MAX_BATCH = 16
# Seconds a batch may wait for requests still between passes. Threads released by a batch
# take a few GIL switches (5 ms each) to ask again; a short wait splits requests in one phase
# into alternating half batches.
DEFAULT_MAX_WAIT = 0.2
# Seconds between a waiting request thread's checks that the worker is still alive (a
# cancellation or a finished pass wakes it at once).
WORKER_CHECK_INTERVAL = 0.25
DEFAULT_SHUTDOWN_TIMEOUT = 30.0  # seconds shutdown(wait=True) waits for the threads to end


class EngineBusyError(RuntimeError):
    """More requests than the engine's ``max_requests`` are queued or running."""


class EngineClosedError(RuntimeError):
    """The engine was shut down."""


class EngineWorkerError(RuntimeError):
    """The engine's worker thread stopped (an error outside a model call): the works that were
    waiting for it fail with this error. The next work waiting starts a new worker."""


class _Cancelled(BaseException):
    """Raised in a cancelled request's thread at its next unit of model work; ends the request.

    A ``BaseException``, so that no ``except Exception`` on the way out of the algorithm
    mistakes it for a failure of the request.
    """


class _Job:
    """One request, served by a thread of its own."""

    def __init__(self, handle: RequestHandle, generation: Generation) -> None:
        self.handle = handle
        self.generation = generation
        self.thread: threading.Thread | None = None

    def run(self) -> None:
        """Produce every segment, then the end event, whatever happens; a cancel takes effect
        at the next unit of model work (``_Cancelled``) or the next segment, whichever comes
        first."""
        handle, generation = self.handle, self.generation
        segments = iter(generation)
        try:
            while True:
                if handle.cancelled:
                    raise _Cancelled
                try:
                    segment = next(segments)
                except StopIteration:
                    handle._push(self._finished())
                    return
                handle._push(SegmentEvent(segment))
        except _Cancelled:
            _close(segments)
            generation.stats.finish_reason = "cancelled"
            handle._push(self._finished())
        except BaseException as error:  # one request's failure is that request's alone
            _close(segments)
            handle._push(Failed(error))

    def _finished(self) -> Finished:
        generation = self.generation
        return Finished(generation.text, tuple(generation.segments), generation.stats)


def _close(segments: Iterator[Segment]) -> None:
    """End a generation early: its ``finally`` closes its sessions."""
    close = getattr(segments, "close", None)
    if close is not None:
        with contextlib.suppress(BaseException):
            close()


class _RequestScheduler:
    """The scheduler a request's sessions hand their work to (backends/base.py)."""

    def __init__(self, engine: NudgingEngine, handle: RequestHandle) -> None:
        self._engine = engine
        self._handle = handle

    def run(self, work: Work) -> Any:
        return self._engine._run(self._handle, work)


@dataclass(eq=False)  # waiting works compare by identity
class _Pass:
    """A unit of work a request's thread waits for the worker to run."""

    work: Work
    error: BaseException | None = None
    done: bool = False
    skipped: int = 0  # batches run while this work waited
    started: bool = False  # taken into a batch: it can no longer be withdrawn

    @property
    def waiting(self) -> Waiting:
        """What the batch rule reads of it: works of one runner and one group go together."""
        return Waiting((id(self.work.runner), self.work.group), self.work.first, self.skipped)


class NudgingEngine:
    """A resident pair serving many requests, their model work batched.

    Each request runs in a thread of its own. Works of a batchable runner (this process's
    models) go to the worker thread: works of one runner and group waiting at the same time
    run as one call (up to ``max_batch``). The worker starts a batch once every running
    request is waiting for a work, or ``max_wait`` seconds after the first one asked. Works
    wait in arrival order, so no request starves; requests join and leave between works. A
    request served alone runs its works itself, as do requests on a backend that batches by
    itself (no worker thread is started for them).

    Each runner runs one call at a time (its ``lock()``; one per model's weights,
    process-wide). A cancelled request ends within one forward pass. If the worker thread
    stops, the works waiting for it fail with :class:`EngineWorkerError` and the next work
    waiting starts a new one. :meth:`shutdown` and the interpreter's exit (serving/shared.py)
    wait a bounded time.
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
        self._jobs: set[_Job] = set()  # the requests being served, one thread each
        self._running = 0  # of those, the ones not waiting for the worker
        self._passes: list[_Pass] = []  # works waiting for the worker, in arrival order
        self._batch: list[_Pass] = []  # the batch the worker is running
        self._first_wait = 0.0  # when the oldest waiting work was asked for
        self._wakeup = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None
        self._worker_stopped: str | None = None  # why the last worker thread stopped
        self.batches = 0  # batched calls run, and the works in them: the mean batch size
        self.batched_passes = 0
        self.batch_sizes: deque[int] = deque(maxlen=1000)  # the latest batches' sizes
        _ENGINES.add(self)

    # -- callers -------------------------------------------------------------------------------
    def submit(self, request: Request) -> RequestHandle:
        """Start serving ``request``. Bad input and a full engine raise here, before anything
        runs."""
        handle = RequestHandle(next(self._ids), self._notify)
        job = _Job(handle, self.pair.generate(request, _RequestScheduler(self, handle)))
        job.thread = threading.Thread(
            target=self._serve, args=(job,), name=f"nudging-request-{handle.id}", daemon=True
        )
        with self._wakeup:
            if self._closed:
                raise EngineClosedError("the engine was shut down")
            if self.live_requests >= self.max_requests:
                raise EngineBusyError(
                    f"{self.live_requests} requests are queued or running, the engine's "
                    f"max_requests is {self.max_requests}; retry later or raise max_requests"
                )
            self._jobs.add(job)
            self._running += 1
        try:
            job.thread.start()
        except BaseException as error:  # no thread for it (too many threads, say)
            self._leave(job)
            handle._push(Failed(error))
        return handle

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def live_requests(self) -> int:
        return len(self._jobs)

    @property
    def live_sessions(self) -> int:
        return self.pair.live_sessions

    def wait_idle(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds until no request is running and no session of the
        pair is open; whether that is so."""
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
            for job in self._jobs:
                job.handle.cancelled = True
            self._wakeup.notify_all()
            # Called from one of this engine's own threads, waiting would wait for itself.
            here = threading.current_thread()
            inside = here is self._thread or any(job.thread is here for job in self._jobs)
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
            job.run()
        finally:
            if not job.handle.done:  # job.run pushes the end; this only if it could not
                job.handle._push(Failed(RuntimeError("the request's thread stopped early")))
            self._leave(job)

    def _leave(self, job: _Job) -> None:
        with self._wakeup:
            self._jobs.discard(job)
            self._running -= 1
            self._wakeup.notify_all()

    def _run(self, handle: RequestHandle, work: Work) -> Any:
        """In a request's thread: run ``work``, or wait for the worker to run it in a batch.

        Works of a runner that is not batchable (a backend that batches by itself) run here.
        So does every work of a request served alone: there is nothing to batch with, and the
        hand-over to the worker would cost about 3% of a lone answer's time. Either way the
        call holds its runner's lock, so a model runs one call at a time.

        A cancelled request raises ``_Cancelled`` before its work runs, and while it waits
        (its work withdrawn, unless the worker has already started it). The wait is bounded:
        if the worker thread stops, the work fails with :class:`EngineWorkerError`.
        """
        if handle.cancelled:
            raise _Cancelled
        with self._wakeup:
            alone = len(self._jobs) == 1 and not self._passes
        if alone or not work.runner.batchable:
            with work.runner.lock():
                if handle.cancelled:
                    raise _Cancelled
                return work.runner.run_together([work])[0]
        waiting = _Pass(work)
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
        return work.result

    def _withdraw(self, waiting: _Pass) -> None:
        """Under the lock: a work its thread no longer waits for; the thread runs again."""
        self._passes = [p for p in self._passes if p is not waiting]
        waiting.done = True
        self._running += 1
        self._wakeup.notify_all()

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
        """The worker thread is ending on an error: every work waiting for it fails with
        :class:`EngineWorkerError`; the next work waiting starts a new worker."""
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
            self._wakeup.notify_all()

    def _next_batch(self) -> list[_Pass] | None:
        """Under the lock: wait until a batch is due (None: the end)."""
        while True:
            if self._passes:
                due = self._first_wait + self.max_wait
                if self._running <= 0 or time.monotonic() >= due:
                    return self._take()
                self._wakeup.wait(timeout=max(0.0, due - time.monotonic()))
            elif self._closed and not self._jobs:
                return None
            else:
                self._wakeup.wait()

    def _take(self) -> list[_Pass]:
        """Under the lock: the waiting works :func:`~.batching.choose_batch` takes next."""
        taken = set(choose_batch([p.waiting for p in self._passes], self.max_batch))
        batch = [p for i, p in enumerate(self._passes) if i in taken]
        self._passes = [p for i, p in enumerate(self._passes) if i not in taken]
        for waiting in self._passes:
            waiting.skipped += 1
        if self._passes:
            self._first_wait = time.monotonic()
        return batch

    def _run_batch(self, batch: list[_Pass]) -> None:
        runner = batch[0].work.runner
        try:
            with runner.lock():
                results = runner.run_together([p.work for p in batch])
            for waiting, result in zip(batch, results, strict=True):
                waiting.work.result = result
        except BaseException as error:  # every work of a failed batch fails (its request only)
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


_ENGINES: weakref.WeakSet[NudgingEngine] = weakref.WeakSet()
EXIT_TIMEOUT = 10.0  # seconds, all engines together, the interpreter's exit waits for them


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
