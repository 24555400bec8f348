"""A model on a llama.cpp server (``llama-server``), as a :class:`~.base.TextModel`.

The dialect uses the server's native API (docs/servers.md says why and what it measured):

* ``/completion`` with token-id prompts, ``n_probs`` (the raw softmax: ``post_sampling_probs``
  is never asked), ``return_tokens``, ``cache_prompt`` and ``temperature: 0`` sent explicitly
  for greedy choices (the server's default is 0.8). Each session pins one of the server's
  slots (``id_slot``) for its life, so the slot's KV cache holds the request's ids and every
  question re-reads only the ids after the common prefix. When every slot is pinned by this
  process's live sessions, a new session waits up to ``slot_wait`` seconds, then fails.
* Questions about one position (a peek, a draft's word boundaries) are one-token completions
  on the warm slot, asked lazily; a window is one streamed completion that the session
  closes at the first token ending it (unsure, a stop string, end of turn), which stops the
  server generating.
* Tokens are counted, and text tokenized, by the server's ``/tokenize`` (the server's own
  tokenizer is the one whose ids it reads), asked only about the end of a text that grows
  (backends/cached.py's ``PromptEncoder``); what each chosen token adds to the answer comes
  with it (its ``bytes``), so nothing is decoded by joining piece strings. A token whose text
  is empty is a control token (end of turn, or another special token): it ends the answer.
* Grammars (tool calls, structured output): a server applies a grammar only from the start
  of a completion, so the session checks the candidates itself. llguidance follows the answer
  byte by byte (its byte tokenizer, which needs no vocabulary) and each constrained choice is
  the most likely (or, sampling, a sampled) candidate among the server's top ``k`` that the
  grammar allows; where the grammar allows one text only, that text's first token; else
  ``k`` grows from 32. Gamma still compares the raw top-1 probability.

A server URL given without a prefix is recognized by ``/props``. :func:`serve_gguf` runs a
llama.cpp server of this process's own for a GGUF model (``runtime="llamacpp"``).
"""

from __future__ import annotations

import codecs
import math
import random
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from collections.abc import Set as AbstractSet
from contextlib import nullcontext
from typing import Any

import llguidance

from ..config import SamplingConfig
from .base import (
    RUN_ALONE,
    Capabilities,
    ChatTemplate,
    ContextWindowError,
    Scheduler,
    SessionStats,
    Token,
    TokenCount,
    Work,
    controls_of,
)
from .cached import (
    CARRY_TOKENS,
    CachedSession,
    Choice,
    PromptEncoder,
    cut_window,
    cuts_at_words,
)
from .http import ServerClient, ServerError, check_params, register_dialect, resumed
from .penalties import server_refusal

#: Candidates asked for per constrained choice, in turn, until the grammar allows one.
GRAMMAR_CANDIDATES = (32, 1024, 1 << 20)
DEFAULT_SLOT_WAIT = 60.0  # seconds a session waits for one of the server's slots


class GrammarViolationError(RuntimeError):
    """No token the server offers fits the grammar (or the answer does not fit it)."""


def _recognizes(client: ServerClient) -> bool:
    try:
        props = client.get("/props", retry=False)
    except (ServerError, ContextWindowError):
        return False
    return isinstance(props, dict) and "default_generation_settings" in props


class LlamaCppModel:
    """One llama.cpp server's model: opens sessions pinned to its slots; its work runs in the
    requesting thread (the server batches concurrent requests itself)."""

    capabilities = Capabilities(batches_itself=True, grammars=True, grammar_mass=False)
    batchable = False  # as a WorkRunner: the server batches by itself

    def __init__(
        self,
        client: ServerClient,
        *,
        slot_wait: float | None = None,
        window_chunk: int | None = None,
    ) -> None:
        self.client = client
        self.url = client.url
        #: ``None``: a window is one streamed completion; a number: completions of that many
        #: tokens, one after the other (benchmarks/servers.py compares the two).
        self.window_chunk = window_chunk
        try:
            props = client.get("/props")
        except ServerError as exc:
            raise ServerError(f"{self.url} is not a llama.cpp server: {exc}") from None
        if not isinstance(props, dict) or "default_generation_settings" not in props:
            raise ServerError(
                f"{self.url} is not a llama.cpp server: /props has no default_generation_settings"
            )
        settings = props["default_generation_settings"]
        alias = str(props.get("model_alias") or props.get("model_path") or "model")
        self.name = f"{alias.rsplit('/', 1)[-1]} @ {self.url}"
        self.context_window = int(settings.get("n_ctx") or 0) or None  # per slot
        self.total_slots = int(props.get("total_slots") or 1)
        self.slot_wait = DEFAULT_SLOT_WAIT if slot_wait is None else float(slot_wait)
        if not self.slot_wait >= 0:
            raise ValueError(f"slot_wait must be >= 0 seconds, got {slot_wait!r}")
        self.live_sessions = 0
        self._slots = _Slots(self.total_slots)
        self._lock = threading.Lock()
        #: What each token id adds to a text, learned from the server's answers.
        self.pieces: dict[int, bytes] = {}
        #: Ids that are control tokens (their text is empty): none of them is answer text.
        self.stop_ids: set[int] = set()
        self._cuts_at_words: bool | None = None
        self._control_ids: dict[str, int | None] = {}  # control_id's answers
        self._bos_ids = self.tokenize("", special=True)  # what the model puts first: its BOS
        self._bos = str(props.get("bos_token") or "") or None
        self._check_probabilities()
        self.chat_template: ChatTemplate | None = _ServerTemplate.probe(self, props)

    # -- tokens ---------------------------------------------------------------------------------
    def tokenize(self, text: str, *, special: bool = False, parse: bool = False) -> list[int]:
        """``text``'s ids by the server's tokenizer: with ``special``, as the model adds its
        BOS; with ``parse``, special-token strings become their tokens."""
        if not text and not special:
            return []
        body = {"content": text, "add_special": special, "parse_special": parse}
        return [int(t) for t in self.client.post("/tokenize", body)["tokens"]]

    def encode_plain(self, text: str) -> list[int]:
        return self.tokenize(text)

    @property
    def cuts_at_words(self) -> bool:
        """Whether the server's tokenizer may be asked about the end of a text only
        (:func:`~.cached.cuts_at_words`, checked once: about 80 short calls)."""
        if self._cuts_at_words is None:
            self._cuts_at_words = cuts_at_words(self.tokenize)
        return self._cuts_at_words

    def detokenize(self, ids: Sequence[int]) -> str:
        return str(self.client.post("/detokenize", {"tokens": list(ids)})["content"])

    def encode(self, prompt: str, answer: str = "") -> list[int]:
        """Ids of ``prompt + answer``: text throughout, but for the prompt's control markers
        (a :class:`~.base.Prompt`'s spans); BOS first unless the prompt starts with it."""
        head, at = self.head(prompt)
        ids = head + self.tokenize(prompt[at:] + answer)
        self.check_fits(ids)
        return ids

    def head(self, prompt: str) -> tuple[list[int], int]:
        """The ids of ``prompt`` up to the end of its last control marker, and where that is."""
        controls = controls_of(prompt)
        ids: list[int] = []
        if not (controls and controls[0][0] == 0 and prompt[: controls[0][1]] == self._bos):
            ids.extend(self._bos_ids)
        at = 0
        for start, end in controls:
            marker = self.control_id(prompt[start:end])
            if marker is None:
                continue  # not a control token of this model: the span stays text
            ids.extend(self.tokenize(prompt[at:start]))
            ids.append(marker)
            at = end
        return ids, at

    def control_id(self, text: str) -> int | None:
        """The id of ``text`` if it is one control token of the model (parsed as one special
        token, and not what the text is as text); asked of the server once per text."""
        if text not in self._control_ids:
            parsed = self.tokenize(text, parse=True)
            one = len(parsed) == 1 and parsed != self.tokenize(text)
            self._control_ids[text] = parsed[0] if one else None
        return self._control_ids[text]

    def check_fits(self, ids: list[int]) -> None:
        if self.context_window is not None and len(ids) >= self.context_window:
            raise ContextWindowError(
                f"the prompt for {self.name} is {len(ids)} tokens, but a slot of the server "
                f"holds {self.context_window} (including at least one answer token)"
            )

    def learn(self, entry: Mapping[str, Any]) -> int:
        """Record what a token of a server answer adds to a text; its id."""
        token_id = int(entry["id"])
        data = bytes(entry.get("bytes") or b"")
        self.pieces[token_id] = data
        if not data:
            self.stop_ids.add(token_id)
        return token_id

    # -- TextModel ----------------------------------------------------------------------------
    def session(
        self,
        prompt: str,
        sampling: SamplingConfig,
        *,
        grammar: str | None = None,
        scheduler: Scheduler = RUN_ALONE,
    ) -> LlamaCppSession:
        # llama-server has no n-gram ban (its DRY sampler is another rule).
        server_refusal(sampling, self.url, ("no_repeat_ngram_size",))
        return LlamaCppSession(self, prompt, sampling, grammar, scheduler)

    def prompt_tokens(self, prompt: str) -> int:
        return len(self.encode(prompt))

    def counter(self) -> TokenCount:
        return PromptEncoder(self, "")

    def truncate_tokens(self, text: str, max_tokens: int) -> str:
        ids = self.tokenize(text)
        if len(ids) <= max_tokens:
            return text
        return self.detokenize(ids[:max_tokens]).rstrip("\ufffd")

    def token_ids(self, text: str) -> list[int]:
        return self.tokenize(text)

    def prepare(self, grammars: bool) -> None:
        """Nothing to build: the byte-level grammar tokenizer needs no vocabulary."""

    def prepared(self, grammars: bool) -> bool:
        return True

    # -- WorkRunner -----------------------------------------------------------------------------
    def run_together(self, works: Sequence[Work]) -> list[Any]:
        """Each work's payload is a call to make; the server batches concurrent ones itself."""
        return [work.payload() for work in works]

    def lock(self) -> Any:
        return nullcontext()  # requests call the server concurrently

    # -- sessions' slots ------------------------------------------------------------------------
    def open_slot(self) -> int:
        slot = self._slots.take(self.slot_wait)
        if slot is None:
            raise ServerError(
                f"all {self.total_slots} slots of {self.url} are held by this process's "
                f"requests; waited {self.slot_wait:g} s (start the server with more "
                "--parallel slots, or give slot_wait more time)"
            )
        with self._lock:
            self.live_sessions += 1
        return slot

    def close_slot(self, slot: int) -> None:
        self._slots.give(slot)
        with self._lock:
            self.live_sessions -= 1

    def _check_probabilities(self) -> None:
        """Refuse, at connect, a server that cannot give what nudging reads."""
        probe = self.complete(self._bos_ids or self.tokenize("a"), _greedy(), n_probs=2)
        entries = probe.get("completion_probabilities")
        missing = []
        if not entries or "top_logprobs" not in entries[0]:
            missing.append("per-token top-k log-probabilities (n_probs -> top_logprobs)")
        elif "id" not in entries[0] or "bytes" not in entries[0]:
            missing.append("token ids and bytes of each probability (id, bytes)")
        if "tokens" not in probe:
            missing.append("the ids of generated tokens (return_tokens)")
        if missing:
            raise ServerError(
                f"{self.url} is a llama.cpp server, but it does not return "
                + "; ".join(missing)
                + ": nudging needs them (use a llama.cpp build from 2025 or later)"
            )

    def complete(
        self,
        ids: list[int],
        sampling: SamplingConfig,
        *,
        n_predict: int = 1,
        n_probs: int = 2,
        slot: int = -1,
        cache: bool = True,
        stream: bool = False,
    ) -> Any:
        """One ``/completion`` call (not streamed: its JSON answer)."""
        return self.client.post(
            "/completion", self.body(ids, sampling, n_predict, n_probs, slot, cache, stream)
        )

    def body(
        self,
        ids: list[int],
        sampling: SamplingConfig,
        n_predict: int,
        n_probs: int,
        slot: int,
        cache: bool,
        stream: bool,
    ) -> dict[str, Any]:
        body: dict[str, Any] = {
            "prompt": ids,
            "n_predict": n_predict,
            "n_probs": n_probs,
            "return_tokens": True,
            "cache_prompt": cache,
            "id_slot": slot,
            "stream": stream,
            "post_sampling_probs": False,
            # Only these shape the choice, as in this process (n_probs are taken before any
            # of them). The server's penalties read the last repeat_last_n ids it read.
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "top_k": sampling.top_k,
            "min_p": sampling.min_p,
            "typical_p": 1.0,
            "repeat_penalty": sampling.repetition_penalty,
            "presence_penalty": sampling.presence_penalty,
            "frequency_penalty": sampling.frequency_penalty,
            "dry_multiplier": 0.0,
            "xtc_probability": 0.0,
            "n_indent": 0,
            "samplers": _samplers(sampling),
        }
        if sampling.seed is not None:
            # One seed per position: a choice does not depend on how many calls came before.
            body["seed"] = (sampling.seed + len(ids)) % (1 << 32)
        return body


def _samplers(sampling: SamplingConfig) -> list[str]:
    """The server's sampler chain: this process's order (penalties on the raw logits first)."""
    chain = ["top_k", "top_p", "temperature"]
    if sampling.min_p:
        chain.insert(2, "min_p")
    if sampling.penalized:
        chain.insert(0, "penalties")
    return chain


def _greedy() -> SamplingConfig:
    return SamplingConfig()


class _Slots:
    """The server's slot ids this process's sessions do not hold; a bounded wait for one."""

    def __init__(self, total: int) -> None:
        self._free = list(range(total))
        self._cond = threading.Condition()

    def take(self, wait: float) -> int | None:
        deadline = time.monotonic() + wait
        with self._cond:
            while not self._free:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(left)
            return self._free.pop(0)

    def give(self, slot: int) -> None:
        with self._cond:
            self._free.append(slot)
            self._cond.notify()


def _choice(entry: Mapping[str, Any], model: LlamaCppModel) -> Choice:
    """The chosen token of one probabilities entry, with the raw top-1 and top-2."""
    top = entry.get("top_logprobs") or [entry]
    for candidate in top:
        model.learn(candidate)
    token_id = model.learn(entry)
    top1 = math.exp(float(top[0]["logprob"]))
    top2 = math.exp(float(top[1]["logprob"])) if len(top) > 1 else 0.0
    return token_id, top1, top2


class _Tokens:
    """A session's view of its model's tokens (backends/cached.py's ``SessionTokens``)."""

    def __init__(self, model: LlamaCppModel) -> None:
        self._model = model
        self.stop_ids: AbstractSet[int] = model.stop_ids

    def encoder(self, prompt: str) -> PromptEncoder:
        """``prompt + answer`` to ids: the prompt's head once, then only the text after the
        last word boundary the new text shares with the last one (backends/cached.py)."""
        return PromptEncoder(self._model, prompt)

    def counter(self) -> TokenCount:
        return PromptEncoder(self._model, "")

    def detokenizer(self, context: list[int]) -> _Bytes:
        return _Bytes(self._model)

    def truncate(self, text: str, max_tokens: int) -> str:
        return self._model.truncate_tokens(text, max_tokens)


class _Bytes:
    """What each new token adds to the text, from the bytes the server gave with it."""

    def __init__(self, model: LlamaCppModel) -> None:
        self._model = model
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self.incomplete = False

    def add(self, token_id: int) -> str:
        if token_id in self._model.stop_ids:
            return ""
        text = self._decoder.decode(self._model.pieces[token_id])
        self.incomplete = bool(self._decoder.getstate()[0])
        return text


class _ByteMatcher:
    """A grammar following the answer byte by byte (llguidance's byte tokenizer)."""

    _tokenizer = llguidance.LLTokenizer("byte")

    def __init__(self, grammar: str) -> None:
        self._grammar = grammar
        self._matcher = self._new()
        self._consumed: list[int] = []
        self.mask_calls = 0  # candidates checked

    def _new(self) -> llguidance.LLMatcher:
        matcher = llguidance.LLMatcher(self._tokenizer, self._grammar, log_level=0)
        if matcher.is_error():
            raise GrammarViolationError(f"the grammar failed to load: {_short(matcher)}")
        return matcher

    def answer_ids(self, answer: str) -> list[int]:
        return list(self._tokenizer.tokenize_bytes(answer.encode("utf-8")))

    def allowed(self, ids: list[int]) -> Any:
        """Unused: a server gives candidates, not logits to mask (:meth:`allows`)."""
        raise NotImplementedError

    def follow(self, ids: list[int]) -> None:
        """Move to the answer ``ids`` (byte ids): roll back where they part, consume the rest."""
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
        if new and self._matcher.try_consume_tokens(new) != len(new):
            self._matcher = self._new()  # an error state is sticky: start afresh
            consumed.clear()
            raise GrammarViolationError("the answer so far does not fit the grammar")
        consumed.extend(new)

    def forced_text(self) -> str:
        """The text the grammar allows next and nothing else (complete characters only)."""
        forced = bytes(self._matcher.compute_ff_bytes())
        return forced.decode("utf-8", errors="ignore") if forced else ""

    def allows(self, piece: bytes, is_stop: bool) -> bool:
        """Whether a token adding ``piece`` (or ending the answer) may come next."""
        self.mask_calls += 1
        if is_stop:
            return bool(self._matcher.is_accepting())
        ids = list(self._tokenizer.tokenize_bytes(piece))
        return bool(ids) and self._matcher.validate_tokens(ids) == len(ids)


def _short(matcher: llguidance.LLMatcher) -> str:
    return (matcher.get_error() or "").split("\n<state>")[0].strip()


class LlamaCppSession(CachedSession):
    """One request's prompt on one pinned slot of a llama.cpp server."""

    def __init__(
        self,
        model: LlamaCppModel,
        prompt: str,
        sampling: SamplingConfig,
        grammar: str | None,
        scheduler: Scheduler,
    ) -> None:
        self._model = model
        self._sampling = sampling
        self._scheduler = scheduler
        self._rng = random.Random(sampling.seed)
        self._slot = model.open_slot()
        try:
            super().__init__(_Tokens(model), prompt, grammar)
        except BaseException:
            self._free_slot()
            raise

    # -- CachedSession --------------------------------------------------------------------------
    def _new_matcher(self, grammar: str) -> _ByteMatcher:
        return _ByteMatcher(grammar)

    def _release(self) -> None:
        self._free_slot()

    def _free_slot(self) -> None:
        slot, self._slot = self._slot, -1
        if slot >= 0:
            self._model.close_slot(slot)

    def _choose(
        self, ids: list[int], lengths: list[int], grammar_ids: Mapping[int, list[int]]
    ) -> list[Choice]:
        return [self._one(ids[:n], grammar_ids.get(n)) for n in lengths]

    def _one(self, ids: list[int], grammar_ids: list[int] | None) -> Choice:
        """The choice after ``ids``: one one-token completion on the slot."""
        if self._matcher is None or grammar_ids is None:
            answer = self._call(ids, 2)
            return _choice(answer["completion_probabilities"][0], self._model)
        assert isinstance(self._matcher, _ByteMatcher)
        self._matcher.follow(grammar_ids)
        for k in GRAMMAR_CANDIDATES:
            answer = self._call(ids, k)
            entries = answer.get("completion_probabilities") or []
            if not entries:
                break
            top = entries[0].get("top_logprobs") or []
            raw_top1 = math.exp(float(top[0]["logprob"])) if top else 0.0
            raw_top2 = math.exp(float(top[1]["logprob"])) if len(top) > 1 else 0.0
            allowed = []
            for candidate in top:
                token_id = self._model.learn(candidate)
                piece = self._model.pieces[token_id]
                if self._matcher.allows(piece, token_id in self._model.stop_ids):
                    allowed.append((token_id, math.exp(float(candidate["logprob"]))))
            if allowed:
                return self._pick(allowed), raw_top1, raw_top2
            forced = self._forced_token()
            if forced is not None:
                return forced, raw_top1, raw_top2
            if len(top) < k:
                break  # the server gave every token it has
        raise GrammarViolationError(
            f"no token {self._model.url} offers after the answer so far fits the grammar"
        )

    def _forced_token(self) -> int | None:
        """Where the grammar allows one text only (a tool call's name, a key, punctuation),
        the first token of that text: the answer's text is the same whichever token the model
        would have started it with, so no more candidates are asked for."""
        assert isinstance(self._matcher, _ByteMatcher)
        forced = self._matcher.forced_text()
        if not forced:
            return None
        body = {"content": forced, "with_pieces": True}
        tokens = self._model.client.post("/tokenize", body)["tokens"]
        if not tokens:
            return None
        first = tokens[0]
        piece = first["piece"]
        data = piece.encode("utf-8") if isinstance(piece, str) else bytes(piece)
        if not data or not self._matcher.allows(data, False):
            return None
        return self._model.learn({"id": first["id"], "bytes": list(data)})

    def _pick(self, allowed: list[tuple[int, float]]) -> int:
        """Greedy: the most likely allowed candidate; sampling: one drawn among them."""
        sampling = self._sampling
        if sampling.greedy:
            return allowed[0][0]
        weights = [p ** (1.0 / sampling.temperature) for _, p in allowed]
        if sampling.top_k:
            weights = weights[: sampling.top_k]
        total = sum(weights)
        kept, mass = [], 0.0
        for (token_id, _), w in zip(allowed, weights, strict=False):
            kept.append((token_id, w))
            mass += w
            if mass >= sampling.top_p * total:
                break
        return self._rng.choices([t for t, _ in kept], [w for _, w in kept])[0]

    def _call(self, ids: list[int], n_probs: int, n_predict: int = 1) -> Any:
        model, sampling = self._model, self._sampling
        if self._matcher is not None:
            sampling = _greedy()  # the session chooses among the candidates itself
        answer = self._run(
            lambda: model.complete(
                ids,
                sampling,
                n_predict=n_predict,
                n_probs=n_probs,
                slot=self._slot,
            )
        )
        self._count_timings(answer)
        return answer

    def _run(self, call: Any) -> Any:
        """A server call, as a unit of work of this request (the engine checks cancellation)."""
        return self._scheduler.run(Work(self._model, self._model, False, call))

    def _count_timings(self, answer: Mapping[str, Any]) -> None:
        timings = answer.get("timings") or {}
        self._count_pass(int(timings.get("prompt_n", 0)))

    # -- questions ------------------------------------------------------------------------------
    def allowed_mass(self, answer: str, grammar: str) -> float:
        raise NotImplementedError(
            "a server gives the top-k of the next-token distribution, not all of it: the mass "
            "a grammar allows cannot be measured (capabilities.grammar_mass is False)"
        )

    def peek_each(self, answers: Sequence[str]) -> Iterator[Token]:
        """One boundary at a time, only as far as the caller reads (each is a server call)."""
        for answer in answers:
            self._check_open()
            ids = self._encoder.encode(answer)
            grammar = {len(ids): self._matcher.answer_ids(answer)} if self._matcher else {}
            token_id, top1, top2 = self._choose_after(ids, grammar, counted=False)
            self._peeked = answer
            text = self._tokens.detokenizer(ids).add(token_id)
            yield Token(text, top1, top2, token_id in self._model.stop_ids)

    def _grammar_advance(self, grammar_path: list[int], token_id: int, text: str) -> None:
        assert isinstance(self._matcher, _ByteMatcher)
        grammar_path.extend(self._matcher.answer_ids(text))  # the byte matcher's ids

    def _stream(self, ids: list[int], size: int) -> Iterator[Choice]:
        """The choices of one streamed completion after ``ids``, as the server makes them;
        closing the iterator closes the connection (the server stops generating). With the
        model's ``window_chunk``, successive completions of that many tokens instead."""
        if self._model.window_chunk:
            return self._chunks(ids, size, self._model.window_chunk)
        return resumed(self._streamed, ids, size, self._model.client.max_retries)

    def _chunks(self, ids: list[int], n_predict: int, chunk: int) -> Iterator[Choice]:
        ids = list(ids)
        while n_predict > 0:
            answer = self._call(ids, 2, min(chunk, n_predict))
            choices = [_choice(e, self._model) for e in answer["completion_probabilities"]]
            yield from choices
            if not choices or choices[-1][0] in self._model.stop_ids:
                return
            ids.extend(c[0] for c in choices)
            n_predict -= len(choices)

    def _streamed(self, ids: list[int], n_predict: int) -> Iterator[Choice]:
        model = self._model
        body = model.body(ids, self._sampling, n_predict, 2, self._slot, True, True)
        read = 0  # positions the server read: the prompt's uncached part, then each token
        try:
            with model.client.stream("/completion", body) as events:
                while True:
                    event = self._run(lambda: next(events, None))
                    if event is None:
                        return
                    for entry in event.get("completion_probabilities") or ():
                        read += 1
                        yield _choice(entry, model)
                    if event.get("stop"):
                        timings = event.get("timings") or {}
                        read += int(timings.get("prompt_n", 1)) - 1
                        return
        finally:
            self._count_pass(read)


class _ServerTemplate:
    """A llama.cpp server's chat template, rendered by the server (``/apply-template``)."""

    def __init__(self, model: LlamaCppModel, markers: Sequence[str], reads_tools: bool) -> None:
        self._model = model
        self.markers: Sequence[str] = tuple(sorted(set(markers), key=lambda t: (-len(t), t)))
        self.reads_tools = reads_tools

    @classmethod
    def probe(cls, model: LlamaCppModel, props: Mapping[str, Any]) -> _ServerTemplate | None:
        """The template, if the model has one of its own: its rendering of a sample chat holds
        control tokens of the model (llama.cpp renders a chatml fallback for a model without
        a template, whose markers such a model does not know)."""
        if not props.get("chat_template"):
            return None
        caps = props.get("chat_template_caps") or {}
        sample = [
            {"role": "system", "content": "s"},
            {"role": "user", "content": "u"},
            {"role": "assistant", "content": "a"},
        ]
        try:
            rendered = model.client.post("/apply-template", {"messages": sample})["prompt"]
            pieces = model.client.post(
                "/tokenize", {"content": rendered, "parse_special": True, "with_pieces": True}
            )["tokens"]
        except (ServerError, KeyError, TypeError):
            return None
        markers = [str(p["piece"]) for p in pieces if model.control_id(str(p["piece"])) is not None]
        for token in (props.get("bos_token"), props.get("eos_token")):
            if token and model.control_id(str(token)) is not None:
                markers.append(str(token))
        if not any(m in rendered for m in markers):
            return None
        return cls(model, markers, bool(caps.get("supports_tools")))

    def render(
        self, messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] | None
    ) -> str:
        body: dict[str, Any] = {"messages": [dict(m) for m in messages]}
        if tools is not None:
            body["tools"] = [dict(t) for t in tools]
        return str(self._model.client.post("/apply-template", body)["prompt"])


class UncachedModel:
    """The same server asked every question afresh, as the authors' code asks a completions
    API: no slot pinned, ``cache_prompt: false``, the whole ``prompt + answer`` re-read for
    every peek, and a window asked as one completion of its longest length and cut where it
    ends. The oracle the cached sessions must match (greedy)."""

    def __init__(self, model: LlamaCppModel) -> None:
        self.model = model
        self.name = model.name

    def session(self, prompt: str, sampling: SamplingConfig) -> UncachedSession:
        return UncachedSession(self.model, prompt, sampling)


class UncachedSession:
    """The questions of :class:`~.base.TextSession` that the algorithm asks, from scratch."""

    def __init__(self, model: LlamaCppModel, prompt: str, sampling: SamplingConfig) -> None:
        self._model = model
        self._prompt = prompt
        self._sampling = sampling
        model.encode(prompt)
        self._calls = 0
        self._read = 0

    def _complete(self, ids: list[int], n_predict: int) -> list[Choice]:
        answer = self._model.complete(
            ids, self._sampling, n_predict=n_predict, n_probs=2, cache=False
        )
        self._calls += 1
        self._read += len(ids) + max(0, len(answer.get("tokens") or ()) - 1)
        return [_choice(e, self._model) for e in answer.get("completion_probabilities") or ()]

    def peek(self, answer: str) -> Token:
        token_id, top1, top2 = self._complete(self._model.encode(self._prompt, answer), 1)[0]
        text = _Bytes(self._model).add(token_id)
        return Token(text, top1, top2, token_id in self._model.stop_ids)

    def peek_each(self, answers: Sequence[str]) -> Iterator[Token]:
        for answer in answers:
            yield self.peek(answer)

    def generate(
        self,
        answer: str,
        max_new_tokens: int,
        *,
        min_prob: float | None = None,
        first: Token | None = None,
        stop: Sequence[str] = (),
    ) -> Iterator[Token]:
        ids = self._model.encode(self._prompt, answer)
        choices = self._complete(ids, max_new_tokens + CARRY_TOKENS)
        yield from cut_window(
            choices,
            _Bytes(self._model),
            self._model.stop_ids,
            answer,
            max_new_tokens,
            min_prob,
            first,
            stop,
        )

    def count_tokens(self, text: str) -> int:
        return len(self._model.tokenize(text))

    def truncate_tokens(self, text: str, max_tokens: int) -> str:
        return self._model.truncate_tokens(text, max_tokens)

    def allowed_mass(self, answer: str, grammar: str) -> float:
        raise NotImplementedError("the uncached oracle answers unconstrained requests only")

    def constrain(self, grammar: str | None) -> None:
        if grammar is not None:
            raise NotImplementedError("the uncached oracle answers unconstrained requests only")

    def stats(self) -> SessionStats:
        return SessionStats(self._calls, self._read)

    def close(self) -> None:
        pass


def _build(
    client: ServerClient, params: Mapping[str, str], *, slot_wait: float | None = None
) -> LlamaCppModel:
    check_params(client.url, params, set())
    return LlamaCppModel(client, slot_wait=slot_wait)


register_dialect("llamacpp", _recognizes, _build)
