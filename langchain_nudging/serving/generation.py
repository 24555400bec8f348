"""A base/nudging pair of text models answering one request at a time, as a stream of segments.

This is the synchronous core that the engine runs in one thread per request. The two models
may come from any backends (backends/registry.py builds them from specs); only the protocol of
backends/base.py is used.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from ..algorithm import NudgingRun, RoundTrace, Segment, SoloRun
from ..backends.base import RUN_ALONE, Prompt, Scheduler, TextModel, TextSession
from ..backends.registry import BUNDLED_BASE_ID, BUNDLED_NUDGING_ID, text_model
from ..config import NudgingConfig
from ..prompts import BasePromptFormat, Prompts, after_tool_result, render_prompts
from ..request import Request
from ..structured import CALIBRATED, OutputSpec


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
    call_probability: float | None = None  # a call's probability, tools shown (call_threshold)
    call_score: float | None = None  # call_threshold="calibrated": what the threshold met
    call_decision: str | None = None  # "call" or "answer", when decided up front
    prompt_tokens: int = 0
    time_to_first_segment: float | None = None
    wall_time: float = 0.0

    @property
    def nudged_share(self) -> float:
        total = self.base_tokens + self.nudge_tokens
        return self.nudge_tokens / total if total else 0.0

    def as_dict(self) -> dict[str, object]:
        return {**asdict(self), "nudged_share": round(self.nudged_share, 4)}


#: ``call_threshold="calibrated"``: the call score's threshold per nudging model, measured by
#: ``python -m benchmarks.tool_decisions`` on tests/data/tool_decisions.jsonl (docs/tools.md).
CALL_SCORE_THRESHOLDS: dict[str, float] = {BUNDLED_NUDGING_ID: 0.133}
#: For a nudging model not measured: the bundled one's (measure yours with the benchmark).
DEFAULT_CALL_SCORE_THRESHOLD = 0.133
#: Right after a tool's result, the call probability another call needs.
AFTER_RESULT_CALL_PROBABILITY = 0.99


def call_score_threshold(nudging_name: str) -> float:
    """The calibrated call-score threshold of a nudging model (by its name)."""
    return CALL_SCORE_THRESHOLDS.get(nudging_name, DEFAULT_CALL_SCORE_THRESHOLD)


def _rules_for(output: OutputSpec, config: NudgingConfig) -> NudgingConfig:
    """A repetition stop would end a JSON-only answer inside its JSON; loops inside strings
    are bounded by the grammar (max_string_length) and the budget instead."""
    if not output.json_only:
        return config
    return config.model_copy(update={"repetition_stops": False})


def _check_capabilities(used: dict[str, TextModel], output: OutputSpec) -> OutputSpec:
    """Refuse what a model's backend cannot do, before anything runs; the output spec to use
    (``call_threshold="calibrated"`` falls back to the first tokens' choice where the decider
    cannot measure a grammar's mass)."""
    if output.decides_call:
        decider = used.get("nudging") or used["base"]
        if not decider.capabilities.grammar_mass and output.call_threshold == CALIBRATED:
            output = replace(output, call_threshold=None)
        elif not decider.capabilities.grammar_mass:
            raise ValueError(
                f"tool_call_threshold: {decider.name} cannot measure the probability mass a "
                "grammar allows (its backend gives no full next-token distribution); leave "
                "tool_call_threshold unset to let the models' first tokens decide"
            )
    if output.constrained:
        for model in used.values():
            if not model.capabilities.grammars:
                raise ValueError(
                    f"{model.name} cannot constrain its answer by a grammar (its backend has "
                    "none): tools, a JSON schema and JSON mode need one"
                )
    return output


class Generation:
    """One streamed answer: iterate for segments, then read ``text`` and ``stats``."""

    def __init__(self, pair: NudgingPair, request: Request, scheduler: Scheduler) -> None:
        self.request = request
        used = {"base": pair.base, "nudging": pair.nudging}
        if request.mode != "nudged":
            del used["nudging" if request.mode == "base" else "base"]
        self.output = _check_capabilities(used, request.output)
        fmt = request.base_format or pair.base_format
        prompts = render_prompts(request.messages, pair.nudging.chat_template, fmt, self.output)
        self.config = _rules_for(self.output, request.config)
        #: The base transcript's turn markers: they end the answer only where the base model
        #: starts a new turn (docs/algorithm.md rule 8).
        self.markers = prompts.stop
        self.prompts = prompts
        self._pair = pair
        self._used = used
        self._scheduler = scheduler
        self.segments: list[Segment] = []
        self.trace: list[RoundTrace] = []  # a nudged answer's rounds, as they are decided
        self._started = False
        self._answer = ""
        self._answer_tokens = 0
        self._counter = pair.base.counter()
        # Both prompts must fit their context windows: raise before anything runs.
        prompt_tokens = pair.base.prompt_tokens(prompts.base)
        pair.nudging.prompt_tokens(prompts.nudging)
        self.stats = GenerationStats(prompt_tokens=prompt_tokens)

    @property
    def text(self) -> str:
        return "".join(s.text for s in self.segments)

    def __iter__(self) -> Iterator[Segment]:
        if self._started:
            raise RuntimeError("a Generation can be iterated only once")
        self._started = True
        stats, mode, output = self.stats, self.request.mode, self.output
        start = time.perf_counter()
        config, prompts = self.config, self.prompts
        # The statistics' counter also counts for a solo run's writer: one incremental count.
        count, truncate = self._counter.count, self._pair.base.truncate_tokens
        sessions: dict[str, TextSession] = {}
        run: NudgingRun | SoloRun | None = None
        try:
            if output.decides_call:
                output = self._decide_call(sessions)
                config = self.config = _rules_for(output, config)
                prompts = self.prompts
            samplings = {"base": config.base_sampling, "nudging": config.nudging_sampling}
            reads = {"base": prompts.base, "nudging": prompts.nudging}
            for role, model in self._used.items():
                if role not in sessions:
                    sessions[role] = model.session(
                        reads[role],
                        samplings[role],
                        grammar=output.grammar,
                        scheduler=self._scheduler,
                    )
            if mode == "nudged":
                run = NudgingRun(sessions["base"], sessions["nudging"], config, self.markers)
                self.trace = run.trace
            elif mode == "base":
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
            costs = {role: session.stats() for role, session in sessions.items()}
            stats.forward_passes = {k: v.forward_passes for k, v in costs.items()}
            stats.tokens_processed = {k: v.tokens_processed for k, v in costs.items()}
            stats.choices_reused = {k: v.choices_reused for k, v in costs.items()}
            stats.grammar_masks = {k: v.grammar_masks for k, v in costs.items()}
            stats.wall_time = time.perf_counter() - start
            for session in sessions.values():
                session.close()

    def _decide_call(self, sessions: dict[str, TextSession]) -> OutputSpec:
        """``call_threshold``: the nudging model (the base model alone in "base" mode) says
        whether this answer is a tool call, before it starts (docs/tools.md).

        The call probability is the mass of the tokens a call may start with, the tools shown.
        A numeric threshold compares it directly. ``"calibrated"`` compares the call score
        ``p_tools * (p_tools / p_plain)``, where ``p_plain`` is the same mass with the prompts
        a no-call answer reads (no tools shown), with the pair's measured threshold. Right
        after a tool's result (no user turn since), the answer is a call only if the
        probability reaches :data:`AFTER_RESULT_CALL_PROBABILITY`: the model answers from the
        result instead of calling again. The prompts are then rendered for the decision: a
        no-call answer reads exactly what it would read with no tools bound. The decider's
        session on those prompts is kept (``sessions``); the others open afterwards.
        """
        role = "nudging" if "nudging" in self._used else "base"
        decider = self._used[role]
        spec = self.output
        sampling = {"base": self.config.base_sampling, "nudging": self.config.nudging_sampling}[
            role
        ]

        def read(prompts: Prompts) -> Prompt:
            return prompts.nudging if role == "nudging" else prompts.base

        shown = decider.session(read(self.prompts), sampling, scheduler=self._scheduler)
        try:
            mass = shown.allowed_mass("", spec.call_grammar)
        finally:
            shown.close()
        self.stats.call_probability = mass
        plain_spec = spec.decided(call=False)
        plain = self._render(plain_spec)
        session = decider.session(read(plain), sampling, scheduler=self._scheduler)
        try:
            if after_tool_result(self.request.messages):
                threshold = spec.call_threshold
                bar = AFTER_RESULT_CALL_PROBABILITY
                if isinstance(threshold, float | int):
                    bar = max(bar, float(threshold))
                call = mass >= bar
            elif spec.call_threshold == CALIBRATED:
                baseline = session.allowed_mass("", spec.call_grammar)
                score = mass * mass / baseline if baseline > 0 else float("inf")
                self.stats.call_score = score
                call = score >= call_score_threshold(decider.name)
            else:
                assert isinstance(spec.call_threshold, float | int)
                call = mass >= spec.call_threshold
        except BaseException:
            session.close()
            raise
        decided = spec.decided(call=call)
        self.stats.call_decision = "call" if call else "answer"
        if call:
            session.close()
            self.prompts = self._render(decided)
        else:
            session.constrain(decided.grammar)
            sessions[role] = session
            self.prompts = plain
        self.markers = self.prompts.stop
        return decided

    def _render(self, output: OutputSpec) -> Prompts:
        fmt = self.request.base_format or self._pair.base_format
        template = self._pair.nudging.chat_template
        return render_prompts(self.request.messages, template, fmt, output)

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
    """A base model and a nudging model (text models of any backends), ready to answer."""

    def __init__(
        self,
        base: TextModel,
        nudging: TextModel,
        base_format: BasePromptFormat | None = None,
    ) -> None:
        self.base = base
        self.nudging = nudging
        self.base_format = base_format or BasePromptFormat()

    @classmethod
    def load(
        cls,
        base: Any = BUNDLED_BASE_ID,
        nudging: Any = BUNDLED_NUDGING_ID,
        *,
        base_format: BasePromptFormat | None = None,
        **options: Any,
    ) -> NudgingPair:
        """Both models from their specs (backends/registry.py's :func:`text_model`, which
        shares a model already built); ``options`` go to the backends (transformers:
        ``load_model``'s keywords)."""
        return cls(text_model(base, **options), text_model(nudging, **options), base_format)

    def generate(self, request: Request, scheduler: Scheduler = RUN_ALONE) -> Generation:
        """Prepare an answer to ``request``; nothing runs until the result is iterated.

        The sessions' model work goes through ``scheduler`` (an engine's, or at once alone).
        Bad input (an empty conversation, a prompt beyond a context window, an option a
        model's backend cannot serve) raises here.
        """
        return Generation(self, request, scheduler)

    def prepare(self, output: OutputSpec | None) -> None:
        """Build now what requests with ``output`` need, so that it is not built on the
        engine's worker (llguidance's view of each tokenizer: about 5 s for a 262k vocabulary,
        once per process)."""
        grammars = output is not None and output.constrained
        for model in (self.base, self.nudging):
            model.prepare(grammars)

    def prepared(self, output: OutputSpec | None) -> bool:
        """Whether requests with ``output`` need nothing more built (see :meth:`prepare`)."""
        grammars = output is not None and output.constrained
        return self.base.prepared(grammars) and self.nudging.prepared(grammars)

    @property
    def live_sessions(self) -> int:
        return self.base.live_sessions + self.nudging.live_sessions
