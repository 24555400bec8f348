"""Unloading a pair: now (``NudgedChatModel.unload``) or after it was idle for a while
(``keep_alive``). Its shared engine is shut down and its models leave the factory's caches,
unless another shared engine still uses them."""

from __future__ import annotations

import threading
from typing import Any

from ..backends.base import TextModel
from ..backends.registry import release_text_model
from .engine import NudgingEngine
from .shared import forget_engine


def unload(engine: NudgingEngine | None, models: list[TextModel]) -> bool:
    """Shut ``engine`` down and take it out of the shared engines, then release each of
    ``models`` that no other shared engine uses (and the weights of those whose weights no
    other engine's model shares, as a chat-template variant of a model does)."""
    others = forget_engine(engine)
    in_use = {id(m) for m in others}
    weights_in_use = {id(_weights(m)) for m in others if _weights(m) is not None}
    if engine is not None:
        IDLE.cancel(engine)
        engine.shutdown()
    released = [
        release_text_model(m, weights=id(_weights(m)) not in weights_in_use)
        for m in {id(m): m for m in models}.values()
        if id(m) not in in_use
    ]
    return engine is not None or any(released)


def _weights(model: TextModel) -> Any:
    """The torch model under a text model loaded in this process (``None`` for others)."""
    return getattr(model, "model", None)


class IdleTimers:
    """``keep_alive``: the engines in use, and one timer per idle engine that unloads it.

    A call marks its engine busy (cancelling the engine's timer) and, as it ends, starts the
    timer once no other call uses the engine. A timer that fires while a call is in flight, or
    after it was replaced, does nothing; its thread ends either way.
    """

    def __init__(self) -> None:
        self._lock = threading.RLock()  # an expiring timer unloads (and cancels) under it
        self._busy: dict[int, int] = {}
        self._timers: dict[int, threading.Timer] = {}

    def begin(self, engine: NudgingEngine) -> None:
        with self._lock:
            self._busy[id(engine)] = self._busy.get(id(engine), 0) + 1
            timer = self._timers.pop(id(engine), None)
        if timer is not None:
            timer.cancel()

    def end(self, engine: NudgingEngine, keep_alive: float | None) -> None:
        with self._lock:
            left = self._busy.get(id(engine), 1) - 1
            if left > 0:
                self._busy[id(engine)] = left
                return
            self._busy.pop(id(engine), None)
            if keep_alive is None or engine.closed:
                return
            timer = threading.Timer(keep_alive, self._expire, (engine,))
            timer.name = "nudging-keep-alive"
            timer.daemon = True
            old = self._timers.get(id(engine))
            self._timers[id(engine)] = timer
        if old is not None:
            old.cancel()
        timer.start()

    def cancel(self, engine: NudgingEngine) -> None:
        """Drop the engine's pending timer (it is being unloaded)."""
        with self._lock:
            timer = self._timers.pop(id(engine), None)
        if timer is not None and timer is not threading.current_thread():
            timer.cancel()

    def _expire(self, engine: NudgingEngine) -> None:
        with self._lock:
            if (
                self._busy.get(id(engine))
                or self._timers.get(id(engine)) is not threading.current_thread()
            ):
                return
            del self._timers[id(engine)]
            # Under the lock: a call that finds the engine now sees it closed and reloads.
            unload(engine, [engine.pair.base, engine.pair.nudging])

    def timers(self) -> int:
        """How many timers are pending (for tests)."""
        with self._lock:
            return len(self._timers)


IDLE = IdleTimers()
