"""A backend in one module: a scripted text model, registered by one line.

Each character is a token. A scripted model knows one text (its ``script``) and continues any
prefix of it with the next character; after the script, or after text it does not know, it
ends the answer. Its confidence is ``unsure`` on the first character of each word (the base
model hands those words to the nudging model) and ``sure`` elsewhere. Its work goes through
the scheduler it is given, batchable, so an engine batches it like any other model's.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from typing import Any

from langchain_nudging.backends.base import (
    RUN_ALONE,
    Capabilities,
    ContextWindowError,
    Scheduler,
    SessionStats,
    Token,
    Work,
)
from langchain_nudging.backends.registry import register_backend
from langchain_nudging.config import SamplingConfig, confident

SCRIPT = "Paris is the capital of France."
PREFIX = "scripted:"


class ScriptedModel:
    capabilities = Capabilities()
    chat_template = None  # reads the base transcript
    batchable = True  # as a WorkRunner

    def __init__(self, name: str, unsure: float, sure: float = 0.95, window: int = 4096) -> None:
        self.name, self.unsure, self.sure, self.window = name, unsure, sure, window
        self.live_sessions = 0

    def next_token(self, answer: str) -> Token:
        if not SCRIPT.startswith(answer) or answer == SCRIPT:
            return Token("", 1.0, 0.0, is_eos=True)
        word_start = not answer or answer.endswith(" ")
        prob = self.unsure if word_start else self.sure
        return Token(SCRIPT[len(answer)], prob, 1.0 - prob)

    def run_together(self, works: Sequence[Work]) -> list[Any]:
        return [self.next_token(work.payload) for work in works]

    def lock(self) -> Any:
        return nullcontext()

    def session(
        self,
        prompt: str,
        sampling: SamplingConfig,
        *,
        grammar: str | None = None,
        scheduler: Scheduler = RUN_ALONE,
    ) -> ScriptedSession:
        self.prompt_tokens(prompt)
        self.live_sessions += 1
        return ScriptedSession(self, scheduler)

    def prompt_tokens(self, prompt: str) -> int:
        if len(prompt) > self.window:
            raise ContextWindowError(f"the prompt would exceed {self.name}'s window")
        return len(prompt)

    def counter(self) -> ScriptedModel:
        return self

    def count(self, text: str) -> int:
        return len(text)

    def truncate_tokens(self, text: str, max_tokens: int) -> str:
        return text[:max_tokens]

    def token_ids(self, text: str) -> list[int]:
        return [ord(c) for c in text]

    def prepare(self, grammars: bool) -> None:
        pass

    def prepared(self, grammars: bool) -> bool:
        return True


class ScriptedSession:
    def __init__(self, model: ScriptedModel, scheduler: Scheduler) -> None:
        self.model, self.scheduler, self.passes = model, scheduler, 0

    def peek(self, answer: str) -> Token:
        self.passes += 1
        return self.scheduler.run(Work(self.model, "step", self.passes == 1, answer))

    def peek_each(self, answers: Sequence[str]) -> Iterator[Token]:
        return (self.peek(answer) for answer in answers)

    def generate(
        self,
        answer: str,
        max_new_tokens: int,
        *,
        min_prob: float | None = None,
        first: Token | None = None,
        stop: Sequence[str] = (),
    ) -> Iterator[Token]:
        text = answer
        for n in range(max_new_tokens):
            given = n == 0 and first is not None
            token = first if given and first is not None else self.peek(text)
            yield token
            text += token.text
            unsure = min_prob is not None and not given and not confident(token.top1_prob, min_prob)
            new = (text[max(0, len(answer) - len(s) + 1) :] for s in stop)
            if token.is_eos or unsure or any(s in t for s, t in zip(stop, new, strict=True)):
                return

    def count_tokens(self, text: str) -> int:
        return len(text)

    def truncate_tokens(self, text: str, max_tokens: int) -> str:
        return text[:max_tokens]

    def allowed_mass(self, answer: str, grammar: str) -> float:
        raise NotImplementedError("scripted models take no grammar")

    def constrain(self, grammar: str | None) -> None:
        raise NotImplementedError("scripted models take no grammar")

    def stats(self) -> SessionStats:
        return SessionStats(forward_passes=self.passes, tokens_processed=self.passes)

    def close(self) -> None:
        if self.scheduler is not None:
            self.model.live_sessions -= 1
            self.scheduler = None  # type: ignore[assignment]


def build(spec: str, **options: Any) -> ScriptedModel:
    role = spec[len(PREFIX) :]
    return ScriptedModel(spec, unsure=0.1 if role == "base" else 0.9)


register_backend("scripted", lambda spec: isinstance(spec, str) and spec.startswith(PREFIX), build)
