"""The knobs of a call: the chat model's knob fields, the per-call options, and fields plus
options turned into one :class:`~langchain_nudging.request.Request` (docs/chat_model.md).

Every algorithm and sampling knob is declared once, in :class:`~langchain_nudging.config.
NudgingConfig` and :class:`~langchain_nudging.config.SamplingConfig` (``ALGORITHM_KNOBS``,
``SAMPLING_KNOBS``): its name, default, range and description reach the chat model's fields,
the per-call options and the config from there.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator
from pydantic.fields import FieldInfo

from ..backends.registry import check_spec
from ..config import ALGORITHM_KNOBS, SAMPLING_KNOBS, NudgingConfig, SamplingConfig
from ..request import Mode, Request

Seconds = Annotated[float, Field(gt=0.0, le=threading.TIMEOUT_MAX)]

#: Each knob's declaration, from the configs: name -> its field there.
KNOBS: dict[str, FieldInfo] = {
    **{name: NudgingConfig.model_fields[name] for name in ALGORITHM_KNOBS},
    **{name: SamplingConfig.model_fields[name] for name in SAMPLING_KNOBS},
}
_SAMPLING_NOTE = " Both models, unless nudging_sampling is set."


def _constrained(info: FieldInfo) -> Any:
    """A knob's type with its range (``Annotated[int, Ge(1), Le(4096)]``)."""
    return Annotated[(info.annotation, *info.metadata)]


def knob_fields() -> dict[str, Any]:
    """The chat model's knob fields: each knob's type, range, default and description."""
    return {
        name: (
            _constrained(info),
            Field(
                default=info.default,
                description=(info.description or "")
                + (_SAMPLING_NOTE if name in SAMPLING_KNOBS else ""),
            ),
        )
        for name, info in KNOBS.items()
    }


if TYPE_CHECKING:  # the knobs are read by name (getattr), so a type checker needs none
    _OptionalKnobs = BaseModel
else:
    _OptionalKnobs = create_model(
        "_OptionalKnobs",
        __config__=ConfigDict(extra="forbid", arbitrary_types_allowed=True),
        **{name: (_constrained(info) | None, None) for name, info in KNOBS.items()},
    )


class CallOptions(_OptionalKnobs):
    """What one call may override, validated with the constraints of the fields."""

    model: Any = None
    mode: Mode | None = None
    timeout: Seconds | None = None
    # Tools and structured output (set by bind_tools / with_structured_output / bind).
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    response_format: Any = None
    parallel_tool_calls: bool | None = None
    strict: bool | None = None
    ls_structured_output_format: Any = None  # LangSmith's record of the requested format

    @field_validator("model")
    @classmethod
    def _model(cls, value: Any) -> Any:
        return None if value is None else check_spec(value, "model")


OPTION_NAMES: tuple[str, ...] = tuple(CallOptions.model_fields)
_IGNORED_OPTIONS = frozenset({"stream"})  # LangChain's own switch, already acted on


def short_errors(error: ValidationError) -> str:
    """A pydantic error in one line: ``field=value: message; ...``."""
    return "; ".join(
        f"{'.'.join(str(p) for p in e['loc']) or 'value'}={e.get('input')!r}: {e['msg']}"
        for e in error.errors()
    )


def call_options(kwargs: Mapping[str, Any]) -> CallOptions:
    """A call's keyword options, validated (``None`` means unset); unknown names are an error."""
    unknown = sorted(set(kwargs) - set(OPTION_NAMES) - _IGNORED_OPTIONS)
    if unknown:
        raise ValueError(
            f"unknown option(s) {unknown} for NudgedChatModel; per-call options are "
            f"stop, {', '.join(OPTION_NAMES)}"
        )
    given = {k: v for k, v in kwargs.items() if k in OPTION_NAMES and v is not None}
    try:
        return CallOptions.model_validate(given)
    except ValidationError as error:
        raise ValueError(f"invalid option(s): {short_errors(error)}") from None


def stop_list(stop: Any) -> list[str]:
    """A call's ``stop`` (``None``, a string or a list of non-empty strings) as a list."""
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and (
        not isinstance(stop, list | tuple) or any(not isinstance(s, str) or not s for s in stop)
    ):
        raise ValueError(f"stop={stop!r}: stop strings must be non-empty strings")
    return list(stop or [])


def nudging_config(
    knobs: Mapping[str, Any], stop: Sequence[str], nudging_sampling: SamplingConfig | None
) -> NudgingConfig:
    """The config of a call whose knob values are ``knobs`` (every knob, fields and options
    merged); the sampling knobs set both models unless ``nudging_sampling`` is given."""
    try:
        sampling = SamplingConfig(**{name: knobs[name] for name in SAMPLING_KNOBS})
        return NudgingConfig(
            **{name: knobs[name] for name in ALGORITHM_KNOBS},
            stop=tuple(dict.fromkeys(stop)),
            base_sampling=sampling,
            nudging_sampling=nudging_sampling or sampling,
        )
    except ValidationError as error:
        raise ValueError(f"invalid option(s): {short_errors(error)}") from None


@dataclass(frozen=True)
class Call:
    """One call, validated: the request to submit, the base model that serves it (its spec)
    and its time limit."""

    request: Request
    base: Any
    timeout: float | None
