"""A loaded base/nudging pair answering one conversation at a time, as a stream of segments.

This is the synchronous core that the engine runs in one thread per request.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from ..algorithm import Mode, NudgingRun, RoundTrace, Segment, SoloRun
from ..backends.local import LocalModel, LocalSession
from ..config import NudgingConfig
from ..models import BUNDLED_BASE_ID, BUNDLED_NUDGING_ID, LoadedModel, load_model
from ..prompts import BasePromptFormat, ChatMessage, render_prompts
from ..structured import OutputSpec


@dataclass
class GenerationStats:
    """What one answer cost and who wrote it.

    Tokens are counted with the base model's tokenizer; ``base_tokens + nudge_tokens`` is the
    answer's token count, each segment being charged what it adds to the answer.
    """

    finish_reason: str | None = None
    base_tokens: int = 0
    nudge_tokens: int = 0
    base_words: int = 0
    nudge_words: int = 0
    rounds: int = 0
    forward_passes: dict[str, int] = field(default_factory=dict)
    tokens_processed: dict[str, int] = field(default_factory=dict)
    choices_reused: dict[str, int] = field(default_factory=dict)
    grammar_masks: dict[str, int] = field(default_factory=dict)
    call_probability: float | None = None  # what call_threshold was compared with
    prompt_tokens: int = 0
    time_to_first_segment: float | None = None
    wall_time: float = 0.0

    @property
    def nudged_share(self) -> float:
        total = self.base_tokens + self.nudge_tokens
        return self.nudge_tokens / total if total else 0.0

    def as_dict(self) -> dict[str, object]:
        return {**asdict(self), "nudged_share": round(self.nudged_share, 4)}


_NEVER = 1 << 30


def _rules_for(output: OutputSpec, config: NudgingConfig) -> NudgingConfig:
    """A repetition stop would end a JSON-only answer inside its JSON; loops inside strings
    are bounded by the grammar (max_string_length) and the budget instead."""
    if not output.json_only:
        return config
    return config.model_copy(update={"min_repeat_chars": _NEVER, "max_same_nudges": _NEVER})


class Generation:
    """One streamed answer: iterate for segments, then read ``text`` and ``stats``."""

    def __init__(
        self,
        pair: NudgingPair,
        messages: Sequence[ChatMessage],
        config: NudgingConfig,
        mode: Mode = "nudged",
        base_format: BasePromptFormat | None = None,
        output: OutputSpec | None = None,
    ) -> None:
        if mode not in ("nudged", "base", "nudging"):
            raise ValueError(f"mode: {mode!r} is not one of 'nudged', 'base', 'nudging'")
        self.mode = mode
        self.output = output or OutputSpec()
        prompts = render_prompts(
            messages, pair.nudging.text.tokenizer, base_format or pair.base_format, self.output
        )
        self.config = _rules_for(self.output, config)
        #: The base transcript's turn markers: they end the answer only where the base model
        #: starts a new turn (docs/algorithm.md rule 8).
        self.markers = prompts.stop
        self.prompts = prompts
        self._pair = pair
        self.segments: list[Segment] = []
        self.trace: list[RoundTrace] = []  # a nudged answer's rounds, as they are decided
        self._started = False
        self._answer = ""
        self._answer_tokens = 0
        self._counter = pair.base.text.counter()
        # Both prompts must fit their context windows: raise before anything runs.
        prompt_tokens = len(pair.base.text.encode(prompts.base))
        pair.nudging.text.encode(prompts.nudging)
        self.stats = GenerationStats(prompt_tokens=prompt_tokens)

    @property
    def text(self) -> str:
        return "".join(s.text for s in self.segments)

    def __iter__(self) -> Iterator[Segment]:
        if self._started:
            raise RuntimeError("a Generation can be iterated only once")
        self._started = True
        pair, stats = self._pair, self.stats
        start = time.perf_counter()
        config, prompts = self.config, self.prompts
        # The statistics' counter also counts for a solo run's writer: one incremental count.
        count, truncate = self._counter.count, pair.base.text.truncate
        sessions: dict[str, LocalSession] = {}
        run: NudgingRun | SoloRun | None = None
        try:
            deciding = self.output.decides_call
            grammar = None if deciding else self.output.grammar
            if self.mode != "nudging":
                sessions["base"] = pair.base.session(prompts.base, config.base_sampling, grammar)
            if self.mode != "base":
                sessions["nudging"] = pair.nudging.session(
                    prompts.nudging, config.nudging_sampling, grammar
                )
            if deciding:
                config = self.config = _rules_for(self._decide_call(sessions), config)
            if self.mode == "nudged":
                run = NudgingRun(sessions["base"], sessions["nudging"], config, self.markers)
                self.trace = run.trace
            elif self.mode == "base":
                run = SoloRun(sessions["base"], config, "base", count, truncate, self.markers)
            else:
                run = SoloRun(sessions["nudging"], config, "nudge", count, truncate)
            for segment in run:
                if stats.time_to_first_segment is None:
                    stats.time_to_first_segment = time.perf_counter() - start
                self.segments.append(segment)
                self._count(segment)
                yield segment
        finally:
            if run is not None:
                stats.finish_reason = run.finish_reason
                stats.rounds = run.rounds
            stats.forward_passes = {k: v.forward_passes for k, v in sessions.items()}
            stats.tokens_processed = {k: v.tokens_processed for k, v in sessions.items()}
            stats.choices_reused = {k: v.choices_reused for k, v in sessions.items()}
            stats.grammar_masks = {k: v.grammar_masks for k, v in sessions.items()}
            stats.wall_time = time.perf_counter() - start
            for session in sessions.values():
                session.close()

    def _decide_call(self, sessions: dict[str, LocalSession]) -> OutputSpec:
        """``call_threshold``: the nudging model (the base model alone in "base" mode) says
        whether this answer is a tool call; every session is then constrained accordingly."""
        decider = sessions.get("nudging") or sessions["base"]
        spec = self.output
        mass = decider.allowed_mass("", spec.call_grammar)
        assert spec.call_threshold is not None
        self.stats.call_probability = mass
        decided = spec.decided(call=mass >= spec.call_threshold)
        for session in sessions.values():
            session.constrain(decided.grammar)
        return decided

    def _count(self, segment: Segment) -> None:
        # Each segment is charged the tokens it adds to the whole answer, so the two counts add
        # up to the answer's own token count (a segment alone may tokenize differently).
        before = self._answer_tokens
        self._answer += segment.text
        self._answer_tokens = self._counter.count(self._answer)
        tokens = self._answer_tokens - before
        words = len(segment.text.split())
        if segment.source == "base":
            self.stats.base_tokens += tokens
            self.stats.base_words += words
        else:
            self.stats.nudge_tokens += tokens
            self.stats.nudge_words += words


class NudgingPair:
    """A base model and a nudging model, loaded, ready to answer."""

    def __init__(
        self,
        base: LoadedModel,
        nudging: LoadedModel,
        base_format: BasePromptFormat | None = None,
    ) -> None:
        self.base = LocalModel(base)
        self.nudging = LocalModel(nudging)
        self.base_format = base_format or BasePromptFormat()

    @classmethod
    def load(
        cls,
        base: str | os.PathLike | LoadedModel = BUNDLED_BASE_ID,
        nudging: str | os.PathLike | LoadedModel = BUNDLED_NUDGING_ID,
        *,
        base_format: BasePromptFormat | None = None,
        **options: Any,
    ) -> NudgingPair:
        """Load (or reuse from the registry) both models; ``options`` go to ``load_model``."""
        return cls(load_model(base, **options), load_model(nudging, **options), base_format)

    def generate(
        self,
        messages: Sequence[ChatMessage],
        config: NudgingConfig | None = None,
        mode: Mode = "nudged",
        base_format: BasePromptFormat | None = None,
        output: OutputSpec | None = None,
    ) -> Generation:
        """Prepare an answer; nothing runs until the result is iterated.

        ``mode`` is ``"nudged"``, or a baseline with the same prompts and stop rules:
        ``"base"`` (the base model alone) or ``"nudging"`` (the nudging model alone).
        ``base_format`` overrides the pair's base transcript format for this request.
        ``output`` says what the answer must be (tools, a JSON schema): both models' choices
        are then constrained by its grammar.
        Bad input (an empty conversation, a prompt beyond a context window) raises here.
        """
        return Generation(self, messages, config or NudgingConfig(), mode, base_format, output)

    def prepare(self, output: OutputSpec | None) -> None:
        """Build now what requests with ``output`` need, so that it is not built on the
        engine's worker (llguidance's view of each tokenizer: about 5 s for a 262k vocabulary,
        once per process)."""
        if output is not None and output.constrained:
            for model in (self.base, self.nudging):
                model.grammar.build()

    def prepared(self, output: OutputSpec | None) -> bool:
        """Whether requests with ``output`` need nothing more built (see :meth:`prepare`)."""
        if output is None or not output.constrained:
            return True
        return self.base.grammar.built and self.nudging.grammar.built

    @property
    def live_sessions(self) -> int:
        return self.base.live_sessions + self.nudging.live_sessions
