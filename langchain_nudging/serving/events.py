"""What a request's consumer reads: its segments as they are decided, then one end.

The events are the only channel from a request's thread to its consumer: a consumer (the CLI,
the evaluation runner, the chat model) never reads the generation the thread is writing.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..algorithm import Segment
from .generation import GenerationStats


@dataclass(frozen=True, slots=True)
class SegmentEvent:
    """A piece of the answer, as decided."""

    segment: Segment


@dataclass(frozen=True, slots=True)
class Finished:
    """The request ended: the whole answer, its segments and what it cost.

    ``stats.finish_reason`` is ``"cancelled"`` after a cancel; the request's thread no longer
    writes ``stats`` once this is pushed.
    """

    text: str
    segments: tuple[Segment, ...]
    stats: GenerationStats


@dataclass(frozen=True, slots=True)
class Failed:
    """The request failed; ``error`` is what it raised."""

    error: BaseException


Event = SegmentEvent | Finished | Failed
