"""The LangChain layer: :class:`NudgedChatModel`, a chat model over a nudging pair."""

from .model import NudgedChatModel

__all__ = ["NudgedChatModel"]
