"""What the nudging algorithm asks of a model: text-level questions only.

A backend hides tokens, tensors and caches. A :class:`TextSession` holds one request's prompt
for one model; every question is asked about ``prompt + answer`` where ``answer`` is plain text,
so two models with different tokenizers can share one answer.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from ..config import SamplingConfig


class ContextWindowError(ValueError):
    """``prompt + answer`` no longer fits a model's context window."""


@dataclass(frozen=True, slots=True)
class Token:
    """One next-token decision of a model.

    ``text`` is what the token adds to the answer (empty for an end-of-sequence token, or for
    a token that only carries part of a UTF-8 character: its bytes reach the text with the token
    that completes the character). ``top1_prob`` and ``top2_prob`` come from the raw softmax,
    before temperature, top-p or any mask.
    """

    text: str
    top1_prob: float
    top2_prob: float
    is_eos: bool = False


class TextSession(Protocol):
    """One request's conversation with one model."""

    def peek(self, answer: str) -> Token:
        """The token this model writes next after ``prompt + answer`` (not appended)."""
        ...

    def peek_each(self, answers: Sequence[str]) -> Iterator[Token]:
        """:meth:`peek` of each answer, in order; the caller may stop reading at any point.

        The answers are a draft cut at successive word boundaries. A backend may answer them
        all at once (one forward pass over the longest, as speculative decoding verifies a
        draft) or one by one as they are read.
        """
        ...

    def generate(
        self,
        answer: str,
        max_new_tokens: int,
        *,
        min_prob: float | None = None,
        first: Token | None = None,
    ) -> list[Token]:
        """Continue ``prompt + answer`` token by token, reading the text once at the start.

        Stops after ``max_new_tokens`` tokens, after an end-of-sequence token (returned last),
        or at the first token whose top-1 probability is below ``min_prob`` (returned last, so
        the caller sees why it stopped). ``first``, when given, must be this session's
        :meth:`peek` of the same ``answer``: it is taken as the first token whatever its
        probability, without asking the model again.
        """
        ...

    def count_tokens(self, text: str) -> int:
        """Tokens in ``text`` on its own (no special tokens)."""
        ...

    def truncate_tokens(self, text: str, max_tokens: int) -> str:
        """The longest prefix of ``text`` made of its first ``max_tokens`` tokens."""
        ...

    def close(self) -> None:
        """Free what the session holds (caches); the session is unusable afterwards."""
        ...


class TextModel(Protocol):
    """A model that opens sessions."""

    name: str

    def session(self, prompt: str, sampling: SamplingConfig) -> TextSession: ...
