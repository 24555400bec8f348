"""Chat messages -> the base model's plain-text transcript and the nudging model's chat prompt.

Both prompts end where the answer starts; the answer text is appended to both verbatim, so the
two models always read the same answer.

The base model (pretrained only) reads a plain transcript::

    {system}
    Question: {first user message}
    Answer: {first assistant message}
    Question: {second user message}
    Answer: {answer so far}

Its turn markers (``"\\nQuestion:"``, ``"\\nAnswer:"``) are stop strings, since a base model
happily writes the next question itself. The nudging model reads the same conversation through
its own chat template, the answer so far being the start of the assistant turn.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

Role = Literal["system", "user", "assistant"]
DEFAULT_SYSTEM = "You are a helpful assistant."
_SENTINEL = "NUDGINGANSWERSTARTSHERE"


@dataclass(frozen=True, slots=True)
class ChatMessage:
    role: Role
    content: str


class BasePromptFormat(BaseModel):
    """The base model's transcript format.

    The authors' single-turn prompt is ``"{system}\\n{instruction}\\n{response_prefix}"``.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    system: str = Field(
        default=DEFAULT_SYSTEM,
        description="System line used when the conversation has no system message.",
    )
    user_prefix: str = Field(default="Question: ", min_length=1)
    assistant_prefix: str = Field(default="Answer: ", min_length=1)
    separator: str = Field(default="\n", min_length=1)

    @property
    def stop(self) -> tuple[str, ...]:
        """Turn markers that end the base model's answer."""
        markers = (self.user_prefix.strip(), self.assistant_prefix.strip())
        return tuple(self.separator + m for m in markers if m)


@dataclass(frozen=True, slots=True)
class Prompts:
    """Both prompts of one request and the stop strings the base transcript needs."""

    base: str
    nudging: str
    stop: tuple[str, ...]


def normalize(messages: Sequence[ChatMessage]) -> tuple[str | None, list[ChatMessage], str]:
    """Split into (system, alternating turns, answer prefix) and check the conversation.

    Consecutive messages of one role are joined (many templates insist on alternation); a
    final assistant message is the start of the answer, which the model continues.
    """
    if not messages:
        raise ValueError("messages: the conversation is empty; give at least one user message")
    system_parts: list[str] = []
    turns: list[ChatMessage] = []
    for index, message in enumerate(messages):
        if message.role not in ("system", "user", "assistant"):
            raise ValueError(
                f"messages[{index}].role: {message.role!r} is not one of "
                "'system', 'user', 'assistant'"
            )
        if message.role == "system":
            system_parts.append(message.content)
        elif turns and turns[-1].role == message.role:
            turns[-1] = ChatMessage(message.role, turns[-1].content + "\n\n" + message.content)
        else:
            turns.append(message)
    if not any(t.role == "user" for t in turns):
        raise ValueError("messages: the conversation needs at least one user message")
    prefix = ""
    if turns[-1].role == "assistant":
        prefix = turns.pop().content
    system = "\n\n".join(system_parts) if system_parts else None
    return system, turns, prefix


def base_prompt(
    system: str | None, turns: Sequence[ChatMessage], prefix: str, fmt: BasePromptFormat
) -> str:
    lines = [system if system is not None else fmt.system]
    for turn in turns:
        label = fmt.user_prefix if turn.role == "user" else fmt.assistant_prefix
        lines.append(label + turn.content)
    lines.append(fmt.assistant_prefix + prefix)
    return fmt.separator.join(lines)


def chat_prompt(
    tokenizer: PreTrainedTokenizerBase,
    system: str | None,
    turns: Sequence[ChatMessage],
    prefix: str,
) -> str:
    """The chat template's rendering, cut where the assistant's answer starts.

    The template renders a sentinel as the final assistant message with
    ``continue_final_message=True``; the prompt is everything before the sentinel. Templates
    that reject a system role get the system text at the head of the first user message.
    """
    chat = [{"role": t.role, "content": t.content} for t in turns]
    chat.append({"role": "assistant", "content": prefix + _SENTINEL})
    with_system = [{"role": "system", "content": system}, *chat] if system else chat
    try:
        rendered = _render(tokenizer, with_system)
    except Exception:  # templates raise errors of their own for a system role
        if not system:
            raise
        first_user = next(i for i, m in enumerate(chat) if m["role"] == "user")
        folded = [dict(m) for m in chat]
        folded[first_user]["content"] = system + "\n\n" + folded[first_user]["content"]
        rendered = _render(tokenizer, folded)
    if not rendered.endswith(_SENTINEL):
        raise ValueError("the nudging model's chat template does not end with the answer")
    return rendered[: -len(_SENTINEL)]


def _render(tokenizer: PreTrainedTokenizerBase, chat: list[dict[str, str]]) -> str:
    return tokenizer.apply_chat_template(chat, tokenize=False, continue_final_message=True)


def render_prompts(
    messages: Sequence[ChatMessage],
    nudging_tokenizer: PreTrainedTokenizerBase,
    fmt: BasePromptFormat | None = None,
) -> Prompts:
    """Both prompts for one conversation.

    A nudging tokenizer without a chat template reads the base transcript too.
    """
    fmt = fmt or BasePromptFormat()
    system, turns, prefix = normalize(messages)
    base = base_prompt(system, turns, prefix, fmt)
    if getattr(nudging_tokenizer, "chat_template", None):
        nudging = chat_prompt(nudging_tokenizer, system or fmt.system, turns, prefix)
    else:
        nudging = base
    return Prompts(base=base, nudging=nudging, stop=fmt.stop)
