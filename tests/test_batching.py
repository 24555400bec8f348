"""The batch rule (serving/batching.py), without models: which waiting works run together."""

from __future__ import annotations

from langchain_nudging.serving.batching import MAX_SKIPS, Waiting, choose_batch

STEP, VERIFY = ("base", 0), ("base", 1)  # one runner's keys: one-token steps, 2-16 ids
DRAFT, PROMPT = ("nudging", 0), ("nudging", 2)


def test_nothing_waiting_takes_nothing() -> None:
    assert choose_batch([], max_batch=16) == []


def test_the_largest_group_goes_first_in_arrival_order() -> None:
    waiting = [
        Waiting(VERIFY, first=False),
        Waiting(STEP, first=False),
        Waiting(DRAFT, first=False),
        Waiting(STEP, first=False),
        Waiting(STEP, first=False),
        Waiting(VERIFY, first=False),
    ]
    assert choose_batch(waiting, max_batch=16) == [1, 3, 4]


def test_a_tie_goes_to_the_group_that_arrived_first() -> None:
    waiting = [Waiting(DRAFT, False), Waiting(STEP, False), Waiting(STEP, False)]
    waiting.append(Waiting(DRAFT, False))
    assert choose_batch(waiting, max_batch=16) == [0, 3]


def test_a_new_requests_prompt_pass_goes_ahead_of_steps() -> None:
    """Three running requests' one-token steps make the largest group; the prompt pass of a
    request that just arrived still runs first, so its first text does not wait for them."""
    waiting = [Waiting(DRAFT, False), Waiting(DRAFT, False), Waiting(DRAFT, False)]
    waiting.append(Waiting(PROMPT, first=True))
    assert choose_batch(waiting, max_batch=16) == [3]
    assert choose_batch(waiting[:3], max_batch=16) == [0, 1, 2]


def test_among_groups_holding_a_first_pass_the_largest_goes() -> None:
    waiting = [
        Waiting(PROMPT, first=True),
        Waiting(STEP, first=False),
        Waiting(VERIFY, first=True),
        Waiting(VERIFY, first=False),
        Waiting(STEP, first=False),
        Waiting(STEP, first=False),
    ]
    assert choose_batch(waiting, max_batch=16) == [2, 3]


def test_at_most_max_batch_the_oldest_first() -> None:
    waiting = [Waiting(STEP, False) for _ in range(5)]
    assert choose_batch(waiting, max_batch=3) == [0, 1, 2]
    assert choose_batch(waiting, max_batch=1) == [0]


def test_a_work_passed_over_max_skips_times_takes_its_group_next() -> None:
    """The oldest work's group goes next once it has been skipped MAX_SKIPS times, whatever is
    larger or holds a first pass; before that, it waits."""
    crowd = [Waiting(STEP, False) for _ in range(4)] + [Waiting(PROMPT, first=True)]
    for skipped, taken in ((MAX_SKIPS - 1, [5]), (MAX_SKIPS, [0, 6])):
        waiting = [Waiting(DRAFT, False, skipped), *crowd, Waiting(DRAFT, False, 0)]
        assert choose_batch(waiting, max_batch=16) == taken
    assert choose_batch([Waiting(DRAFT, False, 2), *crowd], max_batch=16, max_skips=2) == [0]


def test_a_lone_work_beside_a_busy_group_is_taken_after_max_skips_batches() -> None:
    """Replaying the engine's loop (taken works leave, the others count a skip) while a busy
    group always has more than a batch waiting: the lone work goes after MAX_SKIPS batches."""
    queue = [Waiting(DRAFT, False), *(Waiting(STEP, False) for _ in range(3))]
    for batch in range(MAX_SKIPS + 1):
        taken = choose_batch(queue, max_batch=2)
        if batch < MAX_SKIPS:
            assert [queue[i].key for i in taken] == [STEP, STEP]
        else:
            assert [queue[i].key for i in taken] == [DRAFT]
        queue = [
            Waiting(work.key, work.first, work.skipped + 1)
            for index, work in enumerate(queue)
            if index not in taken
        ]
        queue += [Waiting(STEP, False), Waiting(STEP, False)]
