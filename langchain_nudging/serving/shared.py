"""Engines that outlive their callers: one per pair of text models.

Every caller of one pair of :class:`~langchain_nudging.backends.base.TextModel` objects (chat
model instances naming the same models, the CLI, the evaluation runner) shares one engine, so
their requests batch together.
"""

from __future__ import annotations

import threading

from ..backends.base import TextModel
from .engine import NudgingEngine
from .generation import NudgingPair

_SHARED: dict[tuple[int, int], NudgingEngine] = {}
_SHARED_LOCK = threading.Lock()


def shared_engine(base: TextModel, nudging: TextModel) -> NudgingEngine:
    """The process-wide engine of a pair of text models: every caller of one pair shares it.

    The model factory gives the same text model for the same spec and options, so callers
    asking for the same models get the same engine. The engine keeps its models alive until
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


def engine_of(base: TextModel, nudging: TextModel) -> NudgingEngine | None:
    """The shared engine of this pair, if one was made (nothing is made here)."""
    with _SHARED_LOCK:
        return _SHARED.get((id(base), id(nudging)))


def forget_engine(engine: NudgingEngine | None) -> list[TextModel]:
    """Take ``engine`` out of the shared engines (without shutting it down); returns the text
    models the other open shared engines still use."""
    with _SHARED_LOCK:
        for key, held in list(_SHARED.items()):
            if held is engine:
                del _SHARED[key]
        return [
            model
            for other in _SHARED.values()
            if not other.closed
            for model in (other.pair.base, other.pair.nudging)
        ]
