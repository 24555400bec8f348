"""Where tokens come from: backends answer text-level questions about ``prompt + answer``."""

from .base import ContextWindowError, TextModel, TextSession, Token

__all__ = ["ContextWindowError", "TextModel", "TextSession", "Token"]
