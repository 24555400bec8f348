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
    """One request's prompt, ids and KV cache for one model.

    The session also remembers the token it chose after every prefix of its current ids, so a
    question about text it has already read and continued (a draft whose first words were
    accepted, a peek followed by a window) reuses those choices instead of running the model:
    greedy choices depend only on the ids before them.
    """

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
        self._path: list[int] = []  # self._ids and the ids chosen after them, not yet read
        self._choices: dict[int, tuple[int, float, float]] = {}  # after _path[:n]: the choice
        self._peeked: str | None = None  # the answer of the last peek
        self.forward_passes = 0
        self.tokens_processed = 0
        owner.live_sessions += 1

    # -- text-level questions -------------------------------------------------------------
    def peek(self, answer: str) -> Token:
        ids = self._text.encode(self._prompt + answer)
        token_id, top1, top2 = self._choose_after(ids)
        text = self._text.texts(ids, [token_id])[0]
        self._peeked = answer
        return Token(text, top1, top2, token_id in self._text.stop_ids)

    def generate(
        self,
        answer: str,
        max_new_tokens: int,
        *,
        min_prob: float | None = None,
        first: Token | None = None,
    ) -> list[Token]:
        if first is not None and self._peeked != answer:
            raise ValueError("generate(first=...) must follow peek() of the same answer")
        ids = self._text.encode(self._prompt + answer)
        path = list(ids)
        chosen: list[tuple[int, float, float]] = []
        for k in range(max_new_tokens):
            choice = self._choose_after(path)  # a peek's choice is remembered
            chosen.append(choice)
            token_id, top1, _ = choice
            low = min_prob is not None and top1 < min_prob and not (k == 0 and first)
            if token_id in self._text.stop_ids or low:
                break
            path.append(token_id)
        texts = self._text.texts(ids, [token_id for token_id, _, _ in chosen])
        return [
            Token(text, top1, top2, token_id in self._text.stop_ids)
            for text, (token_id, top1, top2) in zip(texts, chosen, strict=True)
        ]

    def count_tokens(self, text: str) -> int:
        return self._text.count(text)

    def truncate_tokens(self, text: str, max_tokens: int) -> str:
        return self._text.truncate(text, max_tokens)

    def close(self) -> None:
        self._peeked = None
        self._choices = {}
        if self._cache is not None:
            self._cache = None
            self._logits = None
            self._ids = []
            self._path = []
            self._owner.live_sessions -= 1

    # -- the cache ----------------------------------------------------------------------------
    def _choose_after(self, ids: list[int]) -> tuple[int, float, float]:
        """The token chosen after ``ids``: remembered, or from logits reusing the cache."""
        if self._cache is None:
            raise RuntimeError("session is closed")
        keep = common_prefix_length(self._path, ids)
        if keep < len(self._path):
            self._choices = {n: c for n, c in self._choices.items() if n <= keep}
        if keep < len(self._ids):
            self._cache.crop(keep - len(self._ids))
            self._ids = self._ids[:keep]
            self._logits = None
        self._path = list(ids)
        choice = self._choices.get(len(ids))
        if choice is None:
            choice = self._choices[len(ids)] = self._chooser.choose(self._logits_after_path())
        return choice

    def _logits_after_path(self) -> torch.Tensor:
        unread = self._path[len(self._ids) :]
        if unread:
            return self._forward(unread)
        if self._logits is None:  # read, but its logits are gone: read the last id again
            assert self._cache is not None
            self._cache.crop(-1)
            last = self._ids.pop()
            return self._forward([last])
        return self._logits

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
