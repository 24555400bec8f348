"""Repetition controls on one model's logits: what the answer so far changes about a choice.

transformers' own processors where they exist (``RepetitionPenaltyLogitsProcessor``,
``NoRepeatNGramLogitsProcessor``); frequency and presence penalties as OpenAI defines them
(``logit -= frequency * count + presence * (count > 0)``), which transformers does not offer
(its repetition penalty is multiplicative and counts a token once). The context is the answer
so far in this model's own ids, never the prompt (docs/generation.md). They change which token
is chosen, never the raw softmax gamma is compared with.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import (
    LogitsProcessor,
    LogitsProcessorList,
    NoRepeatNGramLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
)

from ..config import SamplingConfig


class FrequencyPresencePenalty(LogitsProcessor):
    """OpenAI's frequency and presence penalties over the ids in ``input_ids``."""

    def __init__(self, frequency: float, presence: float) -> None:
        self.frequency = frequency
        self.presence = presence

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        counts = torch.zeros_like(scores).scatter_add_(
            1, input_ids, torch.ones_like(input_ids, dtype=scores.dtype)
        )
        return scores - counts * self.frequency - (counts > 0).to(scores.dtype) * self.presence  # type: ignore[return-value]


def penalty_processors(sampling: SamplingConfig) -> LogitsProcessorList:
    """The processors of ``sampling``'s repetition controls (empty when none is on)."""
    processors = LogitsProcessorList()
    if sampling.repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(sampling.repetition_penalty))
    if sampling.frequency_penalty or sampling.presence_penalty:
        processors.append(
            FrequencyPresencePenalty(sampling.frequency_penalty, sampling.presence_penalty)
        )
    if sampling.no_repeat_ngram_size:
        processors.append(NoRepeatNGramLogitsProcessor(sampling.no_repeat_ngram_size))
    return processors


class AnswerPenalties:
    """``sampling``'s repetition controls applied to one position's logits, given the answer
    ids before it."""

    def __init__(self, sampling: SamplingConfig) -> None:
        self.processors = penalty_processors(sampling)

    def __call__(self, answer_ids: Sequence[int], logits: torch.Tensor) -> torch.Tensor:
        ids = torch.tensor([list(answer_ids)], dtype=torch.long, device=logits.device)
        return self.processors(ids, logits[None, :].clone())[0]  # type: ignore[arg-type]


class AfterPrompt(LogitsProcessor):
    """Processors that read only the ids after the first ``start`` (a prompt's), for
    ``model.generate``: the penalties' context is the answer (the reference backend)."""

    def __init__(self, processors: LogitsProcessorList, start: int) -> None:
        self.processors = processors
        self.start = start

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        return self.processors(input_ids[:, self.start :], scores)  # type: ignore[arg-type,return-value]


def server_refusal(sampling: SamplingConfig, backend: str, unsupported: Sequence[str]) -> None:
    """Refuse, naming them, the repetition controls a server cannot apply as specified."""
    given = [name for name in unsupported if getattr(sampling, name) != _OFF[name]]
    if given:
        raise ValueError(
            f"{backend} cannot apply {', '.join(given)} as this library defines them (over the "
            "answer so far; docs/generation.md lists what each backend supports): leave "
            f"{'it' if len(given) == 1 else 'them'} at the default"
        )


_OFF = {
    "repetition_penalty": 1.0,
    "frequency_penalty": 0.0,
    "presence_penalty": 0.0,
    "no_repeat_ngram_size": 0,
    "min_p": 0.0,
}
