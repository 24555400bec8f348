"""One submitted request's handle: its events, read once, blocking or asyncio.

The request's thread pushes events (:mod:`.events`); one consumer reads them
(docs/concurrency.md, "One consumer per handle").
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator

from ..algorithm import Segment
from .events import Event, Failed, Finished, SegmentEvent


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

    def __init__(self, request_id: int, wake: Callable[[], None]) -> None:
        self.id = request_id
        self._wake = wake  # tells the engine that the request was cancelled
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
        self._wake()

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
                        self._lock.wait()  # an end always comes: the request thread pushes one
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

    # -- the request's thread ---------------------------------------------------------------
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
