"""The independent oracle (oracle.py) against the library, on tiny random-weight models.

``independent_nudge`` implements docs/algorithm.md again without any code of algorithm.py;
``NudgingPair.generate`` (cached sessions) must write the same text, the same finish reason
and give every character to the same model. The first tests check the oracle's own helpers
against the doc's examples.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import pytest

from langchain_nudging import ChatMessage, NudgingConfig, NudgingPair
from langchain_nudging.backends.hf import TokenizerText
from langchain_nudging.backends.local import LocalModel
from langchain_nudging.oracle import (
    BASE,
    NUDGE,
    OracleResult,
    Tok,
    _Answer,
    agreement,
    completes_stop,
    doubled_suffix,
    draft_words,
    independent_nudge,
    label_offset,
    repetition_end,
    second_copy_start,
    stop_prefix_held,
    window_end,
)
from langchain_nudging.prompts import BasePromptFormat, render_prompts
from langchain_nudging.request import Request

U, A, S = "user", "assistant", "system"

# --- the helpers against the doc ---------------------------------------------------------------


def t(text: str, p1: float = 0.9, *, eos: bool = False, open_char: bool = False) -> Tok:
    return Tok(0, text, p1, min(p1, 1 - p1), eos, open_char)


@pytest.mark.parametrize(
    ("draft", "lead", "words"),
    [
        ("Hello big world", "", ["Hello", "big", "world"]),
        ("  Hello world", "  ", ["Hello", "world"]),  # leading spaces set aside
        ("Hi  there", "", ["Hi", "", "there"]),  # two spaces: an empty word
        ("one\ntwo three", "", ["one\ntwo", "three"]),  # newlines are not separators
        ("", "", [""]),
    ],
)
def test_draft_words(draft: str, lead: str, words: list[str]) -> None:
    assert draft_words(draft) == (lead, words)


@pytest.mark.parametrize(
    ("tok", "word", "agrees"),
    [
        (t(" sky", 0.01), "sky", True),
        (t(" s", 0.01), "sky", True),
        (t(" skyline"), "sky", False),
        (t("sky"), "sky", False),
        (t(""), "sky", False),  # an empty token never agrees
        (t("", eos=True), "sky", False),
    ],
)
def test_agreement(tok: Tok, word: str, agrees: bool) -> None:
    assert agreement(tok, word) is agrees


def test_window_ends_at_eos_and_unsure_tokens_which_are_not_taken() -> None:
    assert window_end([t("a"), t("", eos=True)], 5) == (1, "eos")
    assert window_end([t("a"), t("b", 0.2)], 5, gamma=0.4) == (1, "unsure")
    # The boundary token starts the first window whatever its probability.
    assert window_end([t("a", 0.1), t("b", 0.2)], 5, gamma=0.4, forced=1) == (1, "unsure")
    assert window_end([t("a"), t("b")], 2) == (2, "full")
    assert window_end([t("a")], 2) is None


def test_window_goes_on_until_the_character_is_complete_at_most_three_tokens() -> None:
    # Rule 7: the doc's ☕ written as 3 tokens.
    coffee = [t("", open_char=True), t("", open_char=True), t("☕"), t("x")]
    assert window_end(coffee, 1) == (3, "full")
    assert window_end([t("", open_char=True)] * 6, 2) == (5, "full")  # 2 + 3 at most
    # The stop at an unsure token still applies within those tokens.
    assert window_end([t("", open_char=True), t("☕", 0.1)], 1, gamma=0.4) == (1, "unsure")


def test_window_ends_after_the_token_completing_a_stop_string() -> None:
    toks = [t(" Th"), t("e e"), t("nd"), t(" x")]
    assert window_end(toks, 9, stops=["e end"], answer="") == (3, "stop")
    # An occurrence ending inside the answer does not count; one spanning both does.
    assert completes_stop("the end", " x", ["end"]) is False
    assert completes_stop("the e", "nd", ["end"]) is True


@pytest.mark.parametrize(
    ("text", "min_chars", "length"),
    [
        ("x" + "abc" * 2, 3, 3),
        ("x" + "abc" * 2, 4, 0),
        ("x" + "abcd" * 4, 4, 8),  # the longest doubled suffix
        ("abab", 1, 2),
    ],
)
def test_doubled_suffix(text: str, min_chars: int, length: int) -> None:
    assert doubled_suffix(text, min_chars) == length


def test_repetition_cut_removes_second_copies_never_before_the_segment_start() -> None:
    y = "The quick brown fox jumps over. "  # 32 characters
    assert repetition_end("x" + y + y, 0, 30) == 1 + len(y)
    assert repetition_end("x" + y * 3, 0, 30) == 1 + len(y)
    assert repetition_end("x" + y + y, 1 + len(y) + 5, 30) == 1 + len(y) + 5
    assert repetition_end("x" + y[:20] * 2, 0, 30) == 41  # shorter than min_repeat_chars


def test_a_second_copy_may_start_where_a_suffix_occurred_far_enough_back() -> None:
    assert second_copy_start("abcdefghij abc", 4) == 11  # "abc" occurs 11 characters back
    assert second_copy_start("abcdefghij abc", 12) == 14  # not that far back: none
    assert second_copy_start("a" * 10, 3) == 3


def test_held_tail_is_the_longest_possible_stop_string_start() -> None:
    assert stop_prefix_held("so\nQues", ["\nQuestion:", "\nAnswer:"]) == 5
    assert stop_prefix_held("so\n", ["\nQuestion:", "\nAnswer:"]) == 1
    assert stop_prefix_held("so", ["\nQuestion:"]) == 0
    assert label_offset("\nQuestion:") == 1
    assert label_offset("Q:") == 0


class _Counts:
    """A stand-in for the base tokenizer: one token per character."""

    class text:  # noqa: N801 - mimics _Lm.text
        @staticmethod
        def count(s: str) -> int:
            return len(s)

        @staticmethod
        def truncate(s: str, n: int) -> str:
            return s[:n]


def answer_of(
    mode: str = "nudged",
    judge: Callable[[str, str], bool] = lambda before, marker: False,
    **config: Any,
) -> _Answer:
    markers = ("\nQuestion:", "\nAnswer:")
    return _Answer(NudgingConfig(**config), markers, mode, _Counts(), judge)  # type: ignore[arg-type]


def test_answer_cuts_a_stop_string_spanning_segments_and_holds_its_start() -> None:
    answer = answer_of(stop=("END",), max_tokens=100)
    answer.add("one E", NUDGE)
    assert "".join(s for s, _ in answer.stream) == "one "  # "E" may start "END"
    answer.add("ND x", BASE)
    assert (answer.text, answer.reason) == ("one ", "stop")
    answer = answer_of(stop=("END",), max_tokens=100)
    answer.add("one E", NUDGE)
    answer.add("ar", BASE)
    answer.end("stop")
    assert answer.stream == [("one ", NUDGE), ("E", NUDGE), ("ar", BASE)]


def test_a_window_streams_what_no_rule_can_take_back_before_it_ends() -> None:
    answer = answer_of(stop=("END",), max_tokens=16, min_repeat_chars=4)  # a token a character
    answer.add("one", NUDGE)
    answer.show(" two E", BASE)  # "E" may start "END"
    answer.show(" two EN", BASE)
    assert "".join(s for s, _ in answer.stream) == "one two "
    answer.show(" two ENx one", BASE)  # "one" may start a second copy of "one ..."
    assert "".join(s for s, _ in answer.stream) == "one two ENx "
    answer.show(" two ENx one ab", BASE)  # 18 tokens: past the cap, the cut decides
    assert "".join(s for s, _ in answer.stream) == "one two ENx "
    answer.add(" two ENx one ab", BASE)
    assert (answer.text, answer.reason) == ("one two ENx one ", "length")


def test_answer_cuts_never_reach_text_a_window_streamed() -> None:
    # Two second copies in one window ("xyzabc", then "abc"): the first was streamed while
    # "abc" was repeated, so only the second is cut (docs/algorithm.md, "Streaming").
    answer = answer_of(min_repeat_chars=3, max_tokens=100)
    answer.add("0", NUDGE)
    window = "xyzabcxyzabcabc"
    for k in range(1, len(window) + 1):
        answer.show(window[:k], BASE)
    answer.add(window, BASE)
    assert (answer.text, answer.reason) == ("0xyzabcxyzabc", "repetition")


def test_answer_without_repetition_stops_keeps_repeats() -> None:
    y = "The quick brown fox jumps over. "
    answer = answer_of(max_tokens=1000, repetition_stops=False)
    answer.show(y + y[:10], BASE)
    answer.add(y + y, BASE)
    assert (answer.text, answer.reason) == (y + y, None)
    assert "".join(s for s, _ in answer.stream) == y + y


def test_answer_max_tokens_cut_exactly() -> None:
    answer = answer_of(max_tokens=6)
    answer.add("abc", NUDGE)
    answer.add("defgh", BASE)
    assert (answer.text, answer.sources, answer.reason) == ("abcdef", "nnnbbb", "length")


def test_answer_repetition_never_cuts_earlier_segments() -> None:
    y = "The quick brown fox jumps over. "
    answer = answer_of(max_tokens=1000)
    answer.add("x" + y, NUDGE)
    answer.add(y[:10], BASE)
    answer.add(y[10:], BASE)
    assert (answer.text, answer.reason) == ("x" + y + y[:10], "repetition")


def test_markers_end_the_answer_only_where_the_base_model_starts_a_turn() -> None:
    asked: list[str] = []

    def judge(before: str, marker: str) -> bool:
        asked.append(before)
        return before.endswith("quiz")  # the nudging model would write the marker itself

    answer = answer_of(judge=judge, max_tokens=1000)
    answer.add("a\nQuestion: one", NUDGE)  # label written by the nudging model: content
    answer.add(" quiz\nQuestion: two", BASE)  # the nudging model would write it: content
    answer.add(" more", NUDGE)
    assert answer.reason is None
    assert asked == ["a\nQuestion: one quiz"]
    answer.add(" ok\nAnswer: x", BASE)  # the base model starts a turn
    assert (answer.text, answer.reason) == ("a\nQuestion: one quiz\nQuestion: two more ok", "stop")
    assert len(asked) == 2  # each occurrence judged once
    base = answer_of("base", max_tokens=1000)
    base.add("a\nAnswer: b", BASE)
    assert (base.text, base.reason) == ("a", "stop")
    solo = answer_of("nudging", max_tokens=1000)
    solo.add("a\nAnswer: b", NUDGE)
    assert solo.reason is None


# --- the oracle against the library on tiny models ---------------------------------------------


@pytest.fixture(scope="module")
def pair(llama_a: Any, gemma_b: Any) -> NudgingPair:
    # Two tokenizers: byte-level base, byte-fallback chat.
    return NudgingPair(LocalModel(llama_a), LocalModel(gemma_b))


@pytest.fixture(scope="module")
def same_tokenizer_pair(llama_b: Any, gemma_b: Any) -> NudgingPair:
    return NudgingPair(LocalModel(llama_b), LocalModel(gemma_b))


CONVERSATIONS: dict[str, list[ChatMessage]] = {
    "capital": [ChatMessage(U, "What is the capital of France?")],
    "steps": [
        ChatMessage(S, "Answer the question by walking through the reasoning steps."),
        ChatMessage(U, "First, we add two and three to get five. Then?"),
    ],
    "multi_turn": [
        ChatMessage(U, "Write a short poem about the sea."),
        ChatMessage(A, "The sea and the sky."),
        ChatMessage(U, "Now one about the Moon, step by step."),
    ],
    "unicode": [
        ChatMessage(U, "Café, naïve, 日本語 ☕ 🙂 Привет? “quotes” €5"),
        ChatMessage(A, "東京 🚀 Zürich"),
    ],
    "prefill": [ChatMessage(U, "Let me think."), ChatMessage(A, "The answer is 42, because")],
    "answer_prefill": [ChatMessage(U, "What is the capital?"), ChatMessage(A, "The Answer")],
}


def library(
    pair: NudgingPair,
    messages: Sequence[ChatMessage],
    config: NudgingConfig,
    mode: str = "nudged",
    fmt: BasePromptFormat | None = None,
) -> tuple[str, str | None, str, Any]:
    generation = pair.generate(Request(messages, config, mode, base_format=fmt))  # type: ignore[arg-type]
    segments = list(generation)
    text = "".join(s.text for s in segments)
    sources = "".join((BASE if s.source == "base" else NUDGE) * len(s.text) for s in segments)
    return text, generation.stats.finish_reason, sources, generation


def oracle(
    pair: NudgingPair,
    messages: Sequence[ChatMessage],
    config: NudgingConfig,
    mode: str = "nudged",
    fmt: BasePromptFormat | None = None,
) -> OracleResult:
    prompts = render_prompts(messages, pair.nudging.chat_template, fmt or pair.base_format)
    result = independent_nudge(
        pair.base.loaded,
        pair.nudging.loaded,
        prompts.base,
        prompts.nudging,
        config,
        mode,  # type: ignore[arg-type]
        markers=prompts.stop,
    )
    assert "".join(piece for piece, _ in result.stream) == result.text
    assert len(result.sources) == len(result.text)
    return result


def assert_equal(
    pair: NudgingPair,
    messages: Sequence[ChatMessage],
    config: NudgingConfig,
    mode: str = "nudged",
    fmt: BasePromptFormat | None = None,
) -> OracleResult:
    want = oracle(pair, messages, config, mode, fmt)
    text, reason, sources, generation = library(pair, messages, config, mode, fmt)
    assert text == want.text, f"library: {text!r}\noracle:  {want.text!r}"
    assert reason == want.finish_reason
    # Streamed as early: wherever the oracle's stream breaks (text released, or the other
    # model's text starting), the library's does too.
    assert ends(piece for piece, _ in want.stream) <= ends(s.text for s in generation.segments)
    assert sources == want.sources, "a character attributed to the other model"
    return want


def ends(pieces: Iterable[str]) -> set[int]:
    """Where each streamed piece ends, in characters of the answer."""
    return set(itertools.accumulate(len(piece) for piece in pieces))


LOOPS = {"min_repeat_chars": 1000, "max_same_nudges": 100}
CASES: list[tuple[str, dict[str, Any], str]] = [
    ("capital", {"max_tokens": 48}, "nudged"),
    ("steps", {"draft_tokens": 1, "chunk_tokens": 1, "max_tokens": 40}, "nudged"),
    ("multi_turn", {"draft_tokens": 2, "chunk_tokens": 3, "gamma": 0.3}, "nudged"),
    ("unicode", {"draft_tokens": 3, "chunk_tokens": 2, "gamma": 0.55}, "nudged"),
    ("unicode", {"draft_tokens": 1, "chunk_tokens": 1, "gamma": 0.7}, "nudged"),
    ("prefill", {"gamma": 0.0}, "nudged"),  # the base model is always confident
    ("capital", {"gamma": 1.0, "draft_tokens": 5}, "nudged"),  # only agreement hands over
    ("steps", {"max_tokens": 5}, "nudged"),
    ("unicode", {"max_tokens": 1}, "nudged"),
    (
        "multi_turn",
        {"min_repeat_chars": 4, "max_same_nudges": 1, "loop_passage_words": 1},
        "nudged",
    ),
    ("prefill", {"max_rounds": 3, "draft_tokens": 2}, "nudged"),
    # No repetition stop: the loop breakers and budget-capped windows decide these.
    ("capital", {**LOOPS, "gamma": 0.2, "chunk_tokens": 4}, "nudged"),
    ("multi_turn", {**LOOPS, "gamma": 0.2, "max_tokens": 20}, "nudged"),
    ("unicode", {"chunk_tokens": 2}, "base"),
    ("capital", {"chunk_tokens": 1, "max_tokens": 20}, "base"),
    ("unicode", {"chunk_tokens": 1}, "nudging"),
    ("multi_turn", {"chunk_tokens": 5, "max_tokens": 30}, "nudging"),
]


@pytest.mark.parametrize(("name", "options", "mode"), CASES)
def test_library_writes_what_the_independent_oracle_writes(
    pair: NudgingPair, name: str, options: dict[str, Any], mode: str
) -> None:
    config = NudgingConfig(**{"max_tokens": 64, **options})
    assert_equal(pair, CONVERSATIONS[name], config, mode)


def test_same_tokenizer_pair(same_tokenizer_pair: NudgingPair) -> None:
    config = NudgingConfig(max_tokens=48, draft_tokens=4, chunk_tokens=3)
    for name in ("capital", "unicode"):
        assert_equal(same_tokenizer_pair, CONVERSATIONS[name], config)


@pytest.mark.parametrize("mode", ["nudged", "base", "nudging"])
def test_stop_strings_taken_from_the_middle_of_an_answer(pair: NudgingPair, mode: str) -> None:
    messages = CONVERSATIONS["steps"]
    free = oracle(pair, messages, NudgingConfig(max_tokens=48), mode)
    middle = len(free.text) // 2
    stop = free.text[middle : middle + 2]
    assert stop.strip(), f"no stop string to take from {free.text!r}"
    result = assert_equal(pair, messages, NudgingConfig(max_tokens=48, stop=(stop, "zzq")), mode)
    assert result.finish_reason == "stop"
    assert stop not in result.text


# --- scripted models: rule 7 (whole characters) and rule 8 (turn markers) ----------------------


def ids(pair_model: Any, text: str) -> list[int]:
    return TokenizerText(pair_model.loaded.tokenizer).encode_plain(text)


def coffee_script(model: Any, after: str) -> dict[int, int]:
    """A bigram script making ``model`` write ``☕`` (several byte tokens) after ``after``."""
    last = ids(model, after)[-1]
    coffee = [i for i in ids(model, "x☕") if i not in ids(model, "x")]
    assert len(coffee) >= 3, "☕ must take several tokens for this test"
    chain = [last, *coffee]
    return dict(itertools.pairwise(chain))


@pytest.mark.parametrize(
    ("options", "mode", "scripted"),
    [
        ({"draft_tokens": 1, "chunk_tokens": 1}, "nudged", "nudging"),
        ({"draft_tokens": 2, "chunk_tokens": 1}, "nudged", "base"),
        ({"chunk_tokens": 1}, "base", "base"),
        ({"chunk_tokens": 1}, "nudging", "nudging"),
    ],
)
def test_a_draft_or_window_never_ends_inside_a_character(
    pair: NudgingPair,
    forced_next: Callable[..., Any],
    options: dict[str, Any],
    mode: str,
    scripted: str,
) -> None:
    messages = [ChatMessage(U, "Write about the sea."), ChatMessage(A, "The sea")]
    model = pair.nudging if scripted == "nudging" else pair.base
    config = NudgingConfig(max_tokens=24, **options)
    with forced_next(model.loaded, coffee_script(model, "The sea")):
        result = assert_equal(pair, messages, config, mode)
    assert "☕" in result.text
    # A window of one token (or a one-token draft) carried on past a partial character.
    assert any(d.open_char for d in result.decisions)


def marker_script(model: Any, after: str, text: str) -> dict[int, int]:
    """A bigram script making ``model`` write ``text`` after the text ``after``."""
    chain = ids(model, after + text)
    start = len(ids(model, after)) - 1
    assert chain[: start + 1] == ids(model, after)
    return dict(itertools.pairwise(chain[start:]))


@pytest.mark.parametrize(
    ("conversation", "mode", "nudging_too", "verdict"),
    [
        ("unicode", "nudged", False, "turn"),
        ("multi_turn", "nudged", False, "turn"),
        ("unicode", "nudged", True, "content"),
        ("prefill", "nudged", True, "content"),
        ("capital", "nudged", True, "nudge-written"),
        ("answer_prefill", "base", False, "turn"),
        ("unicode", "nudging", True, None),
    ],
)
def test_turn_markers_end_the_answer_only_where_the_base_model_starts_a_turn(
    pair: NudgingPair,
    forced_next: Callable[..., Any],
    conversation: str,
    mode: str,
    nudging_too: bool,
    verdict: str | None,
) -> None:
    """The base model writes " step\nQuestion:" after " Answer"; with ``nudging_too`` the
    nudging model writes "\nQuestion:" after " step", so where the base model wrote the label
    the occurrence is content (rule 8)."""
    messages = CONVERSATIONS[conversation]
    config = NudgingConfig(max_tokens=40, draft_tokens=3, chunk_tokens=4)
    with contextlib.ExitStack() as scripts:
        scripts.enter_context(
            forced_next(pair.base.loaded, marker_script(pair.base, " Answer", " step\nQuestion:"))
        )
        if nudging_too:
            script = marker_script(pair.nudging, " step", "\nQuestion:")
            scripts.enter_context(forced_next(pair.nudging.loaded, script))
        result = assert_equal(pair, messages, config, mode)
    verdicts = {v for _, _, v in result.verdicts}
    if verdict is None:
        assert not verdicts
    else:
        assert verdict in verdicts, result
    if verdict == "turn":
        assert result.finish_reason == "stop"
        assert "\nQuestion:" not in result.text
    if verdict == "content":
        assert "\nQuestion:" in result.text
