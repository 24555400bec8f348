"""Which waiting works run together next: the engine's batch rule, as a pure function.

docs/concurrency.md ("Which batch") states the rule; the engine applies it to the works its
requests are waiting for.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass

MAX_SKIPS = 16  # batches a waiting work may be passed over before its group goes next


@dataclass(frozen=True, slots=True)
class Waiting:
    """What the rule reads of one waiting work.

    ``key``: works with equal keys may run as one call (one runner, one group); ``first``:
    a session's first work (reading its prompt); ``skipped``: batches run while it waited.
    """

    key: Hashable
    first: bool
    skipped: int = 0


def choose_batch(
    waiting: Sequence[Waiting], max_batch: int, max_skips: int = MAX_SKIPS
) -> list[int]:
    """The indices, in arrival order, of the works to run together next (up to ``max_batch``
    of one key; none only when nothing waits).

    ``waiting`` is in arrival order. A work passed over ``max_skips`` times takes its group
    next, so none starves. Otherwise a group holding a session's first work goes ahead (a new
    request's first text does not wait behind others' steps), and among those (or among all
    groups, when none holds one) the largest, the earliest on a tie, so requests in the same
    phase keep stepping together. Within a group the oldest works go first.
    """
    groups: dict[Hashable, list[int]] = {}
    for index, work in enumerate(waiting):
        groups.setdefault(work.key, []).append(index)
    if not groups:
        return []
    oldest = waiting[0]
    if oldest.skipped >= max_skips:
        return groups[oldest.key][:max_batch]
    firsts = [group for group in groups.values() if any(waiting[i].first for i in group)]
    return max(firsts or groups.values(), key=len)[:max_batch]
