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


class Prompt(str):
    """A rendered prompt that knows which of its characters are control markers.

    A prompt is text; only the spans in ``controls`` (``(start, end)`` character offsets of a
    chat template's own markers, such as ``"<|im_start|>"``) are tokenized as control tokens.
    Everything else, a special-token string inside a message included, is tokenized as the
    characters it is written with. A plain ``str`` given where a prompt is expected has no
    control markers.
    """

    controls: tuple[tuple[int, int], ...]

    def __new__(cls, text: str, controls: Sequence[tuple[int, int]] = ()) -> Prompt:
        prompt = super().__new__(cls, text)
        prompt.controls = tuple((int(a), int(b)) for a, b in controls)
        return prompt


def controls_of(prompt: str) -> tuple[tuple[int, int], ...]:
    """The control-marker spans of ``prompt`` (none for a plain ``str``)."""
    return prompt.controls if isinstance(prompt, Prompt) else ()


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
        stop: Sequence[str] = (),
    ) -> list[Token]:
        """Continue ``prompt + answer`` token by token, reading the text once at the start.

        Stops after ``max_new_tokens`` tokens, after an end-of-sequence token (returned last),
        at the first token whose top-1 probability is below ``min_prob`` (returned last, so
        the caller sees why it stopped), or after the token whose text completes an occurrence
        of a ``stop`` string in ``answer`` followed by the new text (an occurrence that ends
        inside ``answer`` does not count). A window never ends inside a character: when the
        last token leaves a UTF-8 character incomplete, up to 3 more tokens are taken past
        ``max_new_tokens`` until it is complete (docs/algorithm.md, rule 7). ``first``, when
        given, must be this session's :meth:`peek` of the same ``answer``: it is taken as the
        first token whatever its probability, without asking the model again.
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
