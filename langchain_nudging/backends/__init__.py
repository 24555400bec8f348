"""Where tokens come from: backends answer text-level questions about ``prompt + answer``."""

from .base import TextModel, TextSession, Token

__all__ = ["TextModel", "TextSession", "Token"]
