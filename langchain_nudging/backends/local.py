"""Transformers causal LMs in this process, one KV cache per (request, model).

:class:`LocalModel` is the transformers :class:`~.base.TextModel`. Its sessions are cached
sessions (backends/cached.py) whose model calls are forward passes: a question about new text
crops the session's cache where its ids and the new ones part and runs the model over the
remaining ids only, asking for logits only where a choice is needed (the last position, or
every word boundary of a draft being verified). Each pass is a :class:`~.base.Work` for the
session's scheduler; the model is its own :class:`~.base.WorkRunner`, running several sessions'
passes as one batched call (:func:`forward_together`). A constrained request's session also
holds a grammar matcher (grammar.py) that masks each choice.
"""

from __future__ import annotations

import inspect
import threading
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from ..config import SamplingConfig
from .base import (
    RUN_ALONE,
    Capabilities,
    ChatTemplate,
    ContextWindowError,
    Scheduler,
    TokenCount,
    Work,
)
from .cached import CachedSession, Choice, common_prefix_length
from .chat_template import template_of
from .grammar import AnswerMatcher, GrammarTokenizer
from .hf import TokenChooser, TokenizerText

if TYPE_CHECKING:
    from ..models import LoadedModel


class LocalModel:
    """A loaded model and tokenizer: opens :class:`LocalSession` objects and runs their
    forward passes (alone, or several sessions' as one batched call)."""

    capabilities = Capabilities(batches_itself=False, grammars=True, grammar_mass=True)
    batchable = True  # as a WorkRunner: an engine may batch sessions' passes

    def __init__(self, loaded: LoadedModel) -> None:
        self.loaded = loaded
        self.model = loaded.model
        self.name = loaded.name
        self.text = TokenizerText(
            loaded.tokenizer, loaded.model, loaded.context_window, loaded.name
        )
        self.chat_template: ChatTemplate | None = template_of(loaded.tokenizer)
        self.live_sessions = 0
        self.last_batch: _Batch | None = None  # the latest batched call, while reusable
        self._sessions_lock = threading.Lock()  # sessions open and close on several threads
        self._forward_lock = _forward_lock(self.model)
        head = self.model.get_output_embeddings()
        width = head.weight.shape[0] if head is not None else len(loaded.tokenizer)
        self.grammar = GrammarTokenizer.of(loaded.tokenizer, width, self.text.eos_ids)
        # transformers 5.x renamed the forward argument `past_key_values` to `cache`.
        parameters = inspect.signature(self.model.forward).parameters
        self.cache_argument = "cache" if "cache" in parameters else "past_key_values"

    @property
    def device(self) -> torch.device:
        return self.model.device

    # -- TextModel ----------------------------------------------------------------------------
    def session(
        self,
        prompt: str,
        sampling: SamplingConfig,
        *,
        grammar: str | None = None,
        scheduler: Scheduler = RUN_ALONE,
    ) -> LocalSession:
        return LocalSession(self, prompt, sampling, grammar, scheduler)

    def prompt_tokens(self, prompt: str) -> int:
        return len(self.text.encode(prompt))

    def counter(self) -> TokenCount:
        return self.text.counter()

    def truncate_tokens(self, text: str, max_tokens: int) -> str:
        return self.text.truncate(text, max_tokens)

    def token_ids(self, text: str) -> list[int]:
        return self.text.encode_plain(text)

    def prepare(self, grammars: bool) -> None:
        """Build llguidance's view of the tokenizer now (about 5 s for a 262k vocabulary, once
        per process), so that it is not built inside a request."""
        if grammars:
            self.grammar.build()

    def prepared(self, grammars: bool) -> bool:
        return not grammars or self.grammar.built

    # -- WorkRunner ---------------------------------------------------------------------------
    def run_together(self, works: Sequence[Work]) -> list[torch.Tensor]:
        """The sessions' passes (each work's payload, a :class:`Step`) as one call."""
        return forward_together(self, [work.payload for work in works])

    def lock(self) -> threading.Lock:
        """Held around each forward pass: one per module, process-wide, so models sharing
        weights (two pairs with one base model) do not run them twice at once either."""
        return self._forward_lock

    def _opened(self, change: int) -> None:
        with self._sessions_lock:
            self.live_sessions += change


_FORWARD_LOCKS: weakref.WeakKeyDictionary[object, threading.Lock] = weakref.WeakKeyDictionary()
_FORWARD_LOCKS_GUARD = threading.Lock()


def _forward_lock(module: object) -> threading.Lock:
    with _FORWARD_LOCKS_GUARD:
        try:
            return _FORWARD_LOCKS.setdefault(module, threading.Lock())
        except TypeError:  # a module that cannot be weakly referenced: one lock per wrapper
            return threading.Lock()


def width_class(width: int) -> int:
    """Which passes a batched call takes together, by how many ids they read.

    A batched call pads every pass to the widest: a prompt's first pass (hundreds of ids)
    batched with one-token steps would make each of them that wide. So 0 for one id (a decoding
    step), 1 for 2-16 (a draft verified, a short re-read), then 2 for 17-64, 3 for 65-256, ...
    (prompts).
    """
    if width <= 16:
        return 0 if width <= 1 else 1
    level, bound = 2, 64
    while width > bound:
        level, bound = level + 1, bound * 4
    return level


@dataclass(eq=False)
class KVCache:
    """A session's KV cache and the ids whose keys and values it holds (``cache`` is
    ``None`` once the session is closed)."""

    cache: DynamicCache | None = field(default_factory=DynamicCache)
    ids: list[int] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Step:
    """One session's forward pass: the ids to read after its cache, and where logits are
    needed (indices into ``new_ids``)."""

    kv: KVCache
    new_ids: list[int]
    positions: list[int]


class LocalSession(CachedSession):
    """One request's prompt, ids and KV cache for one model."""

    def __init__(
        self,
        owner: LocalModel,
        prompt: str,
        sampling: SamplingConfig,
        grammar: str | None,
        scheduler: Scheduler,
    ) -> None:
        self._owner = owner
        self._scheduler = scheduler
        super().__init__(owner.text, prompt, grammar)  # fails on an over-long prompt
        self._chooser = TokenChooser(sampling, owner.device)
        # The repetition controls read the answer's ids: those after the prompt's. A choice
        # is still a function of the ids before it, so the choice tree stays valid.
        self._penalized = sampling.penalized
        self._prompt_ids = self._encoder.encode("") if self._penalized else []
        # Full-length layers even for sliding-window models: the attention mask still applies
        # the window, and the cache can be cropped anywhere (transformers' sliding layers
        # refuse to crop once they have seen a whole window).
        self.kv = KVCache()
        owner._opened(1)

    def allowed_mass(self, answer: str, grammar: str) -> float:
        """Probability (raw softmax) that the next token after ``answer`` is one ``grammar``
        allows: how likely this model is to start writing what the grammar describes."""
        self._check_open()
        ids = self._encoder.encode(answer)
        row = self._logits_after(ids, [len(ids)])[0].float()
        matcher = self._new_matcher(grammar)
        allowed = matcher.allowed(matcher.answer_ids(answer)).to(row.device)
        return float(torch.softmax(row, dim=-1)[allowed].sum())

    # -- CachedSession ------------------------------------------------------------------------
    def _choose(
        self, ids: list[int], lengths: list[int], grammar_ids: Mapping[int, list[int]]
    ) -> list[Choice]:
        rows = self._logits_after(ids, lengths)
        matcher = self._matcher
        start = common_prefix_length(self._prompt_ids, ids) if self._penalized else 0
        return [
            self._chooser.choose(
                row,
                None if matcher is None else matcher.allowed(grammar_ids[n]),
                ids[start:n] if self._penalized else (),
            )
            for n, row in zip(lengths, rows, strict=True)
        ]

    def _new_matcher(self, grammar: str) -> AnswerMatcher:
        return self._owner.grammar.matcher(grammar)

    def _release(self) -> None:
        self.kv.cache = None
        self.kv.ids = []
        last = self._owner.last_batch
        if last is not None and self.kv in last.kvs:
            self._owner.last_batch = None  # its cache would outlive the session
        self._owner._opened(-1)

    # -- the cache -----------------------------------------------------------------------------
    def _logits_after(self, ids: list[int], lengths: list[int]) -> torch.Tensor:
        """Logits after ``ids[:n]`` for each ``n`` in ``lengths`` (sorted), reusing the cache.

        The pass reads from where the cache and ids fork, and at least from the first position
        whose logits are needed (its key and value may be cached).
        """
        kv = self.kv
        assert kv.cache is not None
        start = min(common_prefix_length(kv.ids, ids), lengths[0] - 1)
        if start < len(kv.ids):
            kv.cache.crop(start - len(kv.ids))
            del kv.ids[start:]
        return self._forward(ids[start:], [n - 1 - start for n in lengths])

    def _forward(self, new_ids: list[int], positions: list[int]) -> torch.Tensor:
        """Run ``new_ids`` through the model; the logits at ``positions`` (indices into it).

        Only those rows go through the output layer: with a large vocabulary it costs as much
        as the rest of the model per position. The pass goes through the session's scheduler,
        which may run it together with other sessions' passes.
        """
        window = self._owner.text.context_window
        if window is not None and len(self.kv.ids) + len(new_ids) > window:
            raise ContextWindowError(
                f"prompt + answer would exceed {self._owner.name}'s context window of {window}"
            )
        first = not self.kv.ids  # the session's first pass reads its prompt
        step = Step(self.kv, new_ids, positions)
        rows: torch.Tensor = self._scheduler.run(
            Work(self._owner, width_class(len(new_ids)), first, step)
        )
        self._count_pass(len(new_ids))
        return rows


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
        last_only = step.positions == [len(step.new_ids) - 1]
        output = model(
            input_ids=torch.tensor([step.new_ids], dtype=torch.long, device=device),
            **{owner.cache_argument: step.kv.cache},
            use_cache=True,
            logits_to_keep=1 if last_only else torch.tensor(step.positions, device=device),
        )
        step.kv.ids.extend(step.new_ids)
        return [output.logits[0]]
    # Rows in a fixed order (by session), so the same sessions make the same batch whatever
    # order their passes arrived in.
    order = sorted(range(len(steps)), key=lambda i: id(steps[i].kv))
    steps = [steps[i] for i in order]
    kvs = [step.kv for step in steps]
    pasts = [len(kv.ids) for kv in kvs]
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
    batch_cache = last.cache if last is not None and last.holds(kvs) else None
    if batch_cache is None:
        batch_cache = _stacked(kvs, pasts, past, device)
    owner.last_batch = None
    output = model(
        input_ids=ids,
        attention_mask=mask,
        position_ids=positions,
        **{owner.cache_argument: batch_cache},
        use_cache=True,
        logits_to_keep=torch.tensor(keep, device=device),
    )
    grown = _layers_of(batch_cache)
    for b, kv in enumerate(kvs):
        rows = slice(past - pasts[b], past + widths[b])
        kv.cache = _cache_of(
            [(keys[b : b + 1, :, rows], values[b : b + 1, :, rows]) for keys, values in grown]
        )
        kv.ids.extend(steps[b].new_ids)
    if len(set(widths)) == 1:
        owner.last_batch = _Batch(kvs, batch_cache)
    rows_of = [
        output.logits[b, [keep.index(p) for p in step.positions]] for b, step in enumerate(steps)
    ]
    return [rows_of[order.index(i)] for i in range(len(steps))]


class _Batch:
    """A batched call's grown cache and its sessions' caches, which are views of its rows."""

    def __init__(self, kvs: list[KVCache], cache: DynamicCache) -> None:
        self.kvs = kvs
        self.cache = cache
        # A session's cache changes object when cropped, extended alone or closed.
        self.keys = [_first_keys(kv) for kv in kvs]

    def holds(self, kvs: list[KVCache]) -> bool:
        """The same sessions, each one's cache still exactly its row of this batch's cache."""
        return len(kvs) == len(self.kvs) and all(
            kv is mine and kv.cache is not None and _first_keys(kv) is keys
            for kv, mine, keys in zip(kvs, self.kvs, self.keys, strict=True)
        )


def _layers_of(cache: DynamicCache | None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each layer's keys and values (of an open session's cache, or a batch cache: their
    layers are filled dynamic layers)."""
    assert cache is not None
    layers = []
    for layer in cache.layers:
        assert isinstance(layer, DynamicLayer)
        assert layer.keys is not None
        assert layer.values is not None
        layers.append((layer.keys, layer.values))
    return layers


def _first_keys(kv: KVCache) -> torch.Tensor:
    """The first layer's keys of a session's cache: a new object after a crop, a pass run
    alone or a batched call."""
    return _layers_of(kv.cache)[0][0]


def _cache_of(layers: list[tuple[torch.Tensor, torch.Tensor]]) -> DynamicCache:
    """A cache holding these keys and values as they are (``DynamicCache(data)`` copies them)."""
    cache = DynamicCache()
    for keys, values in layers:
        layer = DynamicLayer()
        layer.lazy_initialization(keys, values)
        layer.keys, layer.values = keys, values
        cache.layers.append(layer)
    return cache


def _stacked(kvs: list[KVCache], pasts: list[int], past: int, device: torch.device) -> DynamicCache:
    """The sessions' caches, each left-padded with zeros to ``past`` tokens, as one batch."""
    if past == 0:
        return DynamicCache()
    own = [_layers_of(kv.cache) if n else [] for kv, n in zip(kvs, pasts, strict=True)]
    filled = next(layers for layers in own if layers)
    stacked = []
    for index, (first_keys, first_values) in enumerate(filled):
        shape = (len(kvs), first_keys.shape[1], past, first_keys.shape[3])
        keys = first_keys.new_zeros(shape, device=device)
        values = first_values.new_zeros(shape, device=device)
        for b, (layers, n) in enumerate(zip(own, pasts, strict=True)):
            if n:
                keys[b, :, past - n :] = layers[index][0][0]
                values[b, :, past - n :] = layers[index][1][0]
        stacked.append((keys, values))
    return _cache_of(stacked)
