"""One request, as a single value that flows down: adapter -> engine -> pair -> generation."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from .config import NudgingConfig
from .prompts import BasePromptFormat, ChatMessage
from .structured import OutputSpec

Mode = Literal["nudged", "base", "nudging"]
MODES: tuple[Mode, ...] = ("nudged", "base", "nudging")


@dataclass(frozen=True)
class Request:
    """What to answer and how.

    ``mode`` is ``"nudged"``, or a baseline with the same prompts and stop rules: ``"base"``
    (the base model alone) or ``"nudging"`` (the nudging model alone). ``base_format``
    (``None``: the pair's own) is the base model's transcript format; ``output`` what the
    answer must be (tools, a JSON schema).
    """

    messages: Sequence[ChatMessage]
    config: NudgingConfig = field(default_factory=NudgingConfig)
    mode: Mode = "nudged"
    base_format: BasePromptFormat | None = None
    output: OutputSpec = field(default_factory=OutputSpec)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode: {self.mode!r} is not one of 'nudged', 'base', 'nudging'")
        object.__setattr__(self, "messages", tuple(self.messages))
