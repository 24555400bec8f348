"""Grammar-constrained token choices with llguidance, one matcher per (request, model).

The two models share the answer as text, so each model's matcher follows the answer through
that model's own tokenizer: before a choice, the answer is tokenized (byte-exact, greedy), the
matcher rolls back to where its consumed ids and the new ones part, consumes the rest and gives
the mask of allowed next tokens. Text written by the other model advances the matcher this way
too. Requests without a grammar create no matcher and pay nothing.
"""

from __future__ import annotations

import threading
import weakref

import llguidance
import llguidance.hf
import numpy as np
import torch
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast


class GrammarViolationError(RuntimeError):
    """The answer so far does not fit the request's grammar (a bug, or foreign text)."""


class GrammarTokenizer:
    """A model's tokenizer as llguidance sees it, built on first use (about 1-5 s) and kept.

    :meth:`of` gives one per tokenizer object, shared by every pair that uses the tokenizer.
    """

    @classmethod
    def of(
        cls, tokenizer: PreTrainedTokenizerBase, logits_width: int, eos_ids: list[int]
    ) -> GrammarTokenizer:
        with _SHARED_LOCK:
            key = (logits_width, tuple(eos_ids))
            shared = _SHARED.setdefault(tokenizer, {})
            if key not in shared:
                shared[key] = cls(tokenizer, logits_width, eos_ids)
            return shared[key]

    def __init__(
        self, tokenizer: PreTrainedTokenizerBase, logits_width: int, eos_ids: list[int]
    ) -> None:
        self._tokenizer = tokenizer
        self.logits_width = logits_width
        self._eos_ids = eos_ids
        self._built: llguidance.LLTokenizer | None = None
        self._lock = threading.Lock()

    @property
    def built(self) -> bool:
        return self._built is not None

    def build(self) -> llguidance.LLTokenizer:
        """The llguidance tokenizer, built on the first call (thread-safe)."""
        with self._lock:
            if self._built is None:
                if not isinstance(self._tokenizer, PreTrainedTokenizerFast):
                    raise TypeError(
                        "tools and response formats need a fast (tokenizers) tokenizer, got "
                        f"{type(self._tokenizer).__name__}"
                    )
                self._built = llguidance.hf.from_tokenizer(
                    self._tokenizer, eos_token=self._eos_ids or None
                )
            return self._built

    @property
    def tokenizer(self) -> llguidance.LLTokenizer:
        return self._built if self._built is not None else self.build()

    def matcher(self, grammar: str) -> AnswerMatcher:
        return AnswerMatcher(self, grammar)


_SHARED: weakref.WeakKeyDictionary[object, dict[tuple[int, tuple[int, ...]], GrammarTokenizer]]
_SHARED = weakref.WeakKeyDictionary()
_SHARED_LOCK = threading.Lock()


class AnswerMatcher:
    """Which tokens may come next after an answer, under one grammar."""

    def __init__(self, owner: GrammarTokenizer, grammar: str) -> None:
        self._tokenizer = owner.tokenizer
        self._width = owner.logits_width
        self._grammar = grammar
        self._matcher = self._new_matcher()
        self._consumed: list[int] = []
        self.mask_calls = 0

    def _new_matcher(self) -> llguidance.LLMatcher:
        matcher = llguidance.LLMatcher(self._tokenizer, self._grammar, log_level=0)
        if matcher.is_error():
            raise GrammarViolationError(f"the grammar failed to load: {_short(matcher)}")
        return matcher

    def answer_ids(self, answer: str) -> list[int]:
        """The answer in this tokenizer's ids, byte for byte (no prefix space is added)."""
        return list(self._tokenizer.greedy_tokenize(answer)) if answer else []

    def allowed(self, ids: list[int]) -> torch.Tensor:
        """Boolean mask over the model's logits: the tokens allowed after the answer ``ids``."""
        self._follow(ids)
        bits = np.frombuffer(self._matcher.compute_bitmask(), dtype=np.uint8)
        allowed = np.unpackbits(bits, bitorder="little")[: self._width].astype(bool)
        self.mask_calls += 1
        mask = torch.zeros(self._width, dtype=torch.bool)
        mask[: allowed.shape[0]] = torch.from_numpy(allowed)
        if not bool(mask.any()):
            raise GrammarViolationError(
                f"no token may follow the answer {self._tokenizer.decode_str(ids)!r}: "
                f"{_short(self._matcher) or 'the grammar allows nothing here'}"
            )
        return mask

    def _follow(self, ids: list[int]) -> None:
        consumed = self._consumed
        keep = 0
        for a, b in zip(consumed, ids, strict=False):
            if a != b:
                break
            keep += 1
        if keep < len(consumed) and not self._matcher.rollback(len(consumed) - keep):
            self._matcher.reset()
            keep = 0
        del consumed[keep:]
        new = ids[keep:]
        if new and not self._matcher.consume_tokens(new):
            error = _short(self._matcher)
            self._matcher = self._new_matcher()  # an error state is sticky: start afresh
            consumed.clear()
            raise GrammarViolationError(
                f"the answer {self._tokenizer.decode_str(ids)!r} does not fit the grammar: {error}"
            )
        consumed.extend(new)


def _short(matcher: llguidance.LLMatcher) -> str:
    """llguidance's error without its parser-state dump."""
    return (matcher.get_error() or "").split("\n<state>")[0].strip()
