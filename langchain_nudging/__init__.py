"""langchain-nudging: nudging (arXiv 2410.09300) over a resident base/aligned model pair."""

from ._version import __version__
from .algorithm import NudgingRun, Segment
from .backends.base import ContextWindowError
from .backends.hf import PromptTooLongError
from .chat import NudgedChatModel
from .config import NudgingConfig, SamplingConfig
from .models import (
    BUNDLED_BASE_ID,
    BUNDLED_NUDGING_ID,
    LoadedModel,
    ModelLoadError,
    load_model,
    unload_model,
)
from .prompts import BasePromptFormat, ChatMessage
from .request import Request
from .serving.engine import EngineBusyError, EngineClosedError, EngineWorkerError
from .serving.generation import Generation, GenerationStats, NudgingPair
from .structured import GrammarError, IncompleteAnswerError

__all__ = [
    "BUNDLED_BASE_ID",
    "BUNDLED_NUDGING_ID",
    "BasePromptFormat",
    "ChatMessage",
    "ContextWindowError",
    "EngineBusyError",
    "EngineClosedError",
    "EngineWorkerError",
    "Generation",
    "GenerationStats",
    "GrammarError",
    "IncompleteAnswerError",
    "LoadedModel",
    "ModelLoadError",
    "NudgedChatModel",
    "NudgingConfig",
    "NudgingPair",
    "NudgingRun",
    "PromptTooLongError",
    "Request",
    "SamplingConfig",
    "Segment",
    "__version__",
    "load_model",
    "unload_model",
]
