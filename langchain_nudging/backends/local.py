"""Transformers causal LMs in this process, one KV cache per (request, model).

A session keeps the ids whose keys and values sit in its cache. Asking about new text
re-tokenizes ``prompt + answer``, keeps the longest common id prefix, crops the cache there and
runs the model over the remaining ids only, asking for the last position's logits alone.
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING

import torch
from transformers import DynamicCache

from ..config import SamplingConfig
from .base import ContextWindowError, Token
from .hf import TokenChooser, TokenizerText

if TYPE_CHECKING:
    from ..models import LoadedModel


def common_prefix_length(a: list[int], b: list[int]) -> int:
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


class LocalModel:
    """A loaded model and tokenizer that opens :class:`LocalSession` objects."""

    def __init__(self, loaded: LoadedModel) -> None:
        self.loaded = loaded
        self.model = loaded.model
        self.name = loaded.name
        self.text = TokenizerText(
            loaded.tokenizer, loaded.model, loaded.context_window, loaded.name
        )
        self.live_sessions = 0
        # transformers 5.x renamed the forward argument `past_key_values` to `cache`.
        parameters = inspect.signature(self.model.forward).parameters
        self.cache_argument = "cache" if "cache" in parameters else "past_key_values"

    @property
    def device(self) -> torch.device:
        return self.model.device

    def session(self, prompt: str, sampling: SamplingConfig) -> LocalSession:
        return LocalSession(self, prompt, sampling)


class LocalSession:
    """One request's prompt, ids and KV cache for one model."""

    def __init__(self, owner: LocalModel, prompt: str, sampling: SamplingConfig) -> None:
        self._owner = owner
        self._text = owner.text
        self._prompt = prompt
        self._text.encode(prompt)  # fail on an over-long prompt before any work
        self._chooser = TokenChooser(sampling, owner.device)
        # Full-length layers even for sliding-window models: the attention mask still applies
        # the window, and the cache can be cropped anywhere (transformers' sliding layers
        # refuse to crop once they have seen a whole window).
        self._cache: DynamicCache | None = DynamicCache()
        self._ids: list[int] = []  # ids whose keys and values are in the cache
        self._logits: torch.Tensor | None = None  # next-token logits after self._ids
        self._peeked: tuple[str, int, Token] | None = None
        self.forward_passes = 0
        self.tokens_processed = 0
        owner.live_sessions += 1

    # -- text-level questions -------------------------------------------------------------
    def peek(self, answer: str) -> Token:
        if self._peeked is not None and self._peeked[0] == answer:
            return self._peeked[2]
        ids = self._text.encode(self._prompt + answer)
        logits = self._sync(ids)
        token_id, top1, top2 = self._chooser.choose(logits)
        text = self._text.texts(ids, [token_id])[0]
        token = Token(text, top1, top2, token_id in self._text.stop_ids)
        self._peeked = (answer, token_id, token)
        return token

    def generate(
        self,
        answer: str,
        max_new_tokens: int,
        *,
        min_prob: float | None = None,
        first: Token | None = None,
    ) -> list[Token]:
        if first is not None and (self._peeked is None or self._peeked[0] != answer):
            raise ValueError("generate(first=...) must follow peek() of the same answer")
        ids = self._text.encode(self._prompt + answer)
        logits = self._sync(ids)
        new: list[int] = []
        out: list[Token] = []
        for k in range(max_new_tokens):
            if k == 0 and first is not None and self._peeked is not None:
                token_id, top1, top2 = self._peeked[1], first.top1_prob, first.top2_prob
            else:
                token_id, top1, top2 = self._chooser.choose(logits)
            new.append(token_id)
            text = self._text.texts(ids, new)[-1]
            token = Token(text, top1, top2, token_id in self._text.stop_ids)
            out.append(token)
            low = min_prob is not None and top1 < min_prob and not (k == 0 and first)
            if token.is_eos or low or k == max_new_tokens - 1:
                break
            logits = self._forward([token_id])
        return out

    def count_tokens(self, text: str) -> int:
        return self._text.count(text)

    def truncate_tokens(self, text: str, max_tokens: int) -> str:
        return self._text.truncate(text, max_tokens)

    def close(self) -> None:
        self._peeked = None
        if self._cache is not None:
            self._cache = None
            self._logits = None
            self._ids = []
            self._owner.live_sessions -= 1

    # -- the cache ----------------------------------------------------------------------------
    def _sync(self, ids: list[int]) -> torch.Tensor:
        """Logits after ``ids``, reusing the longest cached prefix."""
        if self._cache is None:
            raise RuntimeError("session is closed")
        if ids == self._ids and self._logits is not None:
            return self._logits
        keep = common_prefix_length(self._ids, ids)
        if keep == len(ids):
            keep -= 1  # the last position's logits are needed again
        if keep < len(self._ids):
            self._cache.crop(keep - len(self._ids))
            self._ids = self._ids[:keep]
            self._logits = None
        return self._forward(ids[keep:])

    @torch.inference_mode()
    def _forward(self, new_ids: list[int]) -> torch.Tensor:
        assert self._cache is not None
        window = self._text.context_window
        if window is not None and len(self._ids) + len(new_ids) > window:
            raise ContextWindowError(
                f"prompt + answer would exceed {self._owner.name}'s context window of {window}"
            )
        input_ids = torch.tensor([new_ids], dtype=torch.long, device=self._owner.device)
        output = self._owner.model(
            input_ids=input_ids,
            **{self._owner.cache_argument: self._cache},
            use_cache=True,
            logits_to_keep=1,
        )
        self._ids.extend(new_ids)
        self._logits = output.logits[0, -1]
        self.forward_passes += 1
        self.tokens_processed += len(new_ids)
        return self._logits
