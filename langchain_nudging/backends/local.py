"""Transformers causal LMs in this process, one KV cache per (request, model).

A session keeps the ids whose keys and values sit in its cache. Asking about new text
re-tokenizes ``prompt + answer``, keeps the longest common id prefix, crops the cache there and
runs the model over the remaining ids only, asking for logits only where a choice is needed:
the last position, or every word boundary of a draft being verified. Every choice made is
remembered: the model never runs twice to choose after the same ids. A constrained request's
session also holds a grammar matcher (grammar.py) that masks each choice.
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from ..config import SamplingConfig
from .base import ContextWindowError, Token
from .grammar import AnswerMatcher, GrammarTokenizer
from .hf import StopFinder, TokenChooser, TokenizerText, common_prefix_length, window_full

if TYPE_CHECKING:
    from ..models import LoadedModel

Choice = tuple[int, float, float]  # (token id, top-1 probability, top-2 probability)
_CHOICE = -1  # a trie node's key for the choice after it (token ids are >= 0)


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
        self.last_batch: _Batch | None = None  # the latest batched call, while reusable
        self.lock = threading.Lock()  # sessions open and close on several threads
        head = self.model.get_output_embeddings()
        width = head.weight.shape[0] if head is not None else len(loaded.tokenizer)
        self.grammar = GrammarTokenizer.of(loaded.tokenizer, width, self.text.eos_ids)
        # transformers 5.x renamed the forward argument `past_key_values` to `cache`.
        parameters = inspect.signature(self.model.forward).parameters
        self.cache_argument = "cache" if "cache" in parameters else "past_key_values"

    @property
    def device(self) -> torch.device:
        return self.model.device

    def session(
        self, prompt: str, sampling: SamplingConfig, grammar: str | None = None
    ) -> LocalSession:
        return LocalSession(self, prompt, sampling, grammar)


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

    def known(self, ids: list[int], lengths: Sequence[int]) -> dict[int, Choice]:
        """The choices after ``ids[:n]`` for each ``n`` in ``lengths`` that has one."""
        nodes = self._walk(ids, max(lengths, default=0), create=False)
        found = {}
        for n in lengths:
            if n < len(nodes) and _CHOICE in nodes[n]:
                found[n] = nodes[n][_CHOICE]
        return found

    def add(self, ids: list[int], choices: dict[int, Choice]) -> None:
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


class LocalSession:
    """One request's prompt, ids and KV cache for one model.

    The cache holds the keys and values of ``_ids``; a :class:`ChoiceTree`
    remembers every choice made, so the model runs only for prefixes never looked at.
    """

    def __init__(
        self,
        owner: LocalModel,
        prompt: str,
        sampling: SamplingConfig,
        grammar: str | None = None,
    ) -> None:
        self._owner = owner
        self._text = owner.text
        self._prompt = prompt
        self._encoder = owner.text.encoder(prompt)  # fails on an over-long prompt
        self._counter = owner.text.counter()
        self._chooser = TokenChooser(sampling, owner.device)
        # Only a constrained request has a matcher: the others never compute a mask.
        self._matcher: AnswerMatcher | None = owner.grammar.matcher(grammar) if grammar else None
        # Full-length layers even for sliding-window models: the attention mask still applies
        # the window, and the cache can be cropped anywhere (transformers' sliding layers
        # refuse to crop once they have seen a whole window).
        self._cache: DynamicCache | None = DynamicCache()
        self._ids: list[int] = []  # ids whose keys and values are in the cache
        self._choices = ChoiceTree()
        self._peeked: str | None = None  # the answer of the last peek
        self.forward_passes = 0
        self.tokens_processed = 0
        self.choices_reused = 0  # tokens answered from the path without a forward pass
        with owner.lock:
            owner.live_sessions += 1

    # -- text-level questions -------------------------------------------------------------
    def peek(self, answer: str) -> Token:
        return next(self.peek_each([answer]))

    def peek_each(self, answers: Sequence[str]) -> Iterator[Token]:
        """Every answer whose ids extend into the longest one's is verified in one pass.

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
            self._look_along(longest, prefixes, grammar_ids=grammar_ids)
        for answer, ids in zip(answers, all_ids, strict=True):
            token_id, top1, top2 = self._choose_after(ids, grammar_ids, counted=False)
            self._peeked = answer
            text = self._text.texts(ids, [token_id])[0]
            yield Token(text, top1, top2, token_id in self._text.stop_ids)

    def generate(
        self,
        answer: str,
        max_new_tokens: int,
        *,
        min_prob: float | None = None,
        first: Token | None = None,
        stop: Sequence[str] = (),
    ) -> list[Token]:
        if first is not None and self._peeked != answer:
            raise ValueError("generate(first=...) must follow peek() of the same answer")
        ids = self._encoder.encode(answer)
        path = list(ids)
        grammar_path = self._matcher.answer_ids(answer) if self._matcher is not None else []
        detokenizer = self._text.detokenizer(ids)
        stops = StopFinder(stop, answer)
        out: list[Token] = []
        while True:
            choice = self._choose_after(path, {len(path): grammar_path})  # peeks are remembered
            token_id, top1, top2 = choice
            ends = token_id in self._text.stop_ids
            text = detokenizer.add(token_id)
            out.append(Token(text, top1, top2, ends))
            low = min_prob is not None and top1 < min_prob and not (len(out) == 1 and first)
            if ends or low or stops.found(text) or window_full(out, max_new_tokens, detokenizer):
                return out
            path.append(token_id)
            grammar_path.append(token_id)

    def count_tokens(self, text: str) -> int:
        return self._counter.count(text)

    def truncate_tokens(self, text: str, max_tokens: int) -> str:
        return self._text.truncate(text, max_tokens)

    def allowed_mass(self, answer: str, grammar: str) -> float:
        """Probability (raw softmax) that the next token after ``answer`` is one ``grammar``
        allows: how likely this model is to start writing what the grammar describes."""
        if self._cache is None:
            raise RuntimeError("session is closed")
        ids = self._encoder.encode(answer)
        row = self._logits_after(ids, [len(ids)])[0].float()
        matcher = self._owner.grammar.matcher(grammar)
        allowed = matcher.allowed(matcher.answer_ids(answer)).to(row.device)
        return float(torch.softmax(row, dim=-1)[allowed].sum())

    def constrain(self, grammar: str | None) -> None:
        """Constrain every choice from now on by ``grammar`` (choices made before are dropped)."""
        self._matcher = self._owner.grammar.matcher(grammar) if grammar else None
        self._choices = ChoiceTree()

    @property
    def grammar_masks(self) -> int:
        """Grammar masks computed so far (0 for an unconstrained request)."""
        return self._matcher.mask_calls if self._matcher is not None else 0

    def close(self) -> None:
        self._peeked = None
        self._matcher = None
        self._choices = ChoiceTree()
        if self._cache is not None:
            self._cache = None
            self._ids = []
            last = self._owner.last_batch
            if last is not None and self in last.sessions:
                self._owner.last_batch = None  # its cache would outlive the session
            with self._owner.lock:
                self._owner.live_sessions -= 1

    # -- choices and the cache ---------------------------------------------------------------
    def _choose_after(
        self, ids: list[int], grammar_ids: dict[int, list[int]], counted: bool = True
    ) -> Choice:
        """The token chosen after ``ids``: remembered, or from logits reusing the cache."""
        return self._look_along(ids, {len(ids)}, counted, grammar_ids)[len(ids)]

    def _look_along(
        self,
        ids: list[int],
        prefixes: set[int],
        counted: bool = True,
        grammar_ids: dict[int, list[int]] | None = None,
    ) -> dict[int, Choice]:
        """The choice after each ``ids[:n]`` (``n`` in ``prefixes``); new ones in one pass.

        Under a grammar, ``grammar_ids[n]`` is the answer of ``ids[:n]`` in the matcher's ids.
        """
        if self._cache is None:
            raise RuntimeError("session is closed")
        known = self._choices.known(ids, prefixes)
        missing = sorted(prefixes - known.keys())
        if counted:
            self.choices_reused += len(known)
        if not missing:
            return known
        rows = self._logits_after(ids, missing)
        matcher = self._matcher
        new = {
            n: self._chooser.choose(
                row, None if matcher is None else matcher.allowed((grammar_ids or {})[n])
            )
            for n, row in zip(missing, rows, strict=True)
        }
        self._choices.add(ids, new)
        return known | new

    def _logits_after(self, ids: list[int], lengths: list[int]) -> torch.Tensor:
        """Logits after ``ids[:n]`` for each ``n`` in ``lengths`` (sorted), reusing the cache.

        The pass reads from where the cache and ids fork, and at least from the first position
        whose logits are needed (its key and value may be cached).
        """
        assert self._cache is not None
        start = min(common_prefix_length(self._ids, ids), lengths[0] - 1)
        if start < len(self._ids):
            self._cache.crop(start - len(self._ids))
            del self._ids[start:]
        return self._forward(ids[start:], [n - 1 - start for n in lengths])

    def _forward(self, new_ids: list[int], positions: list[int]) -> torch.Tensor:
        """Run ``new_ids`` through the model; the logits at ``positions`` (indices into it).

        Only those rows go through the output layer: with a large vocabulary it costs as much
        as the rest of the model per position. In a thread served by an engine's batcher
        (:func:`serve_passes_through`), the pass runs together with other sessions' passes.
        """
        assert self._cache is not None
        window = self._text.context_window
        if window is not None and len(self._ids) + len(new_ids) > window:
            raise ContextWindowError(
                f"prompt + answer would exceed {self._owner.name}'s context window of {window}"
            )
        step = Step(self, new_ids, positions)
        batcher: Callable[[LocalModel, Step], torch.Tensor] | None
        batcher = getattr(_THIS_THREAD, "batcher", None)
        if batcher is not None:
            rows = batcher(self._owner, step)
        else:
            rows = forward_together(self._owner, [step])[0]
        self.forward_passes += 1
        self.tokens_processed += len(new_ids)
        return rows


_THIS_THREAD = threading.local()


def serve_passes_through(batcher: Callable[[LocalModel, Step], torch.Tensor] | None) -> None:
    """Route the current thread's forward passes through ``batcher`` (``None``: run them here).

    An engine that batches requests calls this in each request's thread: the batcher runs the
    pass together with other requests' passes of the same model (:func:`forward_together`).
    """
    _THIS_THREAD.batcher = batcher


@dataclass(frozen=True, slots=True)
class Step:
    """One session's forward pass: the ids to read and where logits are needed."""

    session: LocalSession
    new_ids: list[int]
    positions: list[int]

    @property
    def first(self) -> bool:
        """The session's first pass: it reads the prompt, nothing is cached yet."""
        return not self.session._ids


@torch.inference_mode()
def forward_together(owner: LocalModel, steps: Sequence[Step]) -> list[torch.Tensor]:
    """Run several sessions' passes of one model as one batched call; each step's logit rows.

    Each session keeps its own cache. For the call, the caches are left-padded to the longest
    and stacked, the new ids right-padded to the longest, with a 2-D attention mask and explicit
    positions. Left padding keeps every token's distance to the others, so sliding-window layers
    see what they see alone. Afterwards each session's cache is its own rows of the grown batch
    cache (views, not copies), so when the same sessions step together again, each one's cache
    untouched since and the last call's ids all of one width (no padding between a row's tokens),
    that batch cache is used as it is instead of being stacked again. A single step runs exactly
    as a lone request always has (no mask, no padding).
    """
    model, device = owner.model, owner.device
    if len(steps) == 1:
        (step,) = steps
        session = step.session
        last_only = step.positions == [len(step.new_ids) - 1]
        output = model(
            input_ids=torch.tensor([step.new_ids], dtype=torch.long, device=device),
            **{owner.cache_argument: session._cache},
            use_cache=True,
            logits_to_keep=1 if last_only else torch.tensor(step.positions, device=device),
        )
        session._ids.extend(step.new_ids)
        return [output.logits[0]]
    # Rows in a fixed order (by session), so the same sessions make the same batch whatever
    # order their passes arrived in.
    order = sorted(range(len(steps)), key=lambda i: id(steps[i].session))
    steps = [steps[i] for i in order]
    sessions = [step.session for step in steps]
    pasts = [len(session._ids) for session in sessions]
    widths = [len(step.new_ids) for step in steps]
    past, width = max(pasts), max(widths)
    ids = torch.zeros((len(steps), width), dtype=torch.long, device=device)
    mask = torch.zeros((len(steps), past + width), dtype=torch.long, device=device)
    for b, step in enumerate(steps):
        ids[b, : widths[b]] = torch.tensor(step.new_ids, dtype=torch.long)
        mask[b, past - pasts[b] : past + widths[b]] = 1
    positions = torch.tensor(pasts, device=device)[:, None] + torch.arange(width, device=device)
    keep = sorted({p for step in steps for p in step.positions})
    last = owner.last_batch
    batch_cache = last.cache if last is not None and last.holds(sessions) else None
    if batch_cache is None:
        batch_cache = _stacked(sessions, pasts, past, device)
    owner.last_batch = None
    output = model(
        input_ids=ids,
        attention_mask=mask,
        position_ids=positions,
        **{owner.cache_argument: batch_cache},
        use_cache=True,
        logits_to_keep=torch.tensor(keep, device=device),
    )
    for b, session in enumerate(sessions):
        rows = slice(past - pasts[b], past + widths[b])
        session._cache = _cache_of(
            [
                (layer.keys[b : b + 1, :, rows], layer.values[b : b + 1, :, rows])
                for layer in batch_cache.layers
            ]
        )
        session._ids.extend(steps[b].new_ids)
    if len(set(widths)) == 1:
        owner.last_batch = _Batch(sessions, batch_cache)
    rows_of = [
        output.logits[b, [keep.index(p) for p in step.positions]] for b, step in enumerate(steps)
    ]
    return [rows_of[order.index(i)] for i in range(len(steps))]


class _Batch:
    """A batched call's grown cache and its sessions, whose caches are views of its rows."""

    def __init__(self, sessions: list[LocalSession], cache: DynamicCache) -> None:
        self.sessions = sessions
        self.cache = cache
        # A session's cache changes object when cropped, extended alone or closed.
        self.keys = [session._cache.layers[0].keys for session in sessions]

    def holds(self, sessions: list[LocalSession]) -> bool:
        """The same sessions, each one's cache still exactly its row of this batch's cache."""
        return len(sessions) == len(self.sessions) and all(
            session is mine and session._cache is not None and session._cache.layers[0].keys is keys
            for session, mine, keys in zip(sessions, self.sessions, self.keys, strict=True)
        )


def _cache_of(layers: list[tuple[torch.Tensor, torch.Tensor]]) -> DynamicCache:
    """A cache holding these keys and values as they are (``DynamicCache(data)`` copies them)."""
    cache = DynamicCache()
    for keys, values in layers:
        layer = DynamicLayer()
        layer.lazy_initialization(keys, values)
        layer.keys, layer.values = keys, values
        cache.layers.append(layer)
    return cache


def _stacked(
    sessions: list[LocalSession], pasts: list[int], past: int, device: torch.device
) -> DynamicCache:
    """The sessions' caches, each left-padded with zeros to ``past`` tokens, as one batch."""
    if past == 0:
        return DynamicCache()
    filled = next(s._cache for s, n in zip(sessions, pasts, strict=True) if n)
    assert filled is not None
    layers = []
    for index, layer in enumerate(filled.layers):
        shape = (len(sessions), layer.keys.shape[1], past, layer.keys.shape[3])
        keys = layer.keys.new_zeros(shape, device=device)
        values = layer.values.new_zeros(shape, device=device)
        for b, (session, n) in enumerate(zip(sessions, pasts, strict=True)):
            if n:
                assert session._cache is not None
                keys[b, :, past - n :] = session._cache.layers[index].keys[0]
                values[b, :, past - n :] = session._cache.layers[index].values[0]
        layers.append((keys, values))
    return _cache_of(layers)
