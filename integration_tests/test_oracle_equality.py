"""The cached implementation writes exactly what the uncached oracle writes (greedy, float32).

A prompt may be skipped only when the two runs diverge at a numeric near-tie: a decision whose
top-2 probability gap is below 1e-4, or whose top-1 probability is within 1e-4 of gamma. At
least eight prompts must be compared.
"""

from __future__ import annotations

import pytest

from langchain_nudging import ChatMessage, NudgingConfig, NudgingPair, NudgingRun
from langchain_nudging.backends.base import Token
from langchain_nudging.reference import ReferenceModel, reference_nudge

NEAR_TIE = 1e-4
MIN_COMPARED = 8
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
compared: list[str] = []


def decisions(run: NudgingRun) -> list[Token]:
    out: list[Token] = []
    for round_ in run.trace:
        out.extend(round_.draft)
        if round_.boundary is not None:
            out.append(round_.boundary)
        out.extend(round_.base_tokens)
    return out


def near_tie(token: Token, gamma: float) -> bool:
    return token.top1_prob - token.top2_prob < NEAR_TIE or abs(token.top1_prob - gamma) < NEAR_TIE


@pytest.fixture(scope="module")
def oracle(pair: NudgingPair) -> tuple[ReferenceModel, ReferenceModel]:
    return ReferenceModel(pair.base.loaded), ReferenceModel(pair.nudging.loaded)


@pytest.mark.parametrize("name", list(PROMPTS))
def test_engine_equals_oracle(
    name: str, pair: NudgingPair, oracle: tuple[ReferenceModel, ReferenceModel]
) -> None:
    generation = pair.generate(PROMPTS[name], CONFIG)
    streamed = "".join(segment.text for segment in generation)
    assert streamed == generation.text
    assert generation.stats.base_tokens + generation.stats.nudge_tokens > 0
    expected = reference_nudge(
        *oracle, generation.prompts.base, generation.prompts.nudging, generation.config
    )
    if expected.text != streamed:
        at = next(
            (i for i, (a, b) in enumerate(zip(expected.text, streamed, strict=False)) if a != b),
            min(len(expected.text), len(streamed)),
        )
        ties = [t for t in decisions(expected) if near_tie(t, CONFIG.gamma)]
        message = (
            f"{name}: engine and oracle diverge at character {at}:\n"
            f"oracle: {expected.text!r}\nengine: {streamed!r}"
        )
        if ties:
            print(f"SKIPPED {name}: numeric near-tie ({ties[0]}); {message}")
            pytest.skip(f"numeric near-tie in {name}: {ties[0]}")
        pytest.fail(message)
    assert expected.finish_reason == generation.stats.finish_reason
    print(f"{name}: equal ({len(streamed)} chars, {generation.stats.nudged_share:.0%} nudged)")
    compared.append(name)


def test_enough_prompts_compared() -> None:
    assert len(compared) >= MIN_COMPARED, f"only {compared} were compared"
