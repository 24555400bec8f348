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

from abc import ABC, abstractmethod
from collections.abc import Collection, Iterator, Mapping, Sequence
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

    def _window(
        self,
        answer: str,
        size: int,
        min_prob: float | None,
        first_given: bool,
        stop: Sequence[str],
    ) -> Iterator[Token]:
        ids = self._encoder.encode(answer)
        path = list(ids)
        grammar_path = self._matcher.answer_ids(answer) if self._matcher is not None else []
        detokenizer = self._tokens.detokenizer(ids)
        stops = StopFinder(stop, answer)
        out: list[Token] = []
        while True:
            token_id, top1, top2 = self._choose_after(path, {len(path): grammar_path})
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
            grammar_path.append(token_id)

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
