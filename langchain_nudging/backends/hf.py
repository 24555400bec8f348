"""Text <-> tokens for Hugging Face tokenizers, and the next-token choice, shared by backends."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from transformers import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from ..config import SamplingConfig
from .base import ContextWindowError

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

    def encode(self, text: str) -> list[int]:
        """Ids of a prompt (+ answer), adding the tokenizer's BOS unless the text has it."""
        bos = self.tokenizer.bos_token
        add_special = not (bos and text.startswith(bos))
        ids = self.tokenizer(text, add_special_tokens=add_special)["input_ids"]
        if self.context_window is not None and len(ids) >= self.context_window:
            raise PromptTooLongError(
                f"the prompt for {self.name} is {len(ids)} tokens, but its context window "
                f"holds {self.context_window} (including at least one answer token)"
            )
        return list(ids)

    def encode_plain(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(
            ids, skip_special_tokens=False, clean_up_tokenization_spaces=False
        )

    def texts(self, context: list[int], new: list[int]) -> list[str]:
        """What each id of ``new`` adds to the text after ``context``.

        Bytes of an unfinished UTF-8 character add nothing until the id that completes it.
        """
        ctx = context[-_CONTEXT_IDS:]
        before = self.decode(ctx).rstrip(_INCOMPLETE)
        out: list[str] = []
        for k in range(1, len(new) + 1):
            if new[k - 1] in self.stop_ids:
                out.append("")
                continue
            now = self.decode(ctx + new[:k]).rstrip(_INCOMPLETE)
            if now.startswith(before):
                out.append(now[len(before) :])
                before = now
            else:  # the decoder rewrote earlier text: fall back to the id on its own
                out.append(self.decode(new[k - 1 : k]).rstrip(_INCOMPLETE))
                before = now
        return out

    def count(self, text: str) -> int:
        return len(self.encode_plain(text))

    def truncate(self, text: str, max_tokens: int) -> str:
        ids = self.encode_plain(text)
        if len(ids) <= max_tokens:
            return text
        # A cut inside a UTF-8 character keeps the character's first bytes out.
        return self.decode(ids[:max_tokens]).rstrip(_INCOMPLETE)


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
            self.generator = torch.Generator(device=device)
            if sampling.seed is not None:
                self.generator.manual_seed(sampling.seed)
            else:
                self.generator.seed()
        self.warpers = warpers

    def choose(
        self, logits: torch.Tensor, allowed: torch.Tensor | None = None
    ) -> tuple[int, float, float]:
        """``(id, top1_prob, top2_prob)`` for one position's logits (shape ``[vocab]``).

        ``allowed`` (a boolean mask, e.g. a grammar's) limits which id is picked; the
        probabilities stay those of the raw softmax (DESIGN rule 6).
        """
        logits = logits.float()
        top = torch.topk(torch.softmax(logits, dim=-1), 2)
        probs = top.values.tolist()
        if allowed is not None:
            logits = logits.masked_fill(~allowed.to(logits.device), float("-inf"))
            if self.generator is None:
                return int(torch.argmax(logits)), probs[0], probs[1]
        elif self.generator is None:
            return int(top.indices[0]), probs[0], probs[1]
        scores = self.warpers(None, logits[None, :])  # type: ignore[arg-type]
        picked = torch.multinomial(torch.softmax(scores, dim=-1), 1, generator=self.generator)
        return int(picked[0, 0]), probs[0], probs[1]
