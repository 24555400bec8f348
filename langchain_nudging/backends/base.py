"""What the nudging algorithm asks of a model: text-level questions only.

A backend hides tokens, tensors and caches. A :class:`TextSession` holds one request's prompt
for one model; every question is asked about ``prompt + answer`` where ``answer`` is plain text,
so two models with different tokenizers can share one answer.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

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
    ) -> Iterator[Token]:
        """Continue ``prompt + answer`` token by token, reading the text once at the start.

        Tokens are yielded as they are decided (a caller may stop reading at any point; closing
        the iterator ends the window). Stops after ``max_new_tokens`` tokens, after an
        end-of-sequence token (returned last), at the first token whose top-1 probability is
        below ``min_prob`` (returned last, so the caller sees why it stopped), or after the
        token whose text completes an occurrence of a ``stop`` string in ``answer`` followed by
        the new text (an occurrence that ends inside ``answer`` does not count). A window never
        ends inside a character: when the last token leaves a UTF-8 character incomplete, up to
        3 more tokens are taken past ``max_new_tokens`` until it is complete (docs/algorithm.md,
        rule 7). ``first``, when given, must be this session's :meth:`peek` of the same
        ``answer``: it is taken as the first token whatever its probability, without asking the
        model again. ``min_prob`` is gamma: a backend decides "below" with
        :func:`~langchain_nudging.config.confident`.
        """
        ...

    def count_tokens(self, text: str) -> int:
        """Tokens in ``text`` on its own (no special tokens)."""
        ...

    def truncate_tokens(self, text: str, max_tokens: int) -> str:
        """The longest prefix of ``text`` made of its first ``max_tokens`` tokens."""
        ...

    def allowed_mass(self, answer: str, grammar: str) -> float:
        """Probability (raw softmax) that the next token after ``answer`` is one ``grammar``
        allows. Only for a model whose capabilities have ``grammar_mass``."""
        ...

    def constrain(self, grammar: str | None) -> None:
        """Constrain every choice from now on by ``grammar`` (``None``: unconstrained). Only
        for a model whose capabilities have ``grammars``."""
        ...

    def stats(self) -> SessionStats:
        """What this session has cost so far."""
        ...

    def close(self) -> None:
        """Free what the session holds (caches); the session is unusable afterwards."""
        ...


@dataclass(frozen=True, slots=True)
class SessionStats:
    """What a session has cost: forward passes (or server calls), the positions they read,
    choices answered without running the model, and grammar masks computed."""

    forward_passes: int = 0
    tokens_processed: int = 0
    choices_reused: int = 0
    grammar_masks: int = 0


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What a text model can do beyond the protocol's questions.

    ``batches_itself``: concurrent requests are batched by the backend (a serving engine);
    the engine runs their work in the requests' own threads and needs no worker.
    ``grammars``: sessions take a grammar (llguidance Lark) that constrains every choice.
    ``grammar_mass``: :meth:`TextSession.allowed_mass` works (it needs the full next-token
    distribution, which a top-k logprobs API cannot give); ``tool_call_threshold`` needs it.
    """

    batches_itself: bool = False
    grammars: bool = False
    grammar_mass: bool = False


class TokenCount(Protocol):
    """Counts tokens of texts that mostly extend the last one counted (an answer as it grows):
    a backend may count incrementally."""

    def count(self, text: str) -> int: ...


class ChatTemplate(Protocol):
    """A chat model's template, as prompts.py renders the nudging model's prompt with it."""

    #: Strings that are control markers in a rendered prompt (special and added tokens),
    #: longest first; a message containing one is rendered with it as plain text.
    markers: Sequence[str]
    #: Whether the template renders a ``tools`` variable (OpenAI-style function definitions).
    reads_tools: bool

    def render(
        self, messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] | None
    ) -> str:
        """The template applied to ``messages``, continuing the final (assistant) message."""
        ...


# -- scheduling: how a session's model work reaches an engine (control flows down) ----------


@dataclass(eq=False)
class Work:
    """A unit of model work a session asks for (a forward pass, a server call).

    ``runner`` runs works of the same runner together; works whose ``group`` is equal may be
    batched into one call. ``first`` marks a session's first pass (reading its prompt), which a
    scheduler may put ahead of steps; ``payload`` is the backend's own.
    """

    runner: WorkRunner
    group: Hashable
    first: bool
    payload: Any
    result: Any = field(default=None, init=False)


class WorkRunner(Protocol):
    """Runs a backend's work: one per model's weights (or per server)."""

    #: Whether works of several requests may run as one call. A serving engine batches by
    #: itself: its works run one by one in the requesting thread.
    batchable: bool

    def run_together(self, works: Sequence[Work]) -> list[Any]:
        """Run ``works`` (all of this runner, one ``group``) as one call; each one's result."""
        ...

    def lock(self) -> Any:
        """A context manager held around each call: one call at a time on these weights."""
        ...


class Scheduler(Protocol):
    """What a session hands its work to; an engine supplies one per request."""

    def run(self, work: Work) -> Any:
        """Run ``work`` (alone or batched with others') and return its result."""
        ...


class RunAlone:
    """The scheduler of a session outside an engine: each work runs at once, alone."""

    def run(self, work: Work) -> Any:
        with work.runner.lock():
            return work.runner.run_together([work])[0]


RUN_ALONE = RunAlone()


class TextModel(Protocol):
    """A model that opens sessions, and answers token questions without one."""

    name: str
    capabilities: Capabilities
    #: ``None``: the model has no chat template (it reads the base transcript).
    chat_template: ChatTemplate | None
    #: Sessions open now.
    live_sessions: int

    def session(
        self,
        prompt: str,
        sampling: SamplingConfig,
        *,
        grammar: str | None = None,
        scheduler: Scheduler = RUN_ALONE,
    ) -> TextSession:
        """A session holding ``prompt``; its model work goes through ``scheduler``.

        Raises :class:`ContextWindowError` when the prompt does not fit.
        """
        ...

    def prompt_tokens(self, prompt: str) -> int:
        """Tokens of ``prompt`` (with its control markers); raises
        :class:`ContextWindowError` when it does not fit the context window."""
        ...

    def counter(self) -> TokenCount:
        """A fresh incremental token counter (texts on their own, no special tokens)."""
        ...

    def truncate_tokens(self, text: str, max_tokens: int) -> str:
        """The longest prefix of ``text`` made of its first ``max_tokens`` tokens."""
        ...

    def token_ids(self, text: str) -> list[int]:
        """``text``'s token ids on its own (no special tokens)."""
        ...

    def prepare(self, grammars: bool) -> None:
        """Build now what constrained requests need (``grammars``), outside any request."""
        ...

    def prepared(self, grammars: bool) -> bool:
        """Whether :meth:`prepare` has nothing left to build."""
        ...
