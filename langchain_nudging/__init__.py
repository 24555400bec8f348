"""langchain-nudging: nudging (arXiv 2410.09300) over a resident base/aligned model pair."""

from ._version import __version__
from .algorithm import NudgingRun, Segment
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

__all__ = [
    "BUNDLED_BASE_ID",
    "BUNDLED_NUDGING_ID",
    "BasePromptFormat",
    "ChatMessage",
    "EngineBusyError",
    "EngineClosedError",
    "EngineWorkerError",
    "Generation",
    "GenerationStats",
    "LoadedModel",
    "ModelLoadError",
    "NudgedChatModel",
    "NudgingConfig",
    "NudgingPair",
    "NudgingRun",
    "Request",
    "SamplingConfig",
    "Segment",
    "__version__",
    "load_model",
    "unload_model",
]
