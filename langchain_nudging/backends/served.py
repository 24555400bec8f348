"""Models on serving engines whose tokenizer this process holds: what vLLM's and SGLang's
dialects share (backends/vllm.py, backends/sglang.py).

Such a server takes token-id prompts and returns token ids with their top-k log-probabilities,
but no bytes per token. So the client loads the served model's tokenizer (the server reports
where it lives; ``?tokenizer=FOLDER_OR_HUB_ID`` in the server spec overrides it), checks at
connect that it tokenizes a sample as the server does, and does every text question itself:
prompts to ids (BOS included as the model needs it), ids to answer text (a Hugging Face
decoder, never joined piece strings), the chat template, token counts and grammar masks
(llguidance over the same tokenizer, backends/grammar.py). The server is asked only for
choices, through the dialect's :meth:`TokenServerModel.choose` (one-token completions, several
prompts in one call where the engine allows it) and :meth:`TokenServerModel.stream` (a
streamed completion the session closes at the first token that ends its window).

A constrained choice: where the grammar allows few tokens, one call restricted to them (the
dialect's ``restrict``); else the unrestricted choice, kept when the grammar allows it (for
greedy choices the argmax of the allowed ones; for sampled ones this is rejection sampling,
which keeps the distribution of the allowed tokens exact), and only otherwise a second call
restricted to the allowed tokens. Gamma always compares the raw top-1 probability.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from ..config import SamplingConfig
from .base import (
    RUN_ALONE,
    Capabilities,
    ChatTemplate,
    Scheduler,
    SessionStats,
    Token,
    TokenCount,
    Work,
)
from .cached import CARRY_TOKENS, CachedSession, Choice, cut_window
from .chat_template import template_of
from .grammar import AnswerMatcher, GrammarTokenizer
from .hf import TokenizerText
from .http import ServerClient, ServerError, resumed
from .penalties import server_refusal

#: Allowed tokens up to which a constrained choice is one call restricted to them.
RESTRICT_AT_ONCE = 4096
_SAMPLE = "Question: What is 12 * 34? Café, naïve — 日本語 🙂\n  def f(x):\treturn x  # ok."


def load_tokenizer(source: str, url: str) -> Any:
    """The Hugging Face tokenizer at ``source`` (a folder or a Hub id), or a clear error."""
    from transformers import AutoTokenizer

    local = Path(source).expanduser()
    try:
        if local.is_dir():
            return AutoTokenizer.from_pretrained(str(local))
        return AutoTokenizer.from_pretrained(source)
    except Exception as exc:
        raise ServerError(
            f"{url}: cannot load the tokenizer of the served model ({source!r}) here: "
            f"{type(exc).__name__}: {str(exc)[:300]}; give a folder or Hub id holding it as "
            f"?tokenizer=... in the server spec"
        ) from None


def _generation_config(source: str) -> Any:
    """The model's generation config (its end-of-turn ids) where the tokenizer's folder or Hub
    entry has one; ``None`` otherwise."""
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(source)
    except Exception:
        return None


class TokenServerModel(ABC):
    """A served model with its tokenizer here (see the module's docstring); a dialect
    implements :meth:`choose`, :meth:`stream` and :meth:`restrict`."""

    capabilities = Capabilities(batches_itself=True, grammars=True, grammar_mass=False)
    batchable = False  # as a WorkRunner: the server batches concurrent requests itself
    #: Whether log-probabilities stay raw when the request is restricted to some tokens.
    raw_when_restricted = True

    def __init__(
        self, client: ServerClient, tokenizer_source: str, *, name: str, context_window: int | None
    ) -> None:
        self.client = client
        self.url = client.url
        self.name = f"{name} @ {self.url}"
        self.tokenizer_source = tokenizer_source
        tokenizer = load_tokenizer(tokenizer_source, self.url)
        owner = SimpleNamespace(generation_config=_generation_config(tokenizer_source))
        self.text = TokenizerText(tokenizer, owner, context_window, self.name)  # type: ignore[arg-type]
        self.chat_template: ChatTemplate | None = template_of(tokenizer)
        self.grammar = GrammarTokenizer.of(tokenizer, len(tokenizer), self.text.eos_ids)
        self.live_sessions = 0
        self._lock = threading.Lock()
        #: Whether log-probabilities are raw for sampled requests too (greedy ones always are).
        self.raw_when_sampling = True

    #: Repetition controls this dialect cannot apply over the answer so far: the engines'
    #: frequency and presence penalties count only a completion's own tokens (the answer is
    #: sent as the prompt), and they have no n-gram ban.
    unsupported_controls: tuple[str, ...] = (
        "frequency_penalty",
        "presence_penalty",
        "no_repeat_ngram_size",
    )

    def check_tokenizer(self, server_ids: list[int]) -> None:
        """Refuse a local tokenizer that does not tokenize the sample as the server does."""
        mine = self.text.encode_plain(_SAMPLE)
        if server_ids != mine:
            raise ServerError(
                f"{self.url}: the tokenizer loaded from {self.tokenizer_source!r} does not "
                f"tokenize as the server does (a sample gave {len(mine)} ids here and "
                f"{len(server_ids)} there); give the served model's own as ?tokenizer=..."
            )

    sample_text = _SAMPLE

    # -- what a dialect supplies --------------------------------------------------------------
    @abstractmethod
    def choose(
        self,
        prompts: Sequence[list[int]],
        sampling: SamplingConfig,
        allowed: list[int] | None = None,
        fresh: bool = False,
    ) -> tuple[list[Choice], int]:
        """The token chosen after each prompt, from one call, and the prompt positions the
        server computed (not read from its cache). ``allowed``: choose among these ids
        only. ``fresh``: read every prompt without the server's prefix cache (the oracle)."""

    @abstractmethod
    def stream(
        self,
        ids: list[int],
        size: int,
        sampling: SamplingConfig,
        read: list[int],
        fresh: bool = False,
    ) -> Iterator[Choice]:
        """The choices of one streamed completion of up to ``size`` tokens after ``ids``, as
        the server makes them; closing it stops the server generating. Adds the positions
        the server computed to ``read[0]``; ``fresh`` as for :meth:`choose`."""

    # -- TextModel ----------------------------------------------------------------------------
    def session(
        self,
        prompt: str,
        sampling: SamplingConfig,
        *,
        grammar: str | None = None,
        scheduler: Scheduler = RUN_ALONE,
    ) -> TokenServerSession:
        if not sampling.greedy and not self.raw_when_sampling:
            raise ValueError(
                f"{self.url} returns temperature-scaled log-probabilities for sampled "
                "requests, so gamma cannot be measured on them: use temperature 0, or start "
                "the server so that it returns raw ones (SGLang: SGLANG_RETURN_ORIGINAL_LOGPROB=1)"
            )
        server_refusal(sampling, self.url, self.unsupported_controls)
        return TokenServerSession(self, prompt, sampling, grammar, scheduler)

    def prompt_tokens(self, prompt: str) -> int:
        return len(self.text.encode(prompt))

    def counter(self) -> TokenCount:
        return self.text.counter()

    def truncate_tokens(self, text: str, max_tokens: int) -> str:
        return self.text.truncate(text, max_tokens)

    def token_ids(self, text: str) -> list[int]:
        return self.text.encode_plain(text)

    def prepare(self, grammars: bool) -> None:
        """Build llguidance's view of the tokenizer now (seconds for a large vocabulary)."""
        if grammars:
            self.grammar.build()

    def prepared(self, grammars: bool) -> bool:
        return not grammars or self.grammar.built

    # -- WorkRunner -----------------------------------------------------------------------------
    def run_together(self, works: Sequence[Work]) -> list[Any]:
        """Each work's payload is a call to make; the server batches concurrent ones itself."""
        return [work.payload() for work in works]

    def lock(self) -> Any:
        return nullcontext()  # requests call the server concurrently

    def opened(self, change: int) -> None:
        with self._lock:
            self.live_sessions += change


def seeded(sampling: SamplingConfig, ids: Sequence[int]) -> int | None:
    """One seed per position: a sampled choice does not depend on how many calls came before."""
    return None if sampling.seed is None else (sampling.seed + len(ids)) % (1 << 31)


class TokenServerSession(CachedSession):
    """One request's prompt on a served model: the server's prefix cache holds its ids."""

    def __init__(
        self,
        model: TokenServerModel,
        prompt: str,
        sampling: SamplingConfig,
        grammar: str | None,
        scheduler: Scheduler,
    ) -> None:
        self._model = model
        self._sampling = sampling
        self._scheduler = scheduler
        super().__init__(model.text, prompt, grammar)
        model.opened(1)

    def _new_matcher(self, grammar: str) -> AnswerMatcher:
        return self._model.grammar.matcher(grammar)

    def _release(self) -> None:
        self._model.opened(-1)

    def _run(self, call: Any) -> Any:
        """A server call, as a unit of work of this request (the engine checks cancellation)."""
        return self._scheduler.run(Work(self._model, self._model, False, call))

    def _ask(self, prompts: Sequence[list[int]], allowed: list[int] | None = None) -> list[Choice]:
        model, sampling = self._model, self._sampling
        choices, read = self._run(lambda: model.choose(prompts, sampling, allowed))
        self._count_pass(read)
        return choices

    def _choose(
        self, ids: list[int], lengths: list[int], grammar_ids: Mapping[int, list[int]]
    ) -> list[Choice]:
        if self._matcher is not None:
            return [self._constrained(ids[:n], grammar_ids[n]) for n in lengths]
        if self._sampling.greedy and not self._sampling.penalized:
            return self._ask([ids[:n] for n in lengths])  # one call for every boundary
        # Each with its position's seed; a penalized choice is the server's over its own
        # prompt (one call may read shorter prompts' choices from raw prompt log-probabilities).
        return [self._ask([ids[:n]])[0] for n in lengths]

    def _constrained(self, ids: list[int], grammar_ids: list[int]) -> Choice:
        assert isinstance(self._matcher, AnswerMatcher)
        mask = self._matcher.allowed(grammar_ids)
        if int(mask.sum()) <= RESTRICT_AT_ONCE and self._model.raw_when_restricted:
            return self._ask([ids], mask.nonzero().flatten().tolist())[0]
        free = self._ask([ids])[0]
        if free[0] < mask.shape[0] and bool(mask[free[0]]):
            return free
        token_id = self._ask([ids], mask.nonzero().flatten().tolist())[0][0]
        return token_id, free[1], free[2]

    def _stream(self, ids: list[int], size: int) -> Iterator[Choice]:
        return resumed(self._streamed, ids, size, self._model.client.max_retries)

    def _streamed(self, ids: list[int], size: int) -> Iterator[Choice]:
        read = [0]
        events = self._model.stream(ids, size, self._sampling, read)
        try:
            while True:
                choice = self._run(lambda: next(events, None))
                if choice is None:
                    return
                yield choice
        finally:
            events.close()  # type: ignore[attr-defined]
            self._count_pass(read[0])

    def allowed_mass(self, answer: str, grammar: str) -> float:
        raise NotImplementedError(
            "a server gives the top-k of the next-token distribution, not all of it: the mass "
            "a grammar allows cannot be measured (capabilities.grammar_mass is False)"
        )


class UncachedModel:
    """A served model asked every question afresh, as the authors' code asks a completions
    API: the prefix cache is not read, the whole ``prompt + answer`` is re-read for every
    peek, and a window is one completion of its longest length, cut where it ends. The oracle
    the cached sessions must match (greedy)."""

    def __init__(self, model: TokenServerModel) -> None:
        self.model = model
        self.name = model.name

    def session(self, prompt: str, sampling: SamplingConfig) -> UncachedSession:
        return UncachedSession(self.model, prompt, sampling)


class UncachedSession:
    """The questions of :class:`~.base.TextSession` that the algorithm asks, from scratch."""

    def __init__(self, model: TokenServerModel, prompt: str, sampling: SamplingConfig) -> None:
        self._model = model
        self._prompt = prompt
        self._sampling = sampling
        self._calls = 0
        self._read = 0
        model.text.encode(prompt)

    def _ids(self, answer: str) -> list[int]:
        return self._model.text.encode(self._prompt, answer)

    def peek(self, answer: str) -> Token:
        ids = self._ids(answer)
        [(token_id, top1, top2)], read = self._model.choose([ids], self._sampling, fresh=True)
        self._calls += 1
        self._read += read
        text = self._model.text.detokenizer(ids).add(token_id)
        return Token(text, top1, top2, token_id in self._model.text.stop_ids)

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
        ids = self._ids(answer)
        read = [0]
        choices = list(
            self._model.stream(ids, max_new_tokens + CARRY_TOKENS, self._sampling, read, fresh=True)
        )
        self._calls += 1
        self._read += read[0]
        text = self._model.text
        detokenizer = text.detokenizer(ids)
        yield from cut_window(
            choices, detokenizer, text.stop_ids, answer, max_new_tokens, min_prob, first, stop
        )

    def count_tokens(self, text: str) -> int:
        return self._model.text.count(text)

    def truncate_tokens(self, text: str, max_tokens: int) -> str:
        return self._model.text.truncate(text, max_tokens)

    def allowed_mass(self, answer: str, grammar: str) -> float:
        raise NotImplementedError("the uncached oracle answers unconstrained requests only")

    def constrain(self, grammar: str | None) -> None:
        if grammar is not None:
            raise NotImplementedError("the uncached oracle answers unconstrained requests only")

    def stats(self) -> SessionStats:
        return SessionStats(self._calls, self._read)

    def close(self) -> None:
        pass
