"""The nudging loop (docs/algorithm.md), driven by scripted text models.

The scripted models answer every question as a fixed function of the answer text, so each
test states exactly where the base model agrees, is confident or is unsure, and what the
nudging model drafts. Their tokenizer is one token per word piece (leading whitespace plus a
run of non-space characters), used for ``max_tokens``.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from langchain_nudging.algorithm import (
    AnswerWriter,
    NudgingRun,
    Segment,
    SoloRun,
    agrees,
    copy_in_progress,
    repeated_suffix_length,
    split_draft,
)
from langchain_nudging.backends.base import ContextWindowError, Token
from langchain_nudging.config import NudgingConfig, confident

SURE = 0.9
EOS_MARK = "<eos>"  # ends a scripted draft with the nudging model's end-of-sequence token


def pieces(text: str) -> list[str]:
    """The scripted tokenizer: leading whitespace plus a run of non-space characters."""
    return re.findall(r"\s*\S+|\s+", text)


def count_pieces(text: str) -> int:
    return len(pieces(text))


def truncate_pieces(text: str, max_tokens: int) -> str:
    return "".join(pieces(text)[:max_tokens])


def tok(text: str, p: float = SURE) -> Token:
    return Token(text, p, min(p, 1.0 - p))


def eos(p: float = SURE) -> Token:
    return Token("", p, min(p, 1.0 - p), is_eos=True)


LOST = tok(" ?", 0.1)  # what the base says where it has no script: unsure, agrees with nothing


def script(start: str, *tokens: Token) -> dict[str, Token]:
    """Base rules writing ``tokens`` one after another from the answer ``start``."""
    rules, answer = {}, start
    for token in tokens:
        rules[answer] = token
        answer += token.text
    return rules


def follows(target: str, end: Token | None = None) -> Callable[[str], Token]:
    """A base that knows ``target``: on any prefix of it, it writes the rest of the piece."""
    end = end or eos()

    def rule(answer: str) -> Token:
        if not target.startswith(answer):
            return LOST
        if answer == target:
            return end
        pos = 0
        for piece in pieces(target):
            if pos + len(piece) > len(answer):
                return tok(piece[len(answer) - pos :])
            pos += len(piece)
        raise AssertionError("unreachable")

    return rule


def ends_with_stop(answer: str, text: str, stop: Sequence[str]) -> bool:
    """``text`` (``answer`` and what followed) has a stop string ending after ``answer``, and
    its last token completed it (no earlier one)."""
    return any(s in text[max(0, len(answer) - len(s) + 1) :] for s in stop)


class ScriptedBase:
    """A base-model :class:`TextSession` whose next token is a function of the answer.

    ``log`` records, in order, each token as a window yields it (``("token", text)``); a
    test may append what it receives to the same list to see when text was streamed.
    """

    def __init__(
        self,
        rules: Mapping[str, Token] | None = None,
        fallback: Callable[[str], Token] | None = None,
    ) -> None:
        self.rules = dict(rules or {})
        self.fallback = fallback
        self.calls: list[tuple[Any, ...]] = []
        self.log: list[tuple[str, str]] = []

    def next_token(self, answer: str) -> Token:
        if answer in self.rules:
            return self.rules[answer]
        return self.fallback(answer) if self.fallback is not None else LOST

    def peek(self, answer: str) -> Token:
        self.calls.append(("peek", answer))
        return self.next_token(answer)

    def peek_each(self, answers: Sequence[str]) -> Iterator[Token]:
        for answer in answers:  # one by one, as far as the caller reads
            yield self.peek(answer)

    def generate(
        self,
        answer: str,
        max_new_tokens: int,
        *,
        min_prob: float | None = None,
        first: Token | None = None,
        stop: Sequence[str] = (),
    ) -> Iterator[Token]:
        assert max_new_tokens >= 1
        if first is not None:  # the contract: ``first`` is this session's peek of ``answer``
            assert self.calls, "generate(first=...) before any peek"
            assert self.calls[-1] == ("peek", answer), self.calls[-1]
            assert first == self.next_token(answer)
        self.calls.append(("generate", answer, max_new_tokens, min_prob, first))
        return self._window(answer, max_new_tokens, min_prob, first, stop)

    def _window(
        self,
        answer: str,
        max_new_tokens: int,
        min_prob: float | None,
        first: Token | None,
        stop: Sequence[str],
    ) -> Iterator[Token]:
        """The window's tokens, each decided only when the caller asks for it."""
        text = answer
        for k in range(max_new_tokens):
            given = k == 0 and first is not None
            token = first if given else self.next_token(text)
            assert token is not None
            self.log.append(("token", token.text))
            yield token
            if token.is_eos:
                return
            if min_prob is not None and not confident(token.top1_prob, min_prob) and not given:
                return
            text += token.text
            if ends_with_stop(answer, text, stop):
                return

    def count_tokens(self, text: str) -> int:
        return count_pieces(text)

    def truncate_tokens(self, text: str, max_tokens: int) -> str:
        return truncate_pieces(text, max_tokens)

    def close(self) -> None:
        pass

    @property
    def peeks(self) -> list[str]:
        return [call[1] for call in self.calls if call[0] == "peek"]

    @property
    def generates(self) -> list[tuple[Any, ...]]:
        return [call[1:] for call in self.calls if call[0] == "generate"]


Draft = str | Sequence[str]


class ScriptedNudge:
    """A nudging-model :class:`TextSession` drafting from a script keyed by the answer.

    A draft is a string (split into word pieces) or a list of token texts; ``EOS_MARK`` at
    its end (or as a list item) is the end-of-sequence token.
    """

    def __init__(self, drafts: Mapping[str, Draft] | Callable[[str], Draft]) -> None:
        self.drafts = drafts
        self.calls: list[tuple[str, int]] = []

    def draft(self, answer: str) -> list[Token]:
        if callable(self.drafts):
            draft = self.drafts(answer)
        elif answer in self.drafts:
            draft = self.drafts[answer]
        else:
            raise AssertionError(f"the nudging model was not expected to draft at {answer!r}")
        if isinstance(draft, str):
            ends = draft.endswith(EOS_MARK)
            texts = pieces(draft.removesuffix(EOS_MARK)) + ([EOS_MARK] if ends else [])
        else:
            texts = list(draft)
        return [eos() if text == EOS_MARK else tok(text) for text in texts]

    def peek(self, answer: str) -> Token:
        return self.draft(answer)[0]

    def generate(
        self,
        answer: str,
        max_new_tokens: int,
        *,
        min_prob: float | None = None,
        first: Token | None = None,
        stop: Sequence[str] = (),
    ) -> Iterator[Token]:
        assert min_prob is None, "the nudging model drafts whatever its confidence"
        assert not stop, "a draft is never cut by stop strings"
        assert first is None
        self.calls.append((answer, max_new_tokens))
        return iter(self.draft(answer)[:max_new_tokens])

    def count_tokens(self, text: str) -> int:
        raise AssertionError("answer length is counted with the base model's tokenizer")

    def truncate_tokens(self, text: str, max_tokens: int) -> str:
        raise AssertionError("answer length is cut with the base model's tokenizer")

    def close(self) -> None:
        pass

    @property
    def answers(self) -> list[str]:
        return [answer for answer, _ in self.calls]


class Drive:
    """A finished run, its streamed segments, and the answer text at each yield."""

    def __init__(self, base: ScriptedBase, nudge: ScriptedNudge, **config: Any) -> None:
        self.run = NudgingRun(base, nudge, NudgingConfig(**config))
        self.segments: list[Segment] = []
        self.answer_at_yield: list[str] = []
        for segment in self.run:
            assert segment.text, "an empty segment was streamed"
            assert segment.source in ("base", "nudge")
            self.segments.append(segment)
            self.answer_at_yield.append(self.run.text)
        # Streamed text is never taken back: the final text is the stream.
        assert "".join(s.text for s in self.segments) == self.run.text
        assert self.run.finish_reason is not None

    @property
    def text(self) -> str:
        return self.run.text

    @property
    def reason(self) -> str | None:
        return self.run.finish_reason

    @property
    def triples(self) -> list[tuple[str, str, float | None]]:
        return [(s.text, s.source, s.base_top1_prob) for s in self.segments]

    @property
    def pairs(self) -> list[tuple[str, str]]:
        return [(s.text, s.source) for s in self.segments]


# -- the pure helpers ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("draft", "lead", "words"),
    [
        ("Hello big world", "", ["Hello", "big", "world"]),
        ("  Hello world", "  ", ["Hello", "world"]),
        ("Hi  there", "", ["Hi", "", "there"]),
        ("one\ntwo three", "", ["one\ntwo", "three"]),
        ("word", "", ["word"]),
        ("   ", "   ", [""]),
        ("", "", [""]),
    ],
)
def test_split_draft(draft: str, lead: str, words: list[str]) -> None:
    assert split_draft(draft) == (lead, words)


@pytest.mark.parametrize(
    ("token", "next_word", "expected"),
    [
        (tok(" sky", 0.01), "sky", True),
        (tok(" s", 0.01), "sky", True),
        (tok(" ", 0.01), "sky", True),
        (tok(" skyline"), "sky", False),
        (tok("sky"), "sky", False),
        (tok(" cloud"), "sky", False),
        (tok(""), "sky", False),
        (eos(), "sky", False),
    ],
)
def test_agrees_when_base_token_is_a_prefix_of_space_and_next_word(
    token: Token, next_word: str, expected: bool
) -> None:
    assert agrees(token, next_word) is expected


@pytest.mark.parametrize(
    ("text", "min_chars", "expected"),
    [
        ("xabcabc", 3, 3),
        ("xabcabc", 4, 0),
        ("abcab", 2, 0),
        ("aaaaaa", 1, 3),
        ("Say: I like tea. I like tea.", 10, 12),
        ("a", 1, 0),
    ],
)
def test_repeated_suffix_length(text: str, min_chars: int, expected: int) -> None:
    assert repeated_suffix_length(text, min_chars) == expected


# -- word acceptance ----------------------------------------------------------------------


def test_first_word_is_accepted_without_asking_the_base() -> None:
    base = ScriptedBase({"": tok("Hi", 0.99), "Hello": tok(" there"), "Hello there": eos()})
    nudge = ScriptedNudge({"": "Hello there friend", "Hello there": " friend.<eos>"})
    d = Drive(base, nudge)
    assert base.calls[0] == ("peek", "Hello")
    assert "" not in base.peeks
    assert d.segments[0] == Segment("Hello", "nudge", None)
    assert d.text == "Hello there friend."


def test_acceptance_stops_when_the_base_agrees_even_if_unsure() -> None:
    base = ScriptedBase(
        {
            "The": tok(" cloud", 0.3),  # disagrees and unsure: keep accepting
            "The sky": tok(" i", 0.1),  # a prefix of " is": agreement, whatever its probability
            "The sky i": tok("s"),
            "The sky is": tok(" green", 0.2),
        }
    )
    nudge = ScriptedNudge({"": "The sky is blue today", "The sky is": " blue today.<eos>"})
    d = Drive(base, nudge)
    assert base.peeks == ["The", "The sky"]
    assert d.triples == [
        ("The sky", "nudge", None),
        (" i", "base", 0.1),  # the agreeing boundary token is taken as base text
        ("s", "base", SURE),
        (" blue today.", "nudge", 0.2),
    ]
    assert d.reason == "stop"


def test_acceptance_stops_when_the_base_is_confident_even_if_it_disagrees() -> None:
    base = ScriptedBase({"The": tok(" cloud", 0.4), "The cloud": tok(" is", 0.1)})
    nudge = ScriptedNudge({"": "The sky is blue", "The cloud": " is white.<eos>"})
    d = Drive(base, nudge)  # gamma 0.4: a top-1 probability equal to gamma is confident
    assert base.peeks == ["The"]
    assert d.triples == [
        ("The", "nudge", None),
        (" cloud", "base", 0.4),
        (" is white.", "nudge", 0.1),
    ]


def test_base_that_never_agrees_gets_all_but_the_cut_off_last_word() -> None:
    base = ScriptedBase(fallback=lambda answer: tok(" cloud", 0.39))
    nudge = ScriptedNudge({"": ["The", " sky", " is", " bl"], "The sky is": " blue.<eos>"})
    d = Drive(base, nudge)
    # Asked after every word but the last; never asked to write: the next round starts at once.
    assert base.calls == [("peek", "The"), ("peek", "The sky"), ("peek", "The sky is")]
    assert nudge.answers == ["", "The sky is"]
    assert d.triples == [("The sky is", "nudge", None), (" blue.", "nudge", None)]


def test_one_word_draft_is_accepted_whole_without_asking_the_base() -> None:
    base = ScriptedBase(fallback=lambda answer: tok(" x"))  # would take over if asked
    nudge = ScriptedNudge({"": "Hello world", "Hello": " world<eos>", "Hello world": "<eos>"})
    d = Drive(base, nudge, draft_tokens=1)
    assert base.calls == []
    assert nudge.calls == [("", 1), ("Hello", 1), ("Hello world", 1)]
    assert d.pairs == [("Hello", "nudge"), (" world", "nudge")]
    assert d.reason == "stop"


def test_several_spaces_in_a_row_are_not_a_word_boundary() -> None:
    base = ScriptedBase()  # lost everywhere
    nudge = ScriptedNudge({"": "Hi  there my friend", "Hi  there my": " friend<eos>"})
    d = Drive(base, nudge)
    # "Hi" is followed by an empty word: no question there; the next one is asked after "Hi ".
    assert base.peeks == ["Hi ", "Hi  there", "Hi  there my"]
    assert d.pairs == [("Hi  there my", "nudge"), (" friend", "nudge")]


def test_several_spaces_in_a_row_keep_the_space_before_a_confident_base() -> None:
    base = ScriptedBase({"Hi ": tok("there"), "Hi there": eos()})
    nudge = ScriptedNudge({"": "Hi  you", "Hi there": "<eos>"})
    d = Drive(base, nudge)
    assert base.peeks == ["Hi "]
    assert d.pairs == [("Hi ", "nudge"), ("there", "base")]


def test_leading_spaces_are_kept_on_the_first_word() -> None:
    base = ScriptedBase({"  Hello": tok(" world"), "  Hello world": tok(" again", 0.1)})
    nudge = ScriptedNudge({"": "  Hello world again", "  Hello world": " again<eos>"})
    d = Drive(base, nudge)
    assert base.peeks == ["  Hello"]
    assert d.triples == [
        ("  Hello", "nudge", None),
        (" world", "base", SURE),
        (" again", "nudge", 0.1),
    ]


# -- gamma ---------------------------------------------------------------------------------


def test_gamma_zero_base_is_always_confident() -> None:
    base = ScriptedBase(
        script("Once", tok(" more", 0.0), tok(" and", 0.01), tok(" more", 0.0), eos(0.0))
    )
    nudge = ScriptedNudge({"": "Once upon a time", "Once more and more": "<eos>"})
    d = Drive(base, nudge, gamma=0.0)
    assert base.peeks == ["Once"]  # taken over right after the first word
    assert base.generates == [("Once", 16, 0.0, tok(" more", 0.0))]
    assert d.triples == [
        ("Once", "nudge", None),
        (" more", "base", 0.0),
        (" and", "base", 0.01),  # streamed token by token as the window is written
        (" more", "base", 0.0),
    ]
    assert d.reason == "stop"


def test_gamma_one_only_agreement_hands_over() -> None:
    base = ScriptedBase(
        {
            "one": tok(" 2", 0.99),  # nearly sure, but disagrees: not confident at gamma 1
            **script("one two", tok(" three", 0.5), tok(" and", 1.0), tok(" four", 0.99)),
        }
    )
    nudge = ScriptedNudge({"": "one two three four", "one two three and": " four<eos>"})
    d = Drive(base, nudge, gamma=1.0)
    assert base.peeks == ["one", "one two"]
    assert d.triples == [
        ("one two", "nudge", None),
        (" three", "base", 0.5),
        (" and", "base", 1.0),
        (" four", "nudge", 0.99),
    ]


# -- the base turn -------------------------------------------------------------------------


def test_base_turn_ends_at_the_first_token_below_gamma_which_is_not_taken() -> None:
    base = ScriptedBase(
        script("A", tok(" b", 0.6), tok(" c", SURE), tok(" d", 0.4), tok(" e", 0.39))
    )
    nudge = ScriptedNudge({"": "A z", "A b c d": " e<eos>"})
    d = Drive(base, nudge)
    assert d.triples == [
        ("A", "nudge", None),  # no base question before the first word
        (" b", "base", 0.6),  # the boundary token: its own probability
        (" c", "base", SURE),  # base text: the least top-1 probability of its window so far
        (" d", "base", 0.4),
        (" e", "nudge", 0.39),  # a nudge segment: the probability where the base handed over
    ]
    assert base.generates == [("A", 16, 0.4, tok(" b", 0.6))]
    first, second = d.run.trace
    assert (first.nudge_text, first.boundary) == ("A", tok(" b", 0.6))
    assert first.base_tokens == [tok(" b", 0.6), tok(" c"), tok(" d", 0.4)]
    assert (second.nudge_text, second.boundary, second.base_tokens) == (" e", None, [])


def test_nudge_segment_after_a_round_without_base_turn_has_no_handover_probability() -> None:
    base = ScriptedBase({"A": tok(" b"), "A b": tok(" c", 0.2)})
    nudge = ScriptedNudge({"": "A z", "A b": " c d", "A b c": " d.<eos>"})
    d = Drive(base, nudge)
    assert d.triples == [
        ("A", "nudge", None),
        (" b", "base", SURE),
        (" c", "nudge", 0.2),  # the base handed over at 0.2
        (" d.", "nudge", None),  # the base never took the turn in the round before
    ]


def test_base_rereads_the_answer_at_every_chunk_window() -> None:
    base = ScriptedBase(fallback=follows("A b c d e f g h"))
    nudge = ScriptedNudge({"": "A z", "A b c d e f g h": "<eos>"})
    d = Drive(base, nudge, chunk_tokens=3)
    # The first window holds the boundary token; each later window starts from the answer text.
    assert base.generates == [
        ("A", 3, 0.4, tok(" b")),
        ("A b c d", 3, 0.4, None),
        ("A b c d e f g", 3, 0.4, None),
    ]
    assert d.pairs == [("A", "nudge")] + [(f" {w}", "base") for w in "bcdefgh"]


def test_base_continues_in_windows_of_one_token() -> None:
    base = ScriptedBase(fallback=follows("A b c"))
    nudge = ScriptedNudge({"": "A z", "A b c": "<eos>"})
    d = Drive(base, nudge, chunk_tokens=1)
    assert base.generates == [
        ("A", 1, 0.4, tok(" b")),
        ("A b", 1, 0.4, None),
        ("A b c", 1, 0.4, None),
    ]
    assert d.pairs == [("A", "nudge"), (" b", "base"), (" c", "base")]


def test_base_eos_ends_the_base_turn_but_not_the_answer() -> None:
    base = ScriptedBase(script("A", tok(" b"), tok(" c"), eos()))
    nudge = ScriptedNudge(
        {"": "A z", "A b c": " Then more words", "A b c Then more": " words.<eos>"}
    )
    d = Drive(base, nudge)
    assert base.generates == [("A", 16, 0.4, tok(" b"))]
    assert nudge.answers == ["", "A b c", "A b c Then more"]
    assert d.pairs == [
        ("A", "nudge"),
        (" b", "base"),
        (" c", "base"),
        (" Then more", "nudge"),
        (" words.", "nudge"),
    ]
    assert d.reason == "stop"


def test_base_eos_at_the_boundary_sends_the_turn_back_to_the_nudging_model() -> None:
    base = ScriptedBase({"The": eos(SURE)})  # confident that the answer ends here
    nudge = ScriptedNudge({"": "The end is near", "The": " end.<eos>"})
    d = Drive(base, nudge)
    assert base.calls == [("peek", "The")]  # no base turn
    assert nudge.answers == ["", "The"]
    assert d.pairs == [("The", "nudge"), (" end.", "nudge")]
    assert d.reason == "stop"


def test_loop_breaker_base_chunk_already_written_in_this_round() -> None:
    base = ScriptedBase(fallback=lambda answer: tok(" la"))
    nudge = ScriptedNudge({"": "A z", "A la la la": "<eos>"})
    d = Drive(base, nudge, chunk_tokens=3)
    # Window 1 adds " la la" after the boundary " la"; window 2 would add " la la la",
    # which this round's base text already holds: the turn ends without appending it.
    assert base.generates == [("A", 3, 0.4, tok(" la")), ("A la la la", 3, 0.4, None)]
    assert d.pairs == [("A", "nudge"), (" la", "base"), (" la la", "base")]
    assert d.text == "A la la la"
    assert d.reason == "stop"


COUNT = "Count: one two three four five six seven"


def _passage_run(passage: Sequence[str]) -> Drive:
    """Round 2 hands over after " Again:"; the base writes " one" then ``passage``."""
    base = ScriptedBase(script(COUNT + " Again:", tok(" one"), *map(tok, passage), LOST))
    written = COUNT + " Again: one"
    nudge = ScriptedNudge(
        {
            "": COUNT + " eight",
            COUNT: " Again: x",
            written: "<eos>",
            written + "".join(passage): "<eos>",
        }
    )
    return Drive(base, nudge)


def test_loop_breaker_long_base_passage_already_in_the_answer() -> None:
    d = _passage_run([" two", " three", " four", " five", " six", " seven"])  # six words
    assert d.pairs == [(COUNT, "nudge"), (" Again:", "nudge"), (" one", "base")]
    assert d.reason == "stop"


def test_short_base_passage_already_in_the_answer_is_kept() -> None:
    d = _passage_run([" two", " three"])
    assert d.pairs == [
        (COUNT, "nudge"),
        (" Again:", "nudge"),
        (" one", "base"),
        (" two three", "base"),
    ]


def test_five_word_base_passage_already_in_the_answer_is_kept() -> None:
    d = _passage_run([" two", " three", " four", " five", " six"])  # five words
    assert d.text == COUNT + " Again: one two three four five six"


# -- stops ---------------------------------------------------------------------------------


def test_nudging_eos_appends_the_whole_draft_and_finishes() -> None:
    base = ScriptedBase()
    nudge = ScriptedNudge({"": "Yes, it is.<eos>"})
    d = Drive(base, nudge)
    assert base.calls == []
    assert d.triples == [("Yes, it is.", "nudge", None)]
    assert d.reason == "stop"
    assert d.run.rounds == 1


def test_nudging_eos_beyond_the_draft_window_does_not_finish() -> None:
    base = ScriptedBase()
    nudge = ScriptedNudge({"": "Yes it is.<eos>", "Yes": " it is.<eos>", "Yes it": " is.<eos>"})
    d = Drive(base, nudge, draft_tokens=2)
    assert nudge.calls == [("", 2), ("Yes", 2), ("Yes it", 2)]
    assert d.pairs == [("Yes", "nudge"), (" it", "nudge"), (" is.", "nudge")]
    assert d.reason == "stop"


def test_stop_string_inside_one_segment() -> None:
    base = ScriptedBase(script("A", tok(" b"), tok(" c"), tok(" STOP"), tok(" d"), eos()))
    nudge = ScriptedNudge({"": "A z"})
    d = Drive(base, nudge, stop=["STOP"])
    # " " is released when " STOP" arrives: the text before the stop string is settled.
    assert d.pairs == [("A", "nudge"), (" b", "base"), (" c", "base"), (" ", "base")]
    assert d.text == "A b c "
    assert d.reason == "stop"
    assert len(nudge.calls) == 1


def test_stop_string_inside_a_final_nudging_draft() -> None:
    nudge = ScriptedNudge({"": "Answer.\n\nUser: hi<eos>"})
    d = Drive(ScriptedBase(), nudge, stop=["\nUser:"])
    assert d.triples == [("Answer.\n", "nudge", None)]
    assert d.reason == "stop"


def test_stop_string_spanning_a_nudge_and_a_base_segment() -> None:
    base = ScriptedBase({"Hi\nUs": tok("er:")})
    nudge = ScriptedNudge({"": "Hi\nUs er"})
    d = Drive(base, nudge, stop=["User:"])
    # "Us" could start the stop string: it is held back, then dropped with the base's "er:".
    assert d.triples == [("Hi\n", "nudge", None)]
    assert d.answer_at_yield == ["Hi\nUs"]
    assert d.text == "Hi\n"
    assert d.reason == "stop"
    assert base.generates == []


def test_held_back_tail_is_released_once_it_is_not_a_stop_string() -> None:
    base = ScriptedBase(script("Hi\nUs", tok("ed", 0.8), tok(" it"), eos()))
    nudge = ScriptedNudge({"": "Hi\nUs to", "Hi\nUsed it": "<eos>"})
    d = Drive(base, nudge, stop=["User:"])
    assert d.triples == [
        ("Hi\n", "nudge", None),
        ("Us", "nudge", None),  # released with the base text that settled it, still a nudge
        ("ed", "base", 0.8),
        (" it", "base", SURE),
    ]
    assert d.answer_at_yield[0] == "Hi\nUs"
    assert d.reason == "stop"


def test_max_tokens_cuts_a_base_segment_exactly() -> None:
    base = ScriptedBase(fallback=follows("A b c d e f g"))
    nudge = ScriptedNudge({"": "A z"})
    d = Drive(base, nudge, max_tokens=5)
    # " e" reaches the cap: it is released only when the window ends and the cut is made.
    assert d.pairs == [("A", "nudge")] + [(f" {w}", "base") for w in "bcde"]
    assert count_pieces(d.text) == 5
    assert d.reason == "length"
    assert len(nudge.calls) == 1


def test_max_tokens_cuts_a_nudge_segment_exactly() -> None:
    base = ScriptedBase()
    nudge = ScriptedNudge({"": "one two three four"})
    d = Drive(base, nudge, max_tokens=2)
    assert d.triples == [("one two", "nudge", None)]
    assert d.reason == "length"


def test_max_tokens_reached_exactly_finishes() -> None:
    nudge = ScriptedNudge({"": "one two three"})
    d = Drive(ScriptedBase(), nudge, max_tokens=2)  # "one two" accepted: two tokens
    assert d.text == "one two"
    assert d.reason == "length"
    assert len(nudge.calls) == 1


def test_same_nudging_words_three_times_in_a_row_stop_before_the_fourth() -> None:
    base = ScriptedBase()
    nudge = ScriptedNudge(lambda answer: " again and")
    d = Drive(base, nudge)
    assert len(nudge.calls) == 4
    assert d.pairs == [(" again", "nudge")] * 3
    assert d.reason == "repetition"


def test_same_nudging_words_must_repeat_in_a_row() -> None:
    words = ["x", "x", "y", "x", "x", "x", "x"]
    drafts, answer = {}, ""
    for word in words:
        drafts[answer] = f" {word} w"
        answer += " " + word
    d = Drive(ScriptedBase(), ScriptedNudge(drafts))
    assert d.text == " x x y x x x"
    assert d.reason == "repetition"


def test_repeated_suffix_stops_with_the_second_copy_cut() -> None:
    base = ScriptedBase(
        script("Say:", *(tok(t) for t in [" I", " like", " tea.", " I", " like", " tea."]), LOST)
    )
    nudge = ScriptedNudge({"": "Say: z"})
    d = Drive(base, nudge, min_repeat_chars=10)
    # The second copy was held back while it was written (it might have been one), then cut.
    assert d.pairs == [("Say:", "nudge"), (" I", "base"), (" like", "base"), (" tea.", "base")]
    assert d.reason == "repetition"


def test_repeated_suffix_shorter_than_min_repeat_chars_is_kept() -> None:
    base = ScriptedBase(
        script("Say:", *(tok(t) for t in [" I", " like", " tea.", " I", " like", " tea."]), LOST)
    )
    nudge = ScriptedNudge({"": "Say: z", "Say: I like tea. I like tea.": "<eos>"})
    d = Drive(base, nudge, min_repeat_chars=13)
    assert d.text == "Say: I like tea. I like tea."
    assert d.reason == "stop"


NUDGED = "Say: I like tea. I like"


def _spanning_repeat_run() -> Drive:
    """A nudge segment streams "Say: I like tea. I like"; the base then adds " tea."."""
    base = ScriptedBase({NUDGED: tok(" tea."), NUDGED + " tea.": eos()})
    nudge = ScriptedNudge({"": NUDGED + " x", NUDGED + " tea.": "<eos>"})
    return Drive(base, nudge, min_repeat_chars=10)


def test_repeated_suffix_never_cuts_text_streamed_before_the_current_segment() -> None:
    d = _spanning_repeat_run()
    # " I like tea." repeats, but its second copy starts inside the streamed nudge segment.
    assert d.segments[0] == Segment(NUDGED, "nudge", None)
    assert d.text.startswith(NUDGED)


def test_repeated_suffix_reaching_into_streamed_text_still_ends_the_answer() -> None:
    d = _spanning_repeat_run()
    assert d.pairs == [(NUDGED, "nudge")]
    assert d.reason == "repetition"


def test_round_cap() -> None:
    nudge = ScriptedNudge(lambda answer: f" w{len(answer.split())}")  # one new word a round
    d = Drive(ScriptedBase(), nudge, max_rounds=3)
    assert d.text == " w0 w1 w2"
    assert d.reason == "round_cap"
    assert d.run.rounds == 3
    assert len(nudge.calls) == 3


# -- AnswerWriter --------------------------------------------------------------------------


def writer(**config: Any) -> AnswerWriter:
    return AnswerWriter(NudgingConfig(**config), count_pieces, truncate_pieces)


def test_writer_holds_back_a_possible_stop_string_start_and_releases_it() -> None:
    w = writer(stop=["</s>"])
    assert w.append(Segment("Hello <", "nudge")) == [Segment("Hello ", "nudge")]
    assert w.answer == "Hello <"
    assert w.append(Segment("/", "base", 0.5)) == []  # "</" still held
    assert w.append(Segment("x", "base", 0.7)) == [
        Segment("<", "nudge"),
        Segment("/", "base", 0.5),
        Segment("x", "base", 0.7),
    ]
    assert not w.done


def test_writer_drops_held_back_segments_when_the_stop_string_completes() -> None:
    w = writer(stop=["XYZ"])
    assert w.append(Segment("ab X", "nudge")) == [Segment("ab ", "nudge")]
    assert w.append(Segment("Y", "base", 0.5)) == []
    assert w.append(Segment("Z!", "base", 0.6)) == []
    assert w.answer == "ab "
    assert w.finish_reason == "stop"
    assert w.append(Segment("more", "nudge")) == []  # nothing after the end
    assert w.answer == "ab "


def test_writer_cuts_before_the_earliest_stop_string() -> None:
    w = writer(stop=["b", "a"])
    assert w.append(Segment("xab", "nudge")) == [Segment("x", "nudge")]
    assert w.answer == "x"


def test_writer_finish_releases_the_held_back_tail() -> None:
    w = writer(stop=["User:"])
    assert w.append(Segment("ok Us", "base", 0.9)) == [Segment("ok ", "base", 0.9)]
    assert w.finish("round_cap") == [Segment("Us", "base", 0.9)]
    assert w.answer == "ok Us"
    assert w.finish_reason == "round_cap"
    assert w.finish("stop") == []
    assert w.finish_reason == "round_cap"


def test_writer_max_tokens_truncates_the_pending_segment() -> None:
    w = writer(max_tokens=3)
    assert w.append(Segment("a b", "nudge")) == [Segment("a b", "nudge")]
    assert w.append(Segment(" c d e", "base", 0.5)) == [Segment(" c", "base", 0.5)]
    assert (w.answer, w.finish_reason) == ("a b c", "length")


def test_writer_max_tokens_truncates_across_held_back_segments() -> None:
    w = writer(max_tokens=3, stop=["XY"])
    assert w.append(Segment("a X", "nudge")) == [Segment("a ", "nudge")]
    assert w.append(Segment(" b c d", "base", 0.5)) == [
        Segment("X", "nudge"),
        Segment(" b", "base", 0.5),
    ]
    assert (w.answer, w.finish_reason) == ("a X b", "length")


def test_writer_max_tokens_never_cuts_earlier_text() -> None:
    # A tokenizer whose cut of the longer text falls before text already written.
    w = AnswerWriter(NudgingConfig(max_tokens=3), len, lambda text, n: text[:1])
    assert w.append(Segment("ab", "nudge")) == [Segment("ab", "nudge")]
    assert w.append(Segment("cd", "base", 0.5)) == []
    assert (w.answer, w.finish_reason) == ("ab", "length")


def test_writer_repeated_suffix_cut_within_the_new_segment() -> None:
    w = writer(min_repeat_chars=10)
    assert w.append(Segment("0123456789", "nudge")) == [Segment("0123456789", "nudge")]
    assert w.append(Segment("abcdefghijabcdefghij", "base", 0.5)) == [
        Segment("abcdefghij", "base", 0.5)
    ]
    assert (w.answer, w.finish_reason) == ("0123456789abcdefghij", "repetition")


def test_writer_repeated_suffix_whole_new_segment_is_dropped() -> None:
    w = writer(min_repeat_chars=10)
    w.append(Segment("abcdefghij", "nudge"))
    assert w.append(Segment("abcdefghij", "base", 0.5)) == []
    assert (w.answer, w.finish_reason) == ("abcdefghij", "repetition")


def test_writer_repeated_suffix_never_cuts_earlier_segments() -> None:
    w = writer(min_repeat_chars=10)
    w.append(Segment("abcdefghijabcde", "nudge"))
    w.append(Segment("fghij", "base", 0.5))
    assert w.answer.startswith("abcdefghijabcde")


def test_writer_repeated_suffix_reaching_into_earlier_text_ends_the_answer() -> None:
    w = writer(min_repeat_chars=10)
    w.append(Segment("abcdefghijabcde", "nudge"))
    w.append(Segment("fghij", "base", 0.5))
    assert (w.answer, w.finish_reason) == ("abcdefghijabcde", "repetition")


def test_writer_holds_back_the_longest_possible_stop_string_start() -> None:
    w = writer(stop=["abab"])
    assert w.append(Segment("zaba", "nudge")) == [Segment("z", "nudge")]  # "aba", not just "a"
    assert w.append(Segment("b", "base", 0.5)) == []
    assert (w.answer, w.finish_reason) == ("z", "stop")


def test_writer_max_tokens_applies_when_a_later_stop_string_also_matches() -> None:
    w = writer(max_tokens=3, stop=["STOP"])
    w.append(Segment("a b c d e STOP", "nudge"))
    assert (w.answer, w.finish_reason) == ("a b c", "length")


def test_writer_max_tokens_applies_when_a_repeated_suffix_is_also_cut() -> None:
    w = writer(max_tokens=3, min_repeat_chars=10)
    w.append(Segment("w1 w2 w3 w4 w5 abcdefghij abcdefghij", "nudge"))
    assert (w.answer, w.finish_reason) == ("w1 w2 w3", "length")


# -- token-level streaming (docs/algorithm.md, "Streaming") --------------------------------


def streamed_log(base: ScriptedBase, nudge: ScriptedNudge, **config: Any) -> list[str]:
    """The run's events in order: ``"t:..."`` when the base model decides a window token,
    ``"s:..."`` when text is streamed."""
    run = NudgingRun(base, nudge, NudgingConfig(**config))
    for segment in run:
        base.log.append(("text", segment.text))
    return [("t:" if kind == "token" else "s:") + text for kind, text in base.log]


def test_a_base_window_is_streamed_token_by_token_as_it_is_written() -> None:
    base = ScriptedBase(script("A", tok(" b"), tok(" c"), tok(" d"), tok(" e", 0.1)))
    nudge = ScriptedNudge({"": "A z", "A b c d": " e.<eos>"})
    log = streamed_log(base, nudge)
    # Each token's text is streamed before the next token is decided; the unsure " e" is not.
    assert log == ["s:A", "s: b", "t: b", "t: c", "s: c", "t: d", "s: d", "t: e", "s: e."]


def test_a_window_a_loop_breaker_discards_is_never_streamed() -> None:
    base = ScriptedBase(fallback=lambda answer: tok(" la"))
    nudge = ScriptedNudge({"": "A z", "A la la la": "<eos>"})
    log = streamed_log(base, nudge, chunk_tokens=3)
    # Window 1: " la" is already in the answer (it might be discarded), " la la" is not.
    # Window 2 writes " la la la", which this round's base text holds: discarded, never shown.
    assert log == ["s:A", "s: la", "t: la", "t: la", "t: la", "s: la la",
                   "t: la", "t: la", "t: la"]  # fmt: skip


def test_a_long_passage_already_in_the_answer_is_never_streamed() -> None:
    passage = [" two", " three", " four", " five", " six", " seven"]
    base = ScriptedBase(script(COUNT + " Again:", tok(" one"), *map(tok, passage), LOST))
    written = COUNT + " Again: one"
    nudge = ScriptedNudge({"": COUNT + " eight", COUNT: " Again: x", written: "<eos>"})
    log = streamed_log(base, nudge)
    window = log[log.index("t: one") + 1 :]
    assert window == [f"t:{word}" for word in [*passage, " ?"]]  # no text among them


def test_a_stop_string_start_is_held_within_a_window() -> None:
    base = ScriptedBase(script("A", tok(" b"), tok(" <"), tok("/"), tok("x"), LOST))
    nudge = ScriptedNudge({"": "A z", "A b </x": "<eos>"})
    log = streamed_log(base, nudge, stop=["</s>"])
    assert log == ["s:A", "s: b", "t: b", "t: <", "s: ", "t:/", "t:x", "s:</x", "t: ?"]


def test_copy_in_progress() -> None:
    assert copy_in_progress("abcdefghij abc", 4) == 3  # "abc" occurs 11 characters back
    assert copy_in_progress("abcdefghij abc", 12) == 0  # not that far back
    assert copy_in_progress("xyz", 1) == 0
    assert copy_in_progress("", 3) == 0
    assert copy_in_progress("a" * 10, 3) == 7


def test_writer_preview_releases_settled_text_and_append_the_rest() -> None:
    w = writer(stop=["STOP"])
    w.append(Segment("a", "nudge"))
    assert w.preview(Segment(" b S", "base", 0.9)) == [Segment(" b ", "base", 0.9)]
    assert w.preview(Segment(" b ST", "base", 0.8)) == []
    assert w.preview(Segment(" b STOP", "base", 0.7)) == []
    assert w.answer == "a"  # previews append nothing
    assert w.append(Segment(" b STOP x", "base", 0.7)) == []
    assert (w.answer, w.finish_reason) == ("a b ", "stop")


def test_writer_preview_stops_before_the_token_cap() -> None:
    w = writer(max_tokens=3)
    assert w.preview(Segment("a b", "base", 0.9)) == [Segment("a b", "base", 0.9)]
    assert w.preview(Segment("a b c", "base", 0.9)) == []  # at the cap: the cut decides
    assert w.append(Segment("a b c d", "base", 0.9)) == [Segment(" c", "base", 0.9)]
    assert (w.answer, w.finish_reason) == ("a b c", "length")


def test_writer_preview_holds_a_possible_second_copy_unless_repetition_stops_are_off() -> None:
    w = writer(min_repeat_chars=5)
    assert w.preview(Segment("hello, hel", "base", 0.9)) == [Segment("hello, ", "base", 0.9)]
    assert w.append(Segment("hello, hello, ", "base", 0.9)) == []
    assert (w.answer, w.finish_reason) == ("hello, ", "repetition")
    w = writer(min_repeat_chars=5, repetition_stops=False)
    assert w.preview(Segment("hello, hel", "base", 0.9)) == [Segment("hello, hel", "base", 0.9)]
    assert w.append(Segment("hello, hello, ", "base", 0.9)) == [Segment("lo, ", "base", 0.9)]
    assert (w.answer, w.finish_reason) == ("hello, hello, ", None)


def test_writer_finish_keeps_previewed_text() -> None:
    w = writer()
    w.append(Segment("a", "nudge"))
    assert w.preview(Segment(" b c", "base", 0.9)) == [Segment(" b c", "base", 0.9)]
    assert w.finish("length") == []  # the window's model failed: what was streamed stays
    assert (w.answer, w.finish_reason) == ("a b c", "length")


def test_writer_cuts_never_reach_text_a_preview_released() -> None:
    # The documented edge case: "xyzabc" twice, then "abc" twice, in one window. Appended
    # whole, both second copies would be cut ("0xyzabc"); the second "xyzabc" was streamed
    # while "abc" was being repeated, so only the second "abc" is cut.
    w = writer(min_repeat_chars=3)
    w.append(Segment("0", "nudge"))
    window = "xyzabcxyzabcabc"
    streamed = "".join(
        s.text for k in range(1, len(window) + 1) for s in w.preview(Segment(window[:k], "base"))
    )
    assert streamed == "xyzabcxyzabc"
    assert w.append(Segment(window, "base")) == []
    assert (w.answer, w.finish_reason) == ("0xyzabcxyzabc", "repetition")


def test_without_repetition_stops_the_same_nudges_go_on() -> None:
    nudge = ScriptedNudge(lambda answer: " again and")
    d = Drive(ScriptedBase(), nudge, repetition_stops=False, max_rounds=6)
    assert d.text == " again" * 6
    assert d.reason == "round_cap"


# -- one model alone (the baselines) and a full context window --------------------------------


def test_solo_run_writes_windows_until_eos_with_the_same_stop_rules() -> None:
    base = ScriptedBase(fallback=follows("One two three four five six seven.", end=eos()))
    run = SoloRun(base, NudgingConfig(chunk_tokens=3), "base", count_pieces, truncate_pieces)
    segments = list(run)
    assert run.text == "One two three four five six seven."
    assert "".join(s.text for s in segments) == run.text
    assert [s.text for s in segments] == pieces(run.text)  # streamed token by token
    assert {s.source for s in segments} == {"base"}
    assert run.finish_reason == "stop"
    assert run.rounds == 3
    # Each window re-reads the answer written so far.
    assert [c[1] for c in base.calls] == ["", "One two three", "One two three four five six"]


def test_solo_run_obeys_max_tokens_and_stop_strings() -> None:
    target = "One two three four five six seven."
    config = NudgingConfig(chunk_tokens=4, max_tokens=5)
    run = SoloRun(
        ScriptedBase(fallback=follows(target)), config, "nudge", count_pieces, truncate_pieces
    )
    segments = list(run)
    assert run.text == "One two three four five"
    assert run.finish_reason == "length"
    assert all(s.source == "nudge" and s.base_top1_prob is None for s in segments)
    config = NudgingConfig(chunk_tokens=4, stop=(" four",))
    run = SoloRun(
        ScriptedBase(fallback=follows(target)), config, "base", count_pieces, truncate_pieces
    )
    assert "".join(s.text for s in run) == "One two three"
    assert run.finish_reason == "stop"


class FullContext(ScriptedBase):
    """A base whose context window is full once the answer reaches ``limit`` characters."""

    def __init__(self, limit: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.limit = limit

    def generate(self, answer: str, max_new_tokens: int, **kwargs: Any) -> Iterator[Token]:
        if len(answer) >= self.limit:
            raise ContextWindowError("prompt + answer would exceed the context window")
        return super().generate(answer, max_new_tokens, **kwargs)


def test_a_full_context_window_ends_the_answer_with_length() -> None:
    target = "One two three four five six seven eight nine ten."
    base = FullContext(12, fallback=follows(target))
    run = SoloRun(base, NudgingConfig(chunk_tokens=2), "base", count_pieces, truncate_pieces)
    segments = list(run)
    assert run.finish_reason == "length"
    assert "".join(s.text for s in segments) == run.text == "One two three four"
    nudged = NudgingRun(
        ScriptedBase(fallback=follows(target)),
        FullContext(12, fallback=follows(target)),
        NudgingConfig(draft_tokens=2),
    )
    assert "".join(s.text for s in nudged) == nudged.text
    assert nudged.finish_reason == "length"
    assert len(nudged.text) >= 12


# -- a short final window, turn markers, windows that write nothing ------------------------


def test_a_short_final_window_already_in_the_passage_is_kept() -> None:
    # The base writes " la, la" then " la" (unsure next): the last window's text " la" is in
    # this round's passage, but the window was cut by an unsure token, so it is kept (the
    # authors compare the whole window, which holds the unsure token's text too).
    base = ScriptedBase(script("A", tok(" la"), tok(","), tok(" la"), tok(" la"), tok(" end", 0.1)))
    nudge = ScriptedNudge({"": "A z", "A la, la la": " end.<eos>"})
    d = Drive(base, nudge, chunk_tokens=3)
    # The last window, " la", is already in the answer: it is held until it ends, then kept.
    assert d.pairs == [("A", "nudge"), (" la", "base"), (",", "base"), (" la", "base"),
                       (" la", "base"), (" end.", "nudge")]  # fmt: skip
    assert d.reason == "stop"


MARK = "\nQuestion:"


class CountingNudge(ScriptedNudge):
    """A scripted nudging model that can count its own tokens (the marker check asks it)."""

    def count_tokens(self, text: str) -> int:
        return count_pieces(text)


def _quiz(nudge_writes_marker: bool) -> NudgingRun:
    """The nudging model starts a quiz; the base writes the next question's marker."""
    start = "Question: Capital of France?\nAnswer: Paris."
    base = ScriptedBase(script(start, tok(MARK), tok(" Capital"), tok(" of", 0.1)))
    drafts: dict[str, Draft] = {
        "": start + " x",
        start: [MARK, " Capital"] if nudge_writes_marker else [" That", " is", " all."],
        start + MARK + " Capital": " of Spain?<eos>",
    }
    run = NudgingRun(
        ScriptedBaseWithStart(base, start), CountingNudge(drafts), NudgingConfig(), (MARK,)
    )
    list(run)
    return run


class ScriptedBaseWithStart(ScriptedBase):
    """The base is confident after the quiz's first line, so it takes the turn there."""

    def __init__(self, inner: ScriptedBase, start: str) -> None:
        super().__init__(inner.rules)
        words = start.split(" ")
        self.rules.update({" ".join(words[:i]): LOST for i in range(1, len(words))})
        self.rules[start] = tok(MARK)


def test_a_marker_the_nudging_model_would_write_is_content() -> None:
    run = _quiz(nudge_writes_marker=True)
    assert MARK in run.text
    assert run.text.endswith("of Spain?")
    assert run.finish_reason == "stop"


def test_a_marker_the_base_model_starts_a_turn_with_ends_the_answer() -> None:
    run = _quiz(nudge_writes_marker=False)
    assert run.text == "Question: Capital of France?\nAnswer: Paris."
    assert run.finish_reason == "stop"


def test_a_marker_the_nudging_model_wrote_never_ends_the_answer() -> None:
    quiz = "Question: one?\nAnswer: 1\nQuestion: two?\nAnswer: 2<eos>"
    run = NudgingRun(ScriptedBase(), CountingNudge({"": quiz}), NudgingConfig(), (MARK,))
    list(run)
    assert run.text == quiz.removesuffix("<eos>")


def test_markers_end_a_base_models_solo_answer_wherever_they_are() -> None:
    target = "One two.\nQuestion: three?"
    base = ScriptedBase(fallback=follows(target))
    run = SoloRun(base, NudgingConfig(chunk_tokens=2), "base", count_pieces, truncate_pieces,
                  (MARK,))  # fmt: skip
    assert "".join(s.text for s in run) == "One two."
    assert run.finish_reason == "stop"
    # The window ended at the marker instead of running on.
    assert base.generates[-1][0] == "One two."


def test_a_base_window_of_empty_tokens_ends_the_turn() -> None:
    base = ScriptedBase({"Hi": tok(" there")}, fallback=lambda answer: tok(""))
    nudge = ScriptedNudge({"": "Hi z", "Hi there": " friend.<eos>"})
    d = Drive(base, nudge)
    assert d.text == "Hi there friend."
    assert len(base.generates) == 1


def test_a_solo_window_that_writes_nothing_ends_the_answer() -> None:
    base = ScriptedBase(fallback=lambda answer: tok("") if answer else tok("Hi"))
    run = SoloRun(base, NudgingConfig(chunk_tokens=1), "base", count_pieces, truncate_pieces)
    assert "".join(s.text for s in run) == "Hi"
    assert run.finish_reason == "stop"
    assert len(base.generates) == 2


# -- every run ends, whatever the models say (hypothesis) ----------------------------------

PIECES = ["", " ", "a", " b", "c.", "\n", "é", " the", ",", "Question:", "\nAnswer:", "zz"]


def _pick(table: Sequence[Any], answer: str, salt: int) -> Any:
    return table[zlib.crc32(f"{salt}|{answer}".encode()) % len(table)]


@st.composite
def scripted_models(draw: st.DrawFn) -> tuple[Callable[[str], Token], Callable[[str], Draft]]:
    """A base and a nudging model whose choices are random but fixed functions of the text."""
    tokens = draw(
        st.lists(
            st.builds(
                Token,
                st.sampled_from(PIECES),
                st.floats(0.0, 1.0),
                st.just(0.0),
                st.just(False),
            )
            | st.builds(eos, st.floats(0.0, 1.0)),
            min_size=1,
            max_size=12,
        )
    )
    drafts = draw(
        st.lists(
            st.lists(st.sampled_from([*PIECES, EOS_MARK]), min_size=1, max_size=8),
            min_size=1,
            max_size=8,
        )
    )
    salt = draw(st.integers(0, 1000))
    return (lambda answer: _pick(tokens, answer, salt)), (
        lambda answer: _pick(drafts, answer, salt + 1)
    )


CONFIGS = st.builds(
    NudgingConfig,
    gamma=st.floats(0.0, 1.0),
    draft_tokens=st.integers(1, 6),
    chunk_tokens=st.integers(1, 6),
    max_tokens=st.integers(1, 40),
    max_rounds=st.integers(1, 30),
    max_same_nudges=st.integers(1, 4),
    min_repeat_chars=st.integers(1, 12),
    stop=st.lists(st.sampled_from(["zz", "c.c", "\n\n", "b b"]), max_size=2),
)


def _check_outcome(run: Any, segments: list[Segment], config: NudgingConfig) -> None:
    assert run.finish_reason in ("stop", "length", "repetition", "round_cap")
    assert "".join(s.text for s in segments) == run.text
    assert all(s.text for s in segments)
    assert not any(s in run.text for s in config.stop)
    assert count_pieces(run.text) <= config.max_tokens
    assert run.rounds <= max(config.max_rounds, config.max_tokens)
    assert run.windows <= config.max_tokens


@settings(max_examples=300, deadline=None)
@given(models=scripted_models(), config=CONFIGS, markers=st.booleans())
@pytest.mark.timeout(120)
def test_every_nudged_run_ends_and_keeps_its_rules(
    models: tuple[Callable[[str], Token], Callable[[str], Draft]],
    config: NudgingConfig,
    markers: bool,
) -> None:
    base_rule, draft_rule = models
    base = ScriptedBase(fallback=base_rule)
    nudge = CountingNudge(draft_rule)
    run = NudgingRun(base, nudge, config, ("\nQuestion:", "\nAnswer:") if markers else ())
    segments = list(run)
    _check_outcome(run, segments, config)
    # The bound of docs/algorithm.md ("Termination").
    assert run.rounds <= config.max_rounds
    assert len(base.generates) <= config.max_tokens
    assert len(nudge.calls) <= config.max_rounds + len(run.text) + 1


@settings(max_examples=200, deadline=None)
@given(models=scripted_models(), config=CONFIGS, source=st.sampled_from(["base", "nudge"]))
@pytest.mark.timeout(120)
def test_every_solo_run_ends_and_keeps_its_rules(
    models: tuple[Callable[[str], Token], Callable[[str], Draft]],
    config: NudgingConfig,
    source: str,
) -> None:
    base = ScriptedBase(fallback=models[0])
    run = SoloRun(base, config, source, count_pieces, truncate_pieces, ("\nQuestion:",))  # type: ignore[arg-type]
    segments = list(run)
    _check_outcome(run, segments, config)
    assert "\nQuestion:" not in run.text
    assert len(base.generates) <= config.max_tokens


def test_the_first_nudge_repeats_nothing_even_when_empty() -> None:
    # A draft of one empty token: the first round appends nothing, and is no repeat yet.
    run = NudgingRun(ScriptedBase(), ScriptedNudge({"": [""]}), NudgingConfig(max_same_nudges=1))
    assert list(run) == []
    assert run.finish_reason == "repetition"
    assert run.rounds == 2
