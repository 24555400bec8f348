"""Cached sessions over any model that keeps a request's ids: the backend-independent part.

A session keeps the ids its backend has read (a KV cache). Asking about new text re-tokenizes
``prompt + answer`` and asks the model only for the choices never made before: every choice is
remembered in a :class:`ChoiceTree`, so the model never runs twice to choose after the same
ids. The backend (backends/local.py for transformers) supplies the choices after some prefixes
of one id sequence, in one call, reusing its cache where the ids agree with what it has read
(:meth:`CachedSession._choose`). Everything else here (prefix reuse, the boundaries of a draft
verified in one call, token windows with their stop rules, statistics) holds for any such
backend.
"""

from __future__ import annotations

import bisect
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from collections.abc import Set as AbstractSet
from typing import Any, Protocol, TypeVar

from ..config import confident
from .base import SessionStats, Token, TokenCount

_T = TypeVar("_T")


def common_prefix_length(a: Sequence[_T], b: Sequence[_T]) -> int:
    """Length of the longest common prefix (slices compared in C, by bisection)."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # a[:lo] == b[:lo] and a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid
    return lo


CARRY_TOKENS = 3  # a UTF-8 character has at most 4 bytes: tokens a window may run past its size


class Detokenizing(Protocol):
    """What each new id adds to an answer's text (:class:`Detokenizer`, or another backend's)."""

    #: The ids so far end inside a UTF-8 character.
    incomplete: bool

    def add(self, token_id: int) -> str: ...


def window_full(tokens: Sequence[Token], size: int, detokenizer: Detokenizing) -> bool:
    """A window of ``size`` tokens is full, unless its last token left a character open
    (then it goes on for up to :data:`CARRY_TOKENS` more, docs/algorithm.md rule 7)."""
    if len(tokens) < size:
        return False
    return not detokenizer.incomplete or len(tokens) >= size + CARRY_TOKENS


def cut_window(
    choices: Iterable[Choice],
    detokenizer: Detokenizing,
    stop_ids: AbstractSet[int],
    answer: str,
    size: int,
    min_prob: float | None,
    first: Token | None,
    stop: Sequence[str],
) -> Iterator[Token]:
    """The tokens of a window cut from one completion of its longest length (``size`` plus
    :data:`CARRY_TOKENS`), as an uncached oracle asks it: they end where a window made token
    by token ends (an end of turn, an unsure token, a stop string, the size). ``first``, when
    given, was decided already: it stands for the first choice and never stops the window."""
    stops = StopFinder(stop, answer)
    out: list[Token] = []
    for k, (token_id, top1, top2) in enumerate(choices):
        token = Token(detokenizer.add(token_id), top1, top2, token_id in stop_ids)
        given = k == 0 and first is not None
        out.append(first if given and first is not None else token)
        yield out[-1]
        low = min_prob is not None and not confident(out[-1].top1_prob, min_prob)
        if out[-1].is_eos or (low and not given):
            return
        if stops.found(token.text) or window_full(out, size, detokenizer):
            return


class StopFinder:
    """Finds the first occurrence of a stop string that ends in text added after ``answer``."""

    def __init__(self, stop: Sequence[str], answer: str) -> None:
        self._stop = tuple(stop)
        self._keep = max((len(s) for s in self._stop), default=1) - 1
        self._tail = answer[-self._keep :] if self._keep else ""

    def found(self, text: str) -> bool:
        if not self._stop or not text:
            return False
        window = self._tail + text
        old = len(self._tail)
        hit = any(window.find(s, max(0, old - len(s) + 1)) != -1 for s in self._stop)
        self._tail = window[-self._keep :] if self._keep else ""
        return hit


# Where text may be cut and tokenized in two pieces: at a single space between two words.
_WORD_START = re.compile(r"(?<=\w)(?= \w)")
# A text to check that on, once per tokenizer (docs/reliability.md).
_SPLIT_SAMPLE = (
    "Question: What is 1234 * 5678? Answer: Let me think step by step.  First, 1234 * 5000 ="
    " 6170000; then 1234 * 678 = 836652.\nSo the total is 7006652. Done!\n\n  - item one,"
    " item two; (three) [four] {five} <tag> </tag> \"quoted\" 'single' don't can't it's"
    " Café naïve façade über São Paulo Zürich 日本語 の テキスト 東京 Привет, как дела? ☕ 🙂 🚀"
    " €5 £3 — … def add(a, b): return a + b  # adds\tnumbers   spaced    out ok. www.a.com/x?y=1"
    " e.g. i.e. U.S.A. 3.14 1,000,000 50% #hash @at $dollar ^caret &amp *star _under_ ~tilde"
)


def cuts_at_words(encode_plain: Callable[[str], list[int]]) -> bool:
    """Whether a tokenizer tokenizes text cut at a single space between two words as it does
    the whole text (checked on a sample of prose, code, numbers and other scripts)."""
    whole = encode_plain(_SPLIT_SAMPLE)
    return all(
        encode_plain(_SPLIT_SAMPLE[:c]) + encode_plain(_SPLIT_SAMPLE[c:]) == whole
        for c in (m.start() for m in _WORD_START.finditer(_SPLIT_SAMPLE))
    )


class PlainText(Protocol):
    """What :class:`PromptEncoder` asks of a model's tokenizer."""

    @property
    def cuts_at_words(self) -> bool: ...

    def head(self, prompt: str) -> tuple[list[int], int]:
        """The ids of ``prompt`` up to the end of its last control marker, and where that is."""
        ...

    def encode_plain(self, text: str) -> list[int]:
        """Ids of ``text`` as text (no BOS, no special-token string parsed)."""
        ...

    def check_fits(self, ids: list[int]) -> None:
        """Raise ContextWindowError when ``ids`` do not fit the context window."""
        ...


class PromptEncoder:
    """``prompt + answer`` to ids for one session, re-tokenizing only what changed.

    Equal to the ids of the prompt's head (``text.head``) followed by the rest as text. The
    head is tokenized once. The rest, the prompt's last piece and the answer, is cut at
    single spaces between two words: where the tokenizer tokenizes text cut there as it
    tokenizes it whole (checked once per tokenizer, :func:`cuts_at_words`), the ids before
    the last cut that the new text shares with the text encoded before are kept, and only the
    text after it is tokenized. So a question's cost does not grow with the prompt or the
    answer.
    """

    def __init__(self, text: PlainText, prompt: str) -> None:
        self._text = text
        self._prompt = prompt
        head, self._tail_start = text.head(prompt)
        self._head = head
        self._last = ""  # the last text after the head, its ids, and cuts in it:
        self._ids: list[int] = []
        self._cut_at: list[int] = [0]  # character offsets, ascending
        self._cut_ids: list[int] = [0]  # ids before each
        self.encode("")  # tokenizes the prompt, and fails on an over-long one

    def encode(self, answer: str) -> list[int]:
        rest = self._prompt[self._tail_start :] + answer
        ids = self._head + self._tail_ids(rest)
        self._text.check_fits(ids)
        return ids

    def count(self, text: str) -> int:
        """Tokens in ``text`` on its own, for an encoder of the empty prompt: successive texts
        that share a beginning are counted incrementally."""
        return len(self._tail_ids(text))

    def _tail_ids(self, rest: str) -> list[int]:
        text = self._text
        if not text.cuts_at_words:
            return text.encode_plain(rest)
        # The last cut that both texts share with a word start after it.
        shared = common_prefix_length(self._last, rest)
        k = max(0, bisect.bisect_right(self._cut_at, shared - 2) - 1)
        at, kept = self._cut_at[k], self._ids[: self._cut_ids[k]]
        del self._cut_at[k + 1 :], self._cut_ids[k + 1 :]
        # Cut the new text once more near its end, so the next question can reuse it.
        cuts = [m.start() for m in _WORD_START.finditer(rest, at + 1, max(at + 1, len(rest) - 32))]
        if cuts:
            middle = text.encode_plain(rest[at : cuts[-1]])
            self._cut_at.append(cuts[-1])
            self._cut_ids.append(len(kept) + len(middle))
            ids = kept + middle + text.encode_plain(rest[cuts[-1] :])
        else:
            ids = kept + text.encode_plain(rest[at:])
        self._last, self._ids = rest, ids
        return ids


Choice = tuple[int, float, float]  # (token id, top-1 probability, top-2 probability)
_CHOICE = -1  # a trie node's key for the choice after it (token ids are >= 0)


class PromptIds(Protocol):
    """``prompt + answer`` to ids, for one session's prompt (it may keep state)."""

    def encode(self, answer: str) -> list[int]:
        """The ids; raises ContextWindowError when they do not fit."""
        ...


class SessionTokens(Protocol):
    """What a cached session asks of its model's tokenizer."""

    @property
    def stop_ids(self) -> AbstractSet[int]:
        """Ids that end the answer (none of them is answer text)."""
        ...

    def encoder(self, prompt: str) -> PromptIds: ...

    def counter(self) -> TokenCount: ...

    def detokenizer(self, context: list[int]) -> Detokenizing: ...

    def truncate(self, text: str, max_tokens: int) -> str: ...


class GrammarMatcher(Protocol):
    """A request's grammar, following the answer in its model's ids (backends/grammar.py)."""

    mask_calls: int

    def answer_ids(self, answer: str) -> list[int]: ...

    def allowed(self, ids: list[int]) -> Any:
        """The backend's mask of the tokens allowed after the answer ``ids``."""
        ...


class ChoiceTree:
    """The token chosen after every id sequence a session has looked at: a trie of ids.

    Greedy choices depend only on the ids before them, so a question about a prefix already
    looked at (a draft whose first words were accepted, a boundary verified in a batch, a
    peek followed by a window, a passage the base model writes again) is answered without
    running the model. Under sampling, each prefix keeps the one token sampled after it.
    """

    def __init__(self) -> None:
        self._root: dict[int, Any] = {}
        # The last walk: its ids and the node after each of their prefixes. A session asks
        # about ids that extend the last ones by a token or a few, so a walk resumes where
        # the ids part instead of from the root (the cost per question stays flat as the
        # prompt and the answer grow).
        self._ids: list[int] = []
        self._nodes: list[dict[int, Any]] = [self._root]

    def known(self, ids: list[int], lengths: Collection[int]) -> dict[int, Choice]:
        """The choices after ``ids[:n]`` for each ``n`` in ``lengths`` that has one."""
        nodes = self._walk(ids, max(lengths, default=0), create=False)
        found = {}
        for n in lengths:
            if n < len(nodes) and _CHOICE in nodes[n]:
                found[n] = nodes[n][_CHOICE]
        return found

    def add(self, ids: list[int], choices: Mapping[int, Choice]) -> None:
        """Remember the choice after ``ids[:n]`` for each ``n`` in ``choices``."""
        nodes = self._walk(ids, max(choices), create=True)
        for n, choice in choices.items():
            nodes[n][_CHOICE] = choice

    def _walk(self, ids: list[int], upto: int, create: bool) -> list[dict[int, Any]]:
        """The nodes after ``ids[:n]`` for ``n`` from 0 to ``upto`` (fewer where the trie
        ends, unless ``create``)."""
        keep = min(common_prefix_length(self._ids, ids[:upto]), len(self._nodes) - 1)
        nodes = self._nodes[: keep + 1]
        node = nodes[-1]
        for n in range(keep, upto):
            child = node.get(ids[n])
            if child is None:
                if not create:
                    break
                child = node[ids[n]] = {}
            nodes.append(child)
            node = child
        self._ids, self._nodes = ids[: len(nodes) - 1], nodes
        return nodes


class CachedSession(ABC):
    """One request's prompt for one model whose backend keeps the ids it has read.

    Implements :class:`~.base.TextSession` but for :meth:`~.base.TextSession.allowed_mass`
    (it needs the backend's full distribution). A backend implements :meth:`_choose`,
    :meth:`_new_matcher` and :meth:`_release`, and calls :meth:`_count_pass` per model call.
    """

    def __init__(self, tokens: SessionTokens, prompt: str, grammar: str | None) -> None:
        self._tokens = tokens
        self._encoder = tokens.encoder(prompt)  # fails on an over-long prompt
        self._counter = tokens.counter()
        # Only a constrained request has a matcher: the others never compute a mask.
        self._matcher = self._new_matcher(grammar) if grammar else None
        self._choices = ChoiceTree()
        self._peeked: str | None = None  # the answer of the last peek
        self._open = True
        self._forward_passes = 0
        self._tokens_processed = 0
        self._choices_reused = 0  # tokens answered from the tree without running the model
        self._grammar_masks = 0  # masks of the matchers dropped so far

    # -- what a backend supplies --------------------------------------------------------------
    @abstractmethod
    def _choose(
        self, ids: list[int], lengths: list[int], grammar_ids: Mapping[int, list[int]]
    ) -> list[Choice]:
        """The token chosen after ``ids[:n]`` for each ``n`` in ``lengths`` (ascending), from
        one call of the model; under a grammar, ``grammar_ids[n]`` is the answer of
        ``ids[:n]`` in the matcher's ids."""

    @abstractmethod
    def _new_matcher(self, grammar: str) -> GrammarMatcher:
        """A matcher of ``grammar`` for this session's model."""

    @abstractmethod
    def _release(self) -> None:
        """Free what the backend holds for this session (its cache); called once."""

    def _count_pass(self, tokens: int) -> None:
        """One model call that read ``tokens`` new positions."""
        self._forward_passes += 1
        self._tokens_processed += tokens

    # -- text-level questions -------------------------------------------------------------
    def peek(self, answer: str) -> Token:
        return next(self.peek_each([answer]))

    def peek_each(self, answers: Sequence[str]) -> Iterator[Token]:
        """Every answer whose ids extend into the longest one's is verified in one call.

        An answer that tokenizes differently from the longest one's prefix (a boundary that
        re-tokenizing merges) is asked on its own when it is read.
        """
        all_ids = [self._encoder.encode(answer) for answer in answers]
        grammar_ids = {}
        if self._matcher is not None:
            grammar_ids = {
                len(ids): self._matcher.answer_ids(answer)
                for ids, answer in zip(all_ids, answers, strict=True)
            }
        if all_ids:
            longest = max(all_ids, key=len)
            prefixes = {len(ids) for ids in all_ids if longest[: len(ids)] == ids}
            self._look_along(longest, prefixes, grammar_ids)
        for answer, ids in zip(answers, all_ids, strict=True):
            token_id, top1, top2 = self._choose_after(ids, grammar_ids, counted=False)
            self._peeked = answer
            text = self._tokens.detokenizer(ids).add(token_id)
            yield Token(text, top1, top2, token_id in self._tokens.stop_ids)

    def generate(
        self,
        answer: str,
        max_new_tokens: int,
        *,
        min_prob: float | None = None,
        first: Token | None = None,
        stop: Sequence[str] = (),
    ) -> Iterator[Token]:
        """:meth:`~.base.TextSession.generate`: each token is yielded as it is chosen; a
        choice already made (``first``, a peek, an earlier window) runs no model call."""
        self._check_open()
        if first is not None and self._peeked != answer:
            raise ValueError("generate(first=...) must follow peek() of the same answer")
        return self._window(answer, max_new_tokens, min_prob, first is not None, stop)

    def _stream(self, ids: list[int], size: int) -> Iterator[Choice] | None:
        """The choices of up to ``size`` tokens after ``ids``, made by the backend in one
        go and read as they come (a server's streamed completion); closing the iterator
        stops it. ``None`` (this default): a window asks :meth:`_choose` token by token."""
        return None

    def _grammar_advance(self, grammar_path: list[int], token_id: int, text: str) -> None:
        """Extend the answer in the matcher's ids by a chosen token (which adds ``text``)."""
        grammar_path.append(token_id)

    def _window(
        self,
        answer: str,
        size: int,
        min_prob: float | None,
        first_given: bool,
        stop: Sequence[str],
    ) -> Iterator[Token]:
        """Choices made before are taken as they are; an unconstrained window's new ones come
        from one backend stream where there is one (:meth:`_stream`), else one by one."""
        ids = self._encoder.encode(answer)
        path = list(ids)
        matcher = self._matcher
        grammar_path = matcher.answer_ids(answer) if matcher is not None else []
        detokenizer = self._tokens.detokenizer(ids)
        stops = StopFinder(stop, answer)
        out: list[Token] = []
        stream: Iterator[Choice] | None = None
        try:
            while True:
                choice = None
                new = stream is None and matcher is None
                if new and not self._choices.known(path, {len(path)}):
                    stream = self._stream(path, max(1, size - len(out)))
                if stream is not None:
                    # Past its size (a character left open) a window asks token by token.
                    choice = next(stream, None)
                if choice is not None:
                    self._choices.add(path, {len(path): choice})
                else:
                    choice = self._choose_after(path, {len(path): grammar_path})
                token_id, top1, top2 = choice
                ends = token_id in self._tokens.stop_ids
                text = detokenizer.add(token_id)
                out.append(Token(text, top1, top2, ends))
                # The first token, when given, was decided already: it never stops the window.
                unsure = min_prob is not None and not confident(top1, min_prob)
                low = unsure and not (len(out) == 1 and first_given)
                yield out[-1]
                if ends or low or stops.found(text) or window_full(out, size, detokenizer):
                    return
                path.append(token_id)
                if matcher is not None:
                    self._grammar_advance(grammar_path, token_id, text)
        finally:
            close = getattr(stream, "close", None)
            if close is not None:
                close()

    def count_tokens(self, text: str) -> int:
        return self._counter.count(text)

    def truncate_tokens(self, text: str, max_tokens: int) -> str:
        return self._tokens.truncate(text, max_tokens)

    def constrain(self, grammar: str | None) -> None:
        """Constrain every choice from now on by ``grammar`` (choices made before are dropped)."""
        matcher = self._new_matcher(grammar) if grammar else None
        self._drop_matcher()
        self._matcher = matcher
        self._choices = ChoiceTree()

    def stats(self) -> SessionStats:
        masks = self._grammar_masks
        if self._matcher is not None:
            masks += self._matcher.mask_calls
        return SessionStats(
            self._forward_passes, self._tokens_processed, self._choices_reused, masks
        )

    def close(self) -> None:
        self._peeked = None
        self._drop_matcher()
        self._choices = ChoiceTree()
        if self._open:
            self._open = False
            self._release()

    def _drop_matcher(self) -> None:
        if self._matcher is not None:
            self._grammar_masks += self._matcher.mask_calls
            self._matcher = None

    def _check_open(self) -> None:
        if not self._open:
            raise RuntimeError("session is closed")

    # -- choices -------------------------------------------------------------------------------
    def _choose_after(
        self, ids: list[int], grammar_ids: Mapping[int, list[int]], counted: bool = True
    ) -> Choice:
        """The token chosen after ``ids``: remembered, or from the model."""
        return self._look_along(ids, {len(ids)}, grammar_ids, counted)[len(ids)]

    def _look_along(
        self,
        ids: list[int],
        prefixes: set[int],
        grammar_ids: Mapping[int, list[int]],
        counted: bool = True,
    ) -> dict[int, Choice]:
        """The choice after each ``ids[:n]`` (``n`` in ``prefixes``); new ones in one call."""
        self._check_open()
        known = self._choices.known(ids, prefixes)
        missing = sorted(prefixes - known.keys())
        if counted:
            self._choices_reused += len(known)
        if not missing:
            return known
        new = dict(zip(missing, self._choose(ids, missing, grammar_ids), strict=True))
        self._choices.add(ids, new)
        return known | new
