"""The nudging loop (docs/algorithm.md): pure logic over two text sessions.

A round: the nudging model drafts; its first words are accepted until the base model agrees
with the next draft word or is confident; then the base model writes while it is confident
(:func:`~langchain_nudging.config.confident`), re-reading the answer as text every
``chunk_tokens`` tokens. Output is a stream of :class:`Segment`; :class:`AnswerWriter` applies
the stop rules to the joined answer and releases only text that no later rule can take back,
token by token while a window is being written (docs/algorithm.md, "Streaming").
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

from .backends.base import ContextWindowError, TextSession, Token
from .config import NudgingConfig, confident

Source = Literal["base", "nudge"]
FinishReason = Literal["stop", "length", "repetition", "round_cap"]


@dataclass(frozen=True, slots=True)
class Segment:
    """A piece of the answer and who wrote it.

    ``base_top1_prob`` is the base model's least top-1 probability over a base segment's
    tokens; for a nudge segment, the base model's top-1 probability where it handed the turn
    over (``None`` when it was not asked, as at the start of the answer).
    """

    text: str
    source: Source
    base_top1_prob: float | None = None


def split_draft(draft: str) -> tuple[str, list[str]]:
    """Leading spaces and the words of a draft, split on single spaces (newlines stay inside)."""
    body = draft.lstrip(" ")
    return draft[: len(draft) - len(body)], body.split(" ")


def agrees(token: Token, next_word: str) -> bool:
    """The base model would start the next draft word itself."""
    return bool(token.text) and not token.is_eos and (" " + next_word).startswith(token.text)


def repeated_suffix_length(text: str, min_chars: int) -> int:
    """Length of the longest ``Y`` (at least ``min_chars`` long) such that text ends with ``YY``.

    Such a ``Y`` ends with the text's last ``min_chars`` characters, so only the places where
    those occur again are candidates (found by ``str.find``, not by trying every length).
    """
    if len(text) < 2 * min_chars:
        return 0
    tail = text[-min_chars:]
    best, index = 0, text.find(tail)
    while index != -1:
        length = len(text) - (index + min_chars)
        if length < min_chars:
            break
        if 2 * length <= len(text) and text[-2 * length : -length] == text[-length:]:
            best = length  # the first hit is the longest: later ones are shorter
            break
        index = text.find(tail, index + 1)
    return best


def copy_in_progress(text: str, min_chars: int) -> int:
    """Length of the longest suffix of ``text`` that also occurs ending at least ``min_chars``
    characters before the end: where a second copy of an earlier passage may have begun.

    A suffix that occurs there has all its suffixes occur there too, so the length is found by
    bisection, each step one ``str.find``.
    """
    limit = len(text) - min_chars
    low, high = 0, max(limit, 0)
    while low < high:
        middle = (low + high + 1) // 2
        if text.find(text[-middle:], 0, limit) != -1:
            low = middle
        else:
            high = middle - 1
    return low


MarkerCheck = Callable[[str, str], bool]
"""``(answer before the marker, marker) -> whether the marker ends the answer there``."""


class AnswerWriter:
    """The joined answer, the stop rules on it, and the segments that are safe to stream.

    Rules are applied each time a segment is appended: stop strings (cut before the first
    occurrence), the base transcript's turn markers (cut before one where ``marker_ends`` says
    so; docs/algorithm.md rule 8), an immediately repeated suffix (cut the second copy, never
    before text already released), and ``max_tokens`` base tokens (cut exactly, never before
    text already released). A tail that could be the start of a stop string or a marker is held
    back until the next segment settles it, so the streamed text always equals the final text.

    While a window is being written, :meth:`preview` releases what of its text no rule applied
    at the window's end can take back (docs/algorithm.md, "Streaming"); the window is then
    appended whole.
    """

    def __init__(
        self,
        config: NudgingConfig,
        count_tokens: Callable[[str], int],
        truncate_tokens: Callable[[str, int], str],
        markers: Sequence[str] = (),
        marker_ends: MarkerCheck | None = None,
    ) -> None:
        self._config = config
        self._count_tokens = count_tokens
        self._truncate_tokens = truncate_tokens
        self._markers = tuple(markers)
        self._marker_ends = marker_ends
        self._content_markers: set[int] = set()  # marker occurrences judged to be content
        self._held = (*config.stop, *self._markers)
        self.answer = ""
        self.finish_reason: FinishReason | None = None
        self._released = 0  # characters streamed; past the answer while a preview is out
        self._previewed = ""  # the window text last previewed (not yet in the answer)
        self._pending: list[Segment] = []  # the answer's text not yet released
        self._starts: list[int] = []  # where each appended segment starts in the answer
        self._sources: list[Source] = []

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def append(self, segment: Segment) -> list[Segment]:
        if self.done:
            return []
        start = len(self.answer)
        shown = max(0, self._released - start)  # already released by a preview
        assert segment.text.startswith(self._previewed[:shown]), "a preview was taken back"
        self._previewed = ""
        text = self.answer + segment.text
        if segment.text:
            self._starts.append(start)
            self._sources.append(segment.source)
        end, reason = self._apply_rules(text, start, max(start, self._released))
        self.answer = text
        self._pending.append(Segment(segment.text[shown:], segment.source, segment.base_top1_prob))
        self._truncate(end)
        if reason is not None:
            self.finish_reason = reason
            return self._release(len(self.answer))
        return self._release(len(self.answer) - self._held_back(self.answer))

    def preview(self, segment: Segment) -> list[Segment]:
        """Release what of ``answer + segment.text`` (a window's text so far, to be appended
        when the window ends) the rules cannot take back when it is appended: everything before
        a complete stop string or marker, a possible start of one, a possible second copy of
        an earlier passage (``repetition_stops``), and nothing once the text reaches
        ``max_tokens``. The caller previews only text that no loop breaker can discard."""
        if self.done:
            return []
        start = len(self.answer)
        text = self.answer + segment.text
        config = self._config
        if (
            len(text.encode()) >= config.max_tokens
            and self._count_tokens(text) >= config.max_tokens
        ):
            return []
        upto = len(text) - self._held_back(text)
        for held in self._held:
            index = text.find(held, max(0, start - len(held) + 1))
            if index != -1:
                upto = min(upto, index)
        if config.repetition_stops:
            upto = min(upto, len(text) - copy_in_progress(text, config.min_repeat_chars))
        if upto <= max(start, self._released):
            return self._release(upto)
        out = self._release(start)
        self._previewed = segment.text
        piece = segment.text[self._released - start : upto - start]
        self._released = upto
        return [*out, Segment(piece, segment.source, segment.base_top1_prob)]

    def finish(self, reason: FinishReason) -> list[Segment]:
        if self.finish_reason is None:
            self.finish_reason = reason
        shown = self._released - len(self.answer)
        if shown > 0:  # a window ended early (its model failed): what was streamed stays
            self.answer += self._previewed[:shown]
        return self._release(len(self.answer))

    def count(self, text: str) -> int:
        """``text``'s length in base tokens."""
        return self._count_tokens(text)

    def source_at(self, index: int) -> Source:
        """Who wrote the answer's character at ``index``."""
        return self._sources[bisect.bisect_right(self._starts, index) - 1]

    def _apply_rules(self, text: str, start: int, floor: int) -> tuple[int, FinishReason | None]:
        """Where ``text`` must end and why: the earliest cut of all rules wins, and at the same
        place a stop string or turn marker wins over the length cap, and that over repetition.
        The length cap and repetition never cut before ``floor`` (text already released)."""
        config = self._config
        cuts: list[tuple[int, int, FinishReason]] = []  # (where, precedence, why)
        # Held-back text is shorter than any stop string, so new matches start after this.
        hits = [text.find(s, max(0, start - len(s) + 1)) for s in config.stop]
        if any(index != -1 for index in hits):
            cuts.append((min(index for index in hits if index != -1), 0, "stop"))
        # A token holds at least one byte: shorter texts cannot reach the cap.
        if (
            len(text.encode()) >= config.max_tokens
            and self._count_tokens(text) >= config.max_tokens
        ):
            cut = self._truncate_tokens(text, config.max_tokens)
            cuts.append((len(cut) if cut.startswith(text[:floor]) else floor, 2, "length"))
        if config.repetition_stops:
            end = len(text)
            while end > floor and (
                length := repeated_suffix_length(text[:end], config.min_repeat_chars)
            ):
                end = max(end - length, floor)  # streamed text is never taken back
                cuts.append((end, 3, "repetition"))
        # A marker is judged only where no earlier rule cuts (a stop string at the same place
        # cuts first; the length cap and repetition do not).
        before = min((where + (precedence > 0) for where, precedence, _ in cuts), default=len(text))
        marker = self._marker_cut(text, start, before)
        if marker is not None:
            cuts.append((marker, 1, "stop"))
        if not cuts:
            return len(text), None
        where, _, why = min(cuts)
        return where, why

    def _marker_cut(self, text: str, start: int, before: int) -> int | None:
        """The first turn marker that starts before ``before`` and ends the answer (rule 8).

        Only a marker whose label the base model wrote is asked about, and each occurrence is
        asked once: one judged to be content stays content.
        """
        if self._marker_ends is None:
            return None
        found: list[tuple[int, str]] = []
        for marker in self._markers:
            index = text.find(marker, max(0, start - len(marker) + 1))
            while index != -1 and index < before:
                found.append((index, marker))
                index = text.find(marker, index + 1)
        for index, marker in sorted(found):
            label = index + len(marker) - len(marker.lstrip())
            if index in self._content_markers or self.source_at(label) != "base":
                continue
            if self._marker_ends(text[:index], marker):
                return index
            self._content_markers.add(index)
        return None

    def _held_back(self, text: str) -> int:
        """Characters at the end of ``text`` that could start a stop string or a marker."""
        longest = 0
        for stop in self._held:
            for k in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:k]):
                    longest = k
                    break
        return longest

    def _truncate(self, end: int) -> None:
        """Drop answer text past ``end`` (never released text)."""
        excess = len(self.answer) - end
        self.answer = self.answer[:end]
        while self._starts and self._starts[-1] >= end:
            self._starts.pop()
            self._sources.pop()
        while excess > 0:
            last = self._pending[-1]
            if len(last.text) <= excess:
                self._pending.pop()
                excess -= len(last.text)
            else:
                self._pending[-1] = Segment(last.text[:-excess], last.source, last.base_top1_prob)
                excess = 0

    def _release(self, upto: int) -> list[Segment]:
        out: list[Segment] = []
        while self._pending and self._released < upto:
            seg = self._pending[0]
            room = upto - self._released
            if len(seg.text) <= room:
                self._pending.pop(0)
                out.append(seg)
                self._released += len(seg.text)
            else:
                out.append(Segment(seg.text[:room], seg.source, seg.base_top1_prob))
                self._pending[0] = Segment(seg.text[room:], seg.source, seg.base_top1_prob)
                self._released = upto
        return [seg for seg in out if seg.text]


@dataclass
class RoundTrace:
    """What one round decided, for statistics and debugging."""

    draft: list[Token]
    nudge_text: str
    boundary: Token | None
    base_tokens: list[Token] = field(default_factory=list)


class _Run:
    """An answer being written: the text so far and why it ended."""

    writer: AnswerWriter
    config: NudgingConfig
    rounds: int
    windows: int  # windows asked of the writing model (base windows in a nudged run)

    @property
    def text(self) -> str:
        return self.writer.answer

    @property
    def finish_reason(self) -> FinishReason | None:
        return self.writer.finish_reason

    def _window_size(self, context: str) -> int:
        """``min(chunk_tokens, max_tokens - n)`` for an answer of ``n`` base tokens (at least 1).

        The answer's bytes bound its tokens, so it is counted only near the cap.
        """
        config = self.config
        room = config.max_tokens - len(context.encode())
        if room >= config.chunk_tokens:
            return config.chunk_tokens
        return max(1, min(config.chunk_tokens, config.max_tokens - self.writer.count(context)))

    def _read_window(
        self,
        tokens: Iterable[Token],
        source: Source,
        stops: Callable[[Token], bool],
        discardable: bool,
    ) -> Generator[Segment, None, tuple[list[Token], Token | None]]:
        """Read a window as its tokens arrive: the tokens taken, and the one that ``stops`` it
        (not taken; ``None`` when the window ran to its end). Its text so far is previewed
        after each token (docs/algorithm.md, "Streaming"); a ``discardable`` window (a base
        window, which a loop breaker may discard) only once that text is not in the answer as
        it stood before the window: a loop breaker then cannot discard it (this round's base
        passage is part of the answer, and a text containing one that is not in the answer is
        not in it either)."""
        writer = self.writer
        before = writer.answer
        kept = not discardable
        taken: list[Token] = []
        text, prob = "", 1.0
        for token in tokens:
            if stops(token):
                return taken, token
            taken.append(token)
            prob = min(prob, token.top1_prob)
            if token.text:
                text += token.text
                kept = kept or text not in before
                if kept:
                    shown = prob if source == "base" else None
                    yield from writer.preview(Segment(text, source, shown))
        return taken, None


class NudgingRun(_Run):
    """One nudged answer. Iterate to receive segments; read the outcome afterwards.

    The sessions must already hold the request's prompts; this class only reads and writes
    the answer text. ``markers`` are the base transcript's turn markers (rule 8).
    """

    def __init__(
        self,
        base: TextSession,
        nudging: TextSession,
        config: NudgingConfig,
        markers: Sequence[str] = (),
    ) -> None:
        self.base = base
        self.nudging = nudging
        self.config = config
        self.writer = AnswerWriter(
            config, base.count_tokens, base.truncate_tokens, markers, self._marker_ends
        )
        self.rounds = 0
        self.windows = 0
        self.trace: list[RoundTrace] = []

    def __iter__(self) -> Iterator[Segment]:
        try:
            yield from self._rounds()
        except ContextWindowError:
            yield from self.writer.finish("length")

    def _rounds(self) -> Iterator[Segment]:
        config = self.config
        writer = self.writer
        handover: float | None = None
        last_nudge: str | None = None  # no nudge yet: the first one repeats nothing
        same_nudges = 0
        while not writer.done:
            if self.rounds >= config.max_rounds:
                yield from writer.finish("round_cap")
                return
            self.rounds += 1
            draft = list(self.nudging.generate(writer.answer, config.draft_tokens))
            draft_text = "".join(t.text for t in draft)
            if draft and draft[-1].is_eos:
                self.trace.append(RoundTrace(draft, draft_text, None))
                yield from writer.append(Segment(draft_text, "nudge", handover))
                yield from writer.finish("stop")
                return
            nudge_text, boundary = self._accept_words(draft_text)
            self.trace.append(RoundTrace(draft, nudge_text, boundary))
            if nudge_text == last_nudge:
                same_nudges += 1
                if config.repetition_stops and same_nudges >= config.max_same_nudges:
                    yield from writer.finish("repetition")
                    return
            else:
                last_nudge, same_nudges = nudge_text, 0
            yield from writer.append(Segment(nudge_text, "nudge", handover))
            handover = None
            if boundary is None or boundary.is_eos or writer.done:
                continue
            handover = yield from self._base_turn(boundary)

    def _accept_words(self, draft_text: str) -> tuple[str, Token | None]:
        """Accept draft words until the base model agrees or is confident at a boundary.

        The base model is asked about every boundary through one ``peek_each`` call: a backend
        may answer them all in one forward pass; the loop stops reading at the first decision.
        """
        lead, words = split_draft(draft_text)
        # Several spaces in a row leave an empty word: no boundary to ask about there.
        boundaries = [
            (lead + " ".join(words[:i]), words[i]) for i in range(1, len(words)) if words[i]
        ]
        answer = self.writer.answer
        tokens = self.base.peek_each([answer + candidate for candidate, _ in boundaries])
        for (candidate, next_word), token in zip(boundaries, tokens, strict=False):
            if agrees(token, next_word) or confident(token.top1_prob, self.config.gamma):
                return candidate, token
        return lead + " ".join(words[: max(1, len(words) - 1)]), None

    def _base_turn(self, boundary: Token) -> Generator[Segment, None, float | None]:
        """The base model writes from ``boundary`` on; returns the probability that ended it."""
        config = self.config
        writer = self.writer
        trace = self.trace[-1]
        context = writer.answer
        trace.base_tokens.append(boundary)
        yield from writer.append(Segment(boundary.text, "base", boundary.top1_prob))
        passage = boundary.text
        first: Token | None = boundary
        while not writer.done:
            if self.windows >= config.max_tokens:
                yield from writer.finish("length")
                return None
            self.windows += 1
            window = self.base.generate(
                context,
                self._window_size(context),
                min_prob=config.gamma,
                first=first,
                stop=config.stop,
            )
            # The first window starts with the boundary token, already in the answer.
            tokens = itertools.islice(window, int(first is not None), None)
            first = None
            taken, stopped = yield from self._read_window(tokens, "base", self._unsure, True)
            trace.base_tokens.extend(taken)
            text = "".join(t.text for t in taken)
            ended = stopped is not None
            handover = None if stopped is None or stopped.is_eos else stopped.top1_prob
            if not ended and text and text in passage:
                return None  # the authors' loop breaker: this window was already written
            if len(text.split()) > config.loop_passage_words and text in writer.answer:
                return None  # the authors' loop breaker: a long passage already in the answer
            if text:
                prob = min(t.top1_prob for t in taken)
                yield from writer.append(Segment(text, "base", prob))
                passage += text
            if ended:
                return handover
            if taken and not text:
                return None  # nothing written: asking again would read the same answer
            context = writer.answer
        return None

    def _unsure(self, token: Token) -> bool:
        """The token that ends a base window: an end-of-sequence token or one below gamma."""
        return token.is_eos or not confident(token.top1_prob, self.config.gamma)

    def _marker_ends(self, answer: str, marker: str) -> bool:
        """A turn marker the base model wrote ends the answer unless the nudging model would
        write it there too (rule 8): then it is part of what the user asked for."""
        size = self.nudging.count_tokens(marker) + 1
        written = "".join(t.text for t in self.nudging.generate(answer, size))
        return not written.startswith(marker)


class SoloRun(_Run):
    """One model alone, for baselines: the same prompt, windows and stop rules, no nudging.

    The model writes windows of up to ``chunk_tokens`` tokens, re-reading the answer as text at
    each window boundary, until an end-of-sequence token or a stop rule. ``markers`` (the base
    transcript's turn markers) end the answer wherever they occur: pass them for the base
    model, not for the nudging model, whose chat template has no such markers.
    """

    def __init__(
        self,
        session: TextSession,
        config: NudgingConfig,
        source: Source,
        count_tokens: Callable[[str], int],
        truncate_tokens: Callable[[str, int], str],
        markers: Sequence[str] = (),
    ) -> None:
        self.session = session
        self.config = config
        self.source: Source = source
        self._stop = (*config.stop, *markers)
        solo = config.model_copy(update={"stop": self._stop})
        self.writer = AnswerWriter(solo, count_tokens, truncate_tokens)
        self.rounds = 0

    @property
    def windows(self) -> int:  # type: ignore[override]
        """A solo run's rounds are its windows."""
        return self.rounds

    def __iter__(self) -> Iterator[Segment]:
        writer = self.writer
        try:
            while not writer.done:
                if self.windows >= self.config.max_tokens:
                    yield from writer.finish("length")
                    return
                self.rounds += 1
                size = self._window_size(writer.answer)
                window = self.session.generate(writer.answer, size, stop=self._stop)
                taken, eos = yield from self._read_window(
                    window, self.source, lambda token: token.is_eos, False
                )
                text = "".join(t.text for t in taken)
                if text:
                    prob = min(t.top1_prob for t in taken) if self.source == "base" else None
                    yield from writer.append(Segment(text, self.source, prob))
                if eos is not None or not text:
                    # An end-of-sequence token, or a window that wrote nothing: asking again
                    # would read the same answer.
                    yield from writer.finish("stop")
        except ContextWindowError:
            yield from writer.finish("length")
