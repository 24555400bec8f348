"""Text <-> tokens for Hugging Face tokenizers, and the next-token choice, shared by backends."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from transformers import (
    LogitsProcessorList,
    MinPLogitsWarper,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from ..config import SamplingConfig
from .base import ContextWindowError, controls_of
from .cached import PromptEncoder, cuts_at_words
from .penalties import AnswerPenalties

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

_CONTEXT_IDS = 4  # ids decoded before new tokens so that leading spaces come out right
_INCOMPLETE = "\ufffd"  # what a decoder shows for the bytes of an unfinished UTF-8 character


class PromptTooLongError(ContextWindowError):
    """The prompt (or prompt + answer) does not fit the model's context window."""


class TokenizerText:
    """How one model turns text into ids and ids into answer text."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        model: PreTrainedModel | None = None,
        context_window: int | None = None,
        name: str = "model",
    ) -> None:
        self.tokenizer = tokenizer
        self.name = name
        self.context_window = context_window
        eos: dict[int, None] = {}
        for source in (tokenizer.eos_token_id, getattr(model, "generation_config", None)):
            ids = getattr(source, "eos_token_id", source)
            if isinstance(ids, int):
                eos[ids] = None
            elif isinstance(ids, list | tuple | set):
                eos.update(dict.fromkeys(int(i) for i in ids))
        #: The ids that end an answer where a grammar allows it to end.
        self.eos_ids = list(eos)
        # Every special token ends a turn: none of them is answer text.
        self.stop_ids = frozenset({*tokenizer.all_special_ids, *eos})
        # What the tokenizer puts before a text of its own accord (its BOS, if it adds one).
        self._prefix_ids = _prefix_ids(tokenizer)
        self._bos = tokenizer.bos_token or None
        #: Control tokens by their text: the added tokens a text never tokenizes to.
        self.control_ids = control_tokens(tokenizer)
        self._cuts_at_words: bool | None = None

    def encode(self, prompt: str, answer: str = "") -> list[int]:
        """Ids of ``prompt + answer``: text throughout, but for the prompt's control markers.

        Only the spans a :class:`~.base.Prompt` marks as the chat template's own markers become
        control tokens; a special-token string anywhere else (in a message, a tool result, the
        answer) is tokenized as the characters it is written with. The tokenizer's BOS is added
        unless the prompt's first marker, at its very start, is that BOS.
        """
        head, tail_start = self.head(prompt)
        ids = head + self.encode_plain(prompt[tail_start:] + answer)
        self.check_fits(ids)
        return ids

    def counter(self) -> PromptEncoder:
        """A :meth:`PromptEncoder.count` for successive texts (one per user: it keeps state)."""
        return PromptEncoder(self, "")

    def encoder(self, prompt: str) -> PromptEncoder:
        """:meth:`encode` of ``prompt + answer`` for many answers, re-tokenizing only what
        changed (one per session: it keeps the last text it encoded)."""
        return PromptEncoder(self, prompt)

    def head(self, prompt: str) -> tuple[list[int], int]:
        """The ids of ``prompt`` up to the end of its last control marker, and where that is."""
        ids: list[int] = []
        at = 0
        controls = controls_of(prompt)
        if not (controls and controls[0][0] == 0 and prompt[: controls[0][1]] == self._bos):
            ids.extend(self._prefix_ids)
        for start, end in controls:
            token_id = self.control_ids.get(prompt[start:end])
            if token_id is None:
                continue  # not a control token of this tokenizer: the span stays text
            ids.extend(self.encode_plain(prompt[at:start]))
            ids.append(token_id)
            at = end
        return ids, at

    def check_fits(self, ids: list[int]) -> None:
        if self.context_window is not None and len(ids) >= self.context_window:
            raise PromptTooLongError(
                f"the prompt for {self.name} is {len(ids)} tokens, but its context window "
                f"holds {self.context_window} (including at least one answer token)"
            )

    @property
    def cuts_at_words(self) -> bool:
        """Whether text cut at a single space between words tokenizes as it does whole
        (:func:`~.cached.cuts_at_words`, checked once)."""
        if self._cuts_at_words is None:
            self._cuts_at_words = cuts_at_words(self.encode_plain)
        return self._cuts_at_words

    def encode_plain(self, text: str) -> list[int]:
        """Ids of ``text`` as text: no BOS, no special-token string parsed as a control token."""
        if not text:
            return []
        return list(
            self.tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        )

    def decode(self, ids: list[int]) -> str:
        text = self.tokenizer.decode(
            ids, skip_special_tokens=False, clean_up_tokenization_spaces=False
        )
        assert isinstance(text, str)  # one sequence of ids decodes to one text
        return text

    def texts(self, context: list[int], new: list[int]) -> list[str]:
        """What each id of ``new`` adds to the text after ``context``.

        Bytes of an unfinished UTF-8 character add nothing until the id that completes it.
        """
        detokenizer = self.detokenizer(context)
        return [detokenizer.add(token_id) for token_id in new]

    def detokenizer(self, context: list[int]) -> Detokenizer:
        """Text of new ids after ``context``, one id at a time."""
        return Detokenizer(self, context)

    def count(self, text: str) -> int:
        return len(self.encode_plain(text))

    def truncate(self, text: str, max_tokens: int) -> str:
        ids = self.encode_plain(text)
        if len(ids) <= max_tokens:
            return text
        # A cut inside a UTF-8 character keeps the character's first bytes out.
        return self.decode(ids[:max_tokens]).rstrip(_INCOMPLETE)


class Detokenizer:
    """What each new id adds to the text after a context, and whether a character is open.

    Bytes of an unfinished UTF-8 character add nothing until the id that completes it;
    :attr:`incomplete` says that the ids so far end inside a character.
    """

    def __init__(self, text: TokenizerText, context: list[int]) -> None:
        self._text = text
        self._new: list[int] = []
        self._context, self._before = self._start(context)
        self.incomplete = False

    def _start(self, ids: list[int]) -> tuple[list[int], str]:
        """The last few ``ids``, started on a character boundary, and their text.

        A context cut inside a character decodes to U+FFFD at its start, and byte-fallback
        decoders then show the whole run of byte tokens that follows as U+FFFD too.
        """
        start = max(0, len(ids) - _CONTEXT_IDS)
        text = self._text.decode(ids[start:])
        while start > 0 and text.startswith(_INCOMPLETE) and len(ids) - start < 4 * _CONTEXT_IDS:
            start -= 1
            text = self._text.decode(ids[start:])
        return ids[start:], text.rstrip(_INCOMPLETE)

    def add(self, token_id: int) -> str:
        if token_id in self._text.stop_ids:
            return ""
        self._new.append(token_id)
        raw = self._text.decode(self._context + self._new)
        now = raw.rstrip(_INCOMPLETE)
        self.incomplete = len(now) < len(raw)
        if now.startswith(self._before):
            added = now[len(self._before) :]
            self._before = now
        elif self.incomplete:
            # Byte-fallback decoders show a whole run of byte tokens as U+FFFD while one of
            # its characters is open: the text so far stands until the character completes.
            added = ""
        else:  # the decoder rewrote earlier text: fall back to the id on its own
            added = self._text.decode([token_id]).rstrip(_INCOMPLETE)
            self._before = now
        if not self.incomplete and len(self._new) > 2 * _CONTEXT_IDS:
            # Keep the decoded span short: a long window would decode ever more ids per id.
            self._context, self._before = self._start(self._context + self._new)
            self._new = []
        return added


def control_tokens(tokenizer: PreTrainedTokenizerBase) -> dict[str, int]:
    """The tokenizer's control tokens (its special added tokens) by their text.

    Text is tokenized with ``split_special_tokens=True``, which spells these out character by
    character; only a prompt's marked control spans become these ids.
    """
    decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    return {token.content: int(i) for i, token in decoder.items() if token.special}


def _prefix_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The ids a tokenizer puts before any text of its own accord (a BOS), not after it."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return list(full[:start])
    return []


class TokenChooser:
    """Picks the next id from raw logits; confidence always comes from the raw softmax."""

    def __init__(self, sampling: SamplingConfig, device: torch.device | str) -> None:
        self.sampling = sampling
        self.generator: torch.Generator | None = None
        warpers = LogitsProcessorList()
        if not sampling.greedy:
            warpers.append(TemperatureLogitsWarper(sampling.temperature))
            if sampling.top_k:
                warpers.append(TopKLogitsWarper(sampling.top_k))
            if sampling.top_p < 1.0:
                warpers.append(TopPLogitsWarper(sampling.top_p))
            if sampling.min_p:
                warpers.append(MinPLogitsWarper(sampling.min_p))
            self.generator = torch.Generator(device=device)
            if sampling.seed is not None:
                self.generator.manual_seed(sampling.seed)
            else:
                self.generator.seed()
        self.warpers = warpers
        #: The repetition controls, when any is on: a choice then depends on the answer ids.
        self.penalties = AnswerPenalties(sampling) if sampling.penalized else None

    def choose(
        self,
        logits: torch.Tensor,
        allowed: torch.Tensor | None = None,
        answer_ids: Sequence[int] = (),
    ) -> tuple[int, float, float]:
        """``(id, top1_prob, top2_prob)`` for one position's logits (shape ``[vocab]``).

        ``allowed`` (a boolean mask, e.g. a grammar's) limits which id is picked, and the
        repetition controls read ``answer_ids`` (the answer's ids before this position); the
        probabilities stay those of the raw softmax (docs/algorithm.md, rule 6).
        """
        logits = logits.float()
        top = torch.topk(torch.softmax(logits, dim=-1), 2)
        probs = top.values.tolist()
        if self.penalties is not None:
            return self._penalized(logits, allowed, answer_ids, probs)
        if allowed is not None:
            logits = logits.masked_fill(~allowed.to(logits.device), float("-inf"))
            if self.generator is None:
                return int(torch.argmax(logits)), probs[0], probs[1]
        elif self.generator is None:
            return int(top.indices[0]), probs[0], probs[1]
        scores = self.warpers(None, logits[None, :])  # type: ignore[arg-type]
        picked = torch.multinomial(torch.softmax(scores, dim=-1), 1, generator=self.generator)
        return int(picked[0, 0]), probs[0], probs[1]

    def _penalized(
        self,
        logits: torch.Tensor,
        allowed: torch.Tensor | None,
        answer_ids: Sequence[int],
        probs: list[float],
    ) -> tuple[int, float, float]:
        """A choice under the repetition controls: penalties on the raw logits, then the
        mask, then greedy or the warpers. Where the penalties leave no allowed token (an
        n-gram ban on every token a grammar allows), the choice is made without them."""
        assert self.penalties is not None
        if allowed is not None:
            logits = logits.masked_fill(~allowed.to(logits.device), float("-inf"))
        scores = self.penalties(answer_ids, logits)
        if not bool(torch.isfinite(scores).any()):
            scores = logits
        if self.generator is None:
            return int(torch.argmax(scores)), probs[0], probs[1]
        warped = self.warpers(None, scores[None, :])  # type: ignore[arg-type]
        picked = torch.multinomial(torch.softmax(warped, dim=-1), 1, generator=self.generator)
        return int(picked[0, 0]), probs[0], probs[1]
