"""The library writes what two oracles write, on the bundled pair (greedy, float32).

* ``independent_nudge`` (oracle.py) implements docs/algorithm.md again, without any code of
  algorithm.py: equality shows that the library implements the rules as documented.
* ``reference_nudge`` (reference.py) runs algorithm.py over uncached sessions: equality shows
  that caching, cache crops and batched verification change nothing.
* The same prompts submitted concurrently to a ``NudgingEngine`` (batched passes) give the same
  texts as the oracle.

Each answer is computed once (module fixture ``runs``). A prompt may be skipped only when a
divergence is explained by a numeric near-tie: a decision, made before the first differing
character, whose top-2 probability gap is below 1e-4 or whose top-1 probability is within 1e-4
of gamma. Each test compares at least eight prompts itself.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass

import pytest

from langchain_nudging import ChatMessage, NudgingConfig, NudgingPair, NudgingRun
from langchain_nudging.serving.engine import NudgingEngine
from langchain_nudging.oracle import OracleResult, independent_nudge
from langchain_nudging.prompts import render_prompts
from langchain_nudging.reference import ReferenceModel, reference_nudge

NEAR_TIE = 1e-4
MIN_COMPARED = 8
# The first test's setup answers every prompt with the library and both oracles: about 12
# minutes on two cores (the oracles re-read the whole prompt for every question).
pytestmark = pytest.mark.timeout(1800)
U, A, S = "user", "assistant", "system"
PROMPTS: dict[str, list[ChatMessage]] = {
    "open": [ChatMessage(U, "Give me three tips for staying healthy.")],
    "explain": [ChatMessage(U, "Explain to a child what a prime number is.")],
    "list": [ChatMessage(U, "List five red fruits, one per line.")],
    "arithmetic": [
        ChatMessage(
            U,
            "Natalia sold clips to 48 of her friends in April, and then she sold half as many "
            "clips in May. How many clips did Natalia sell altogether in April and May?",
        )
    ],
    "multi_turn": [
        ChatMessage(U, "My name is Ana and I have a grey cat."),
        ChatMessage(A, "Nice to meet you, Ana! Grey cats are lovely."),
        ChatMessage(U, "Suggest three names for my cat and say why."),
    ],
    "non_ascii": [ChatMessage(U, "Écris deux phrases en français sur le café crème à Zürich. ☕")],
    "blank_lines": [
        ChatMessage(U, "Write a short poem about the sea: two stanzas separated by a blank line.")
    ],
    "system": [
        ChatMessage(S, "You are a pirate. Answer like one."),
        ChatMessage(U, "Describe your ship."),
    ],
    "prefill": [
        ChatMessage(U, "Why is the sky blue?"),
        ChatMessage(A, "The sky looks blue because"),
    ],
    "howto": [ChatMessage(U, "How do I make a cup of green tea?")],
}
CONFIG = NudgingConfig(max_tokens=64)


@dataclass
class Runs:
    """One prompt's answers: the library's (one request at a time) and both oracles'."""

    text: str
    finish_reason: str | None
    independent: OracleResult
    reference: NudgingRun
    seconds: dict[str, float]


def near_tie(p1: float, p2: float) -> bool:
    return p1 - p2 < NEAR_TIE or abs(p1 - CONFIG.gamma) < NEAR_TIE


def first_difference(a: str, b: str) -> int:
    return next(
        (i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b))
    )


def independent_ties(result: OracleResult, upto: int) -> list[str]:
    """Near-tie decisions the oracle made while its answer was at most ``upto`` characters."""
    return [
        f"{d.text!r} p1={d.p1:.6f} p2={d.p2:.6f} at char {d.at}"
        for d in result.decisions
        if d.at <= upto and near_tie(d.p1, d.p2)
    ]


def reference_ties(run: NudgingRun) -> list[str]:
    tokens = []
    for round_ in run.trace:
        tokens.extend(round_.draft)
        tokens.extend([round_.boundary] if round_.boundary is not None else [])
        tokens.extend(round_.base_tokens)
    return [f"{t}" for t in tokens if near_tie(t.top1_prob, t.top2_prob)]


@pytest.fixture(scope="module")
def runs(pair: NudgingPair) -> dict[str, Runs]:
    """Every prompt once through the library and both oracles (the tier's cost: printed)."""
    return _run_all(pair)


def _run_all(pair: NudgingPair) -> dict[str, Runs]:
    base, nudging = ReferenceModel(pair.base.loaded), ReferenceModel(pair.nudging.loaded)
    out: dict[str, Runs] = {}
    start = time.perf_counter()
    for name, messages in PROMPTS.items():
        seconds: dict[str, float] = {}
        clock = time.perf_counter()
        generation = pair.generate(messages, CONFIG)
        text = "".join(segment.text for segment in generation)
        seconds["library"] = time.perf_counter() - clock
        # The prompts, the request's own stop strings and the transcript's turn markers, as
        # render_prompts gives them: the oracle reads nothing the algorithm computed.
        prompts = render_prompts(messages, pair.nudging.text.tokenizer, pair.base_format)
        clock = time.perf_counter()
        independent = independent_nudge(
            pair.base.loaded,
            pair.nudging.loaded,
            prompts.base,
            prompts.nudging,
            CONFIG,
            markers=prompts.stop,
        )
        seconds["independent"] = time.perf_counter() - clock
        clock = time.perf_counter()
        reference = reference_nudge(
            base, nudging, prompts.base, prompts.nudging, CONFIG, prompts.stop
        )
        seconds["reference"] = time.perf_counter() - clock
        out[name] = Runs(text, generation.stats.finish_reason, independent, reference, seconds)
        print(f"{name}: " + ", ".join(f"{k} {v:.1f}s" for k, v in seconds.items()))
    print(f"all prompts, library and both oracles: {time.perf_counter() - start:.0f}s")
    return out


def compare(
    name: str,
    got: tuple[str, str | None],
    want: tuple[str, str | None],
    ties: Iterable[str] | None,
    what: str,
) -> str | None:
    """``None`` when equal, a skip reason for a near-tie; fails otherwise."""
    if got == want:
        return None
    at = first_difference(got[0], want[0])
    message = (
        f"{name}: {what} differ at character {at} (finish {got[1]} vs {want[1]}):\n"
        f"expected: {want[0]!r}\ngot:      {got[0]!r}"
    )
    tie = next(iter(ties or ()), None)
    if tie is None:
        pytest.fail(message)
    print(f"SKIPPED {name}: numeric near-tie ({tie}); {message}")
    return f"{name}: near-tie {tie}"


def check_all(outcomes: dict[str, str | None]) -> None:
    compared = [name for name, skip in outcomes.items() if skip is None]
    print(f"compared {len(compared)}/{len(outcomes)}: {compared}")
    assert len(compared) >= MIN_COMPARED, f"only {compared} compared; skipped: {outcomes}"


def test_library_equals_the_independent_oracle(runs: dict[str, Runs]) -> None:
    outcomes = {}
    for name, run in runs.items():
        assert run.text, f"{name}: empty answer"
        want = (run.independent.text, run.independent.finish_reason)
        ties = independent_ties(run.independent, first_difference(run.text, want[0]))
        outcomes[name] = compare(name, (run.text, run.finish_reason), want, ties, "library/oracle")
    check_all(outcomes)


def test_library_equals_the_uncached_reference(runs: dict[str, Runs]) -> None:
    outcomes = {}
    for name, run in runs.items():
        want = (run.reference.text, run.reference.finish_reason)
        ties = reference_ties(run.reference)
        outcomes[name] = compare(
            name, (run.text, run.finish_reason), want, ties, "library/reference"
        )
    check_all(outcomes)


def test_concurrent_requests_write_what_the_oracle_writes(
    pair: NudgingPair, runs: dict[str, Runs]
) -> None:
    engine = NudgingEngine(pair)
    try:
        clock = time.perf_counter()
        handles = {name: engine.submit(messages, CONFIG) for name, messages in PROMPTS.items()}
        finished = {name: handle.result() for name, handle in handles.items()}
        print(
            f"{len(handles)} concurrent requests: {time.perf_counter() - clock:.1f}s, "
            f"{engine.batched_passes} passes in {engine.batches} batched calls"
        )
        assert engine.batched_passes > engine.batches  # passes really were batched
    finally:
        engine.shutdown()
    outcomes = {}
    for name, run in runs.items():
        got = (finished[name].text, finished[name].stats.finish_reason)
        want = (run.independent.text, run.independent.finish_reason)
        ties = independent_ties(run.independent, first_difference(got[0], want[0]))
        outcomes[name] = compare(name, got, want, ties, "engine/oracle")
    check_all(outcomes)
