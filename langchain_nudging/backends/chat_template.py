"""A transformers tokenizer's chat template, as the nudging model's prompt is rendered with it.

:class:`TokenizerTemplate` is the :class:`~langchain_nudging.backends.base.ChatTemplate` of a
transformers tokenizer: its control markers (every added and special token string), whether it
reads tools, and its rendering of a conversation that continues the final assistant message
(docs/prompts.md).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def marker_strings(tokenizer: PreTrainedTokenizerBase) -> tuple[str, ...]:
    """The strings that are control markers in a rendered chat template, longest first: every
    added token (``added_tokens_decoder``, which holds Gemma's ``<start_of_turn>`` although it is
    not among ``all_special_tokens``) and every special token, except whitespace-only ones
    (Gemma's runs of spaces and newlines are added tokens too, but only layout)."""
    found: set[str] = set()
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    for token in decoder.values():
        content = getattr(token, "content", token)
        if isinstance(content, str):
            found.add(content)
    for token in getattr(tokenizer, "all_special_tokens", None) or ():
        if isinstance(token, str):
            found.add(token)
    return tuple(sorted((t for t in found if t.strip()), key=lambda t: (-len(t), t)))


class TokenizerTemplate:
    """The chat template of a transformers tokenizer, read when it is made (a loaded model's
    tokenizer does not change afterwards)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer
        self.markers: Sequence[str] = marker_strings(tokenizer)
        template = getattr(tokenizer, "chat_template", None)
        templates = template.values() if isinstance(template, dict) else [template or ""]
        #: Whether the template renders a ``tools`` variable.
        self.reads_tools = any("tools" in t for t in templates)

    def render(
        self, messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] | None
    ) -> str:
        """``apply_chat_template`` with ``continue_final_message=True``, as text."""
        rendered = self.tokenizer.apply_chat_template(
            [dict(m) for m in messages],
            tools=None if tools is None else [dict(t) for t in tools],
            tokenize=False,
            continue_final_message=True,
        )
        return str(rendered)


def template_of(tokenizer: PreTrainedTokenizerBase) -> TokenizerTemplate | None:
    """The tokenizer's chat template; ``None`` when it has none (the model then reads the base
    transcript)."""
    return TokenizerTemplate(tokenizer) if getattr(tokenizer, "chat_template", None) else None
