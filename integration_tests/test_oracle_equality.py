"""The library streams what two oracles write, on the bundled pair (greedy, float32, 40 tokens).

* ``independent_nudge`` (oracle.py) implements docs/algorithm.md again, without any code of
  algorithm.py: equality shows that the library implements the rules as documented.
* ``reference_nudge`` (reference.py) runs algorithm.py over uncached sessions: equality shows
  that caching, cache crops and batched verification change nothing.
* The same prompts submitted concurrently to a ``NudgingEngine`` (batched passes) stream the
  texts the oracle writes.

What is compared is the text the library *streamed* (the join of its segments, as a consumer
sees them) and its finish reason, against an oracle's own text and finish reason. Both oracles
re-read the whole prompt for every decision, so each answers half of the ten prompts
(``ORACLE_OF``): the independent one the prompts that exercise the documented rules most
(lists, blank lines, a system turn, a prefilled answer), the reference the ones that exercise
caching most (long and multi-turn prompts, characters split across tokens); tests/test_oracle.py
runs both on every prompt of its set with tiny models. Every answer is computed once (module
fixture ``answers``). A prompt whose answers differ passes
only when the difference is explained by a numeric near-tie: a decision, made before the first
differing character, whose top-2 probability gap is below 1e-4 or whose top-1 probability is
within 1e-4 of gamma. Near-ties are reported (a warning each) and counted: at most
``MAX_NEAR_TIES`` of the prompts may be explained so in one comparison.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import pytest

from langchain_nudging import ChatMessage, NudgingConfig, NudgingPair, NudgingRun
from langchain_nudging.oracle import OracleResult, independent_nudge
from langchain_nudging.prompts import render_prompts
from langchain_nudging.reference import ReferenceModel, reference_nudge
from langchain_nudging.request import Request
from langchain_nudging.serving.engine import NudgingEngine
from langchain_nudging.serving.events import Finished, SegmentEvent

NEAR_TIE = 1e-4
MAX_NEAR_TIES = 2  # of the prompts, in any one comparison
# The fixture answers every prompt with the library and one oracle: about 7 minutes on two
# cores (the oracles re-read the whole prompt for every question).
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
CONFIG = NudgingConfig(max_tokens=40)
INDEPENDENT = ("open", "list", "blank_lines", "system", "prefill")
ORACLE_OF = {name: "independent" if name in INDEPENDENT else "reference" for name in PROMPTS}

Outcome = tuple[str, str | None]  # (text, finish reason)


@dataclass
class Answers:
    """One prompt's answers: the library's stream (one request at a time) and its oracle's."""

    streamed: Outcome
    independent: OracleResult | None = None
    reference: NudgingRun | None = None

    @property
    def oracle(self) -> Outcome:
        if self.independent is not None:
            return self.independent.text, self.independent.finish_reason
        assert self.reference is not None
        return self.reference.text, self.reference.finish_reason

    def ties(self, got: str) -> list[str]:
        """Near-tie decisions the oracle made before ``got`` differs from its text."""
        if self.independent is not None:
            return independent_ties(self.independent, first_difference(got, self.oracle[0]))
        assert self.reference is not None
        return reference_ties(self.reference)


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
def answers(pair: NudgingPair) -> dict[str, Answers]:
    """Every prompt once through the library and its oracle (the tier's cost: printed)."""
    # The bundled pair's models are the transformers backend's (LocalModel.loaded).
    base, nudging = pair.base.loaded, pair.nudging.loaded  # type: ignore[attr-defined]
    refs = ReferenceModel(base), ReferenceModel(nudging)
    out: dict[str, Answers] = {}
    start = time.perf_counter()
    for name, messages in PROMPTS.items():
        clock = time.perf_counter()
        generation = pair.generate(Request(messages, CONFIG))
        answer = Answers(("".join(s.text for s in generation), generation.stats.finish_reason))
        library = time.perf_counter() - clock
        # The prompts, the request's own stop strings and the transcript's turn markers, as
        # render_prompts gives them: the oracles read nothing the algorithm computed.
        prompts = render_prompts(messages, pair.nudging.chat_template, pair.base_format)
        clock = time.perf_counter()
        if ORACLE_OF[name] == "independent":
            answer.independent = independent_nudge(
                base, nudging, prompts.base, prompts.nudging, CONFIG, markers=prompts.stop
            )
        else:
            answer.reference = reference_nudge(
                *refs, prompts.base, prompts.nudging, CONFIG, prompts.stop
            )
        out[name] = answer
        oracle = time.perf_counter() - clock
        print(f"{name}: library {library:.1f}s, {ORACLE_OF[name]} oracle {oracle:.1f}s")
    print(f"all prompts, library and oracles: {time.perf_counter() - start:.0f}s")
    return out


def compare(name: str, got: Outcome, want: Outcome, ties: Iterable[str], what: str) -> bool:
    """Whether ``got`` equals ``want``; a difference explained by a near-tie is reported
    (``False``), any other fails the test."""
    if got == want:
        return True
    at = first_difference(got[0], want[0])
    message = (
        f"{name}: {what} differ at character {at} (finish {got[1]} vs {want[1]}):\n"
        f"expected: {want[0]!r}\ngot:      {got[0]!r}"
    )
    tie = next(iter(ties), None)
    if tie is None:
        pytest.fail(message)
    warnings.warn(f"numeric near-tie ({tie}) explains: {message}", stacklevel=2)
    return False


def check_all(equal: dict[str, bool], oracle: str | None = None) -> None:
    """Every prompt (of ``oracle``'s) compared; at most ``MAX_NEAR_TIES`` differences explained
    by near-ties."""
    assert set(equal) == {n for n in PROMPTS if oracle in (None, ORACLE_OF[n])}
    tied = sorted(name for name, same in equal.items() if not same)
    print(f"equal {len(equal) - len(tied)}/{len(equal)}; near-ties: {tied}")
    assert len(tied) <= MAX_NEAR_TIES, f"too many near-ties to compare: {tied}"


@pytest.mark.parametrize("oracle", ["independent", "reference"])
def test_library_streams_what_the_oracle_writes(answers: dict[str, Answers], oracle: str) -> None:
    equal = {}
    for name, answer in answers.items():
        if ORACLE_OF[name] != oracle:
            continue
        assert answer.streamed[0], f"{name}: empty answer"
        ties = answer.ties(answer.streamed[0])
        equal[name] = compare(name, answer.streamed, answer.oracle, ties, f"library/{oracle}")
    check_all(equal, oracle)


def stream(events: Iterable[Any]) -> tuple[Outcome, Finished]:
    """The text a request's events streamed, its finish reason, and its end."""
    pieces, end = [], None
    for event in events:
        if isinstance(event, SegmentEvent):
            pieces.append(event.segment.text)
        else:
            end = event
    assert isinstance(end, Finished), end
    return ("".join(pieces), end.stats.finish_reason), end


def test_concurrent_requests_stream_what_the_oracle_writes(
    pair: NudgingPair, answers: dict[str, Answers]
) -> None:
    engine = NudgingEngine(pair)
    try:
        clock = time.perf_counter()
        handles = {
            name: engine.submit(Request(messages, CONFIG)) for name, messages in PROMPTS.items()
        }
        streamed = {name: stream(handle) for name, handle in handles.items()}
        print(
            f"{len(handles)} concurrent requests: {time.perf_counter() - clock:.1f}s, "
            f"{engine.batched_passes} passes in {engine.batches} batched calls"
        )
        assert engine.batched_passes > engine.batches  # passes really were batched
    finally:
        engine.shutdown()
    equal = {}
    for name, answer in answers.items():
        got, end = streamed[name]
        assert end.text == got[0], f"{name}: the end's text is not what was streamed"
        equal[name] = compare(name, got, answer.oracle, answer.ties(got[0]), "engine/oracle")
    check_all(equal)
