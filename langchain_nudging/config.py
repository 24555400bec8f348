"""Configuration of one nudged generation: validated once, frozen, hashable."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator


class SamplingConfig(BaseModel):
    """How one model picks its next token.

    ``temperature == 0`` is greedy decoding. Sampling only changes which token is picked:
    the base model's confidence is always its raw softmax top-1 probability
    (docs/algorithm.md, rule 6).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    temperature: float = Field(
        default=0.0, ge=0.0, le=100.0, description="0 means greedy; must be in [0, 100]."
    )
    top_p: float = Field(
        default=1.0, gt=0.0, le=1.0, description="Nucleus sampling mass; must be in (0, 1]."
    )
    top_k: int = Field(default=0, ge=0, description="Keep the k most likely tokens; 0 = all.")
    seed: int | None = Field(
        default=None,
        ge=0,
        le=2**64 - 1,
        description="Seed of this model's random generator (sampling only); in [0, 2**64 - 1].",
    )
    # Repetition controls (docs/generation.md). Their context is the answer so far, in this
    # model's own tokens (both models' text), never the prompt.
    repetition_penalty: float = Field(
        default=1.0,
        gt=0.0,
        le=10.0,
        description=(
            "Divides the positive logits (multiplies the negative ones) of tokens already in "
            "the answer, as transformers does (CTRL); 1 = off, > 1 discourages repeats; "
            "in (0, 10]."
        ),
    )
    frequency_penalty: float = Field(
        default=0.0,
        ge=-2.0,
        le=2.0,
        description=(
            "Subtracted from a token's logit once per time it is already in the answer "
            "(OpenAI's definition); 0 = off; in [-2, 2]."
        ),
    )
    presence_penalty: float = Field(
        default=0.0,
        ge=-2.0,
        le=2.0,
        description=(
            "Subtracted from the logit of every token already in the answer (OpenAI's "
            "definition); 0 = off; in [-2, 2]."
        ),
    )
    no_repeat_ngram_size: int = Field(
        default=0,
        ge=0,
        le=64,
        description=(
            "Never write an n-gram of this many tokens that is already in the answer; "
            "0 = off; in [0, 64]."
        ),
    )
    min_p: float = Field(
        default=0.0,
        ge=0.0,
        le=1.0,
        description=(
            "Sampling only: drop tokens less likely than min_p times the most likely one "
            "(after temperature); 0 = off; in [0, 1]."
        ),
    )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def penalized(self) -> bool:
        """Whether a choice depends on the answer so far, not only on the next logits."""
        return (
            self.repetition_penalty != 1.0
            or self.frequency_penalty != 0.0
            or self.presence_penalty != 0.0
            or self.no_repeat_ngram_size > 0
        )


def confident(top1_prob: float, gamma: float) -> bool:
    """gamma's rule, the one place it is written: the base model may write a token when its
    top-1 probability is at least gamma (a probability equal to gamma is confident)."""
    return top1_prob >= gamma


class NudgingConfig(BaseModel):
    """Every knob of the nudging algorithm (docs/algorithm.md states the rules).

    Defaults follow the authors of arXiv 2410.09300 (github.com/fywalter/nudging) unless noted.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    gamma: float = Field(
        default=0.4,
        ge=0.0,
        le=1.0,
        description=(
            "The base model writes only while its top-1 next-token probability is >= gamma. "
            "0.4 is the authors' README value and their Llama-2 setting (the paper finds "
            "0.2-0.5 robust); must be in [0, 1]."
        ),
    )
    draft_tokens: int = Field(
        default=16,
        ge=1,
        le=4096,
        description="Tokens the nudging model drafts per round (authors: 16); in [1, 4096].",
    )
    chunk_tokens: int = Field(
        default=16,
        ge=1,
        le=4096,
        description=(
            "Window of base tokens asked for at once; the base re-reads the answer as text at "
            "each window boundary (authors: 16); in [1, 4096]."
        ),
    )
    max_tokens: int = Field(
        default=512,
        ge=1,
        description="Answer length cap in base-tokenizer tokens, cut exactly (authors: 512).",
    )
    max_rounds: int = Field(
        default=150, ge=1, description="Round cap (authors' max_round = 150); >= 1."
    )
    max_same_nudges: int = Field(
        default=3,
        ge=1,
        description=(
            "Stop before the same accepted nudging words would be appended this many times "
            "more in a row (authors: 3, i.e. stop before the fourth)."
        ),
    )
    loop_passage_words: int = Field(
        default=5,
        ge=1,
        description=(
            "A base passage of more than this many words that already appears in the answer "
            "ends the base turn (authors' repetition_check, subseq_len=5)."
        ),
    )
    min_repeat_chars: int = Field(
        default=30,
        ge=1,
        description=(
            "An immediately repeated answer suffix of at least this many characters stops "
            "generation and is cut (authors' final clean-up, applied while generating)."
        ),
    )
    stop: tuple[str, ...] = Field(
        default=(), description="Stop strings searched in the joined answer (not included)."
    )
    repetition_stops: bool = Field(
        default=True,
        description=(
            "Whether the answer-level repetition rules (min_repeat_chars, max_same_nudges) "
            "apply. JSON-only answers turn them off: a repeated suffix would end the answer "
            "inside its JSON; the grammar's string cap and max_tokens bound loops instead."
        ),
    )
    base_sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    nudging_sampling: SamplingConfig = Field(default_factory=SamplingConfig)

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_as_tuple(cls, value: object) -> object:
        if value is None:
            return ()
        if isinstance(value, str):
            return (value,)
        return tuple(value) if isinstance(value, list | tuple) else value

    @field_validator("stop")
    @classmethod
    def _no_empty_stop(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if any(s == "" for s in value):
            raise ValueError("stop strings must be non-empty")
        return tuple(dict.fromkeys(value))


#: The algorithm's scalar knobs, each declared once above: the chat model's fields and per-call
#: options, the CLI's flags and the evaluation settings are derived from these.
ALGORITHM_KNOBS: tuple[str, ...] = (
    "gamma",
    "draft_tokens",
    "chunk_tokens",
    "max_tokens",
    "max_rounds",
    "max_same_nudges",
    "loop_passage_words",
    "min_repeat_chars",
)
#: The sampling knobs (SamplingConfig), applied to both models unless set per model.
SAMPLING_KNOBS: tuple[str, ...] = (
    "temperature",
    "top_p",
    "top_k",
    "seed",
    "repetition_penalty",
    "frequency_penalty",
    "presence_penalty",
    "no_repeat_ngram_size",
    "min_p",
)
