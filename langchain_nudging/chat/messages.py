"""LangChain messages -> the prompts' :class:`~langchain_nudging.prompts.ChatMessage` list,
and the input checks that name the first message a call cannot take (docs/chat_model.md)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from langchain_core.messages import (
    AIMessage,
    BaseMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
    convert_to_messages,
)
from langchain_core.messages import ChatMessage as LangChainChatMessage
from langchain_core.prompt_values import PromptValue
from pydantic import ValidationError

from ..prompts import ChatMessage, Role
from ..structured import ToolCall
from .options import short_errors

_ROLES: dict[str, Role] = {
    "system": "system",
    "developer": "system",
    "human": "user",
    "user": "user",
    "ai": "assistant",
    "assistant": "assistant",
}

# Content blocks of an AI message that repeat its tool calls (Anthropic, OpenAI Responses).
_TOOL_CALL_BLOCKS = frozenset({"tool_use", "tool_call", "function_call", "server_tool_use"})


def to_chat_messages(messages: Sequence[BaseMessage]) -> list[ChatMessage]:
    """LangChain messages -> the engine's ``ChatMessage`` list, or a ``ValueError`` naming the
    first message (and content block) it cannot take, an empty or whitespace-only human message
    included (the models would answer nothing with random text). ``name`` is accepted and not
    rendered, except on a tool message (the tool's name)."""
    if not messages:
        raise ValueError("messages: the conversation is empty; pass at least one human message")
    converted = []
    tool_names: dict[str, str] = {}  # tool call id -> tool name, for tool messages without one
    for index, message in enumerate(messages):
        role = _role(message, index)
        if isinstance(message, AIMessage):
            calls = tuple(_tool_call(call, index, k) for k, call in enumerate(message.tool_calls))
            tool_names.update({c.id: c.name for c in calls if c.id})
            text = _text(message.content, index, skip=_TOOL_CALL_BLOCKS)
            converted.append(ChatMessage(role, text, calls))
        elif isinstance(message, ToolMessage):
            name = message.name or tool_names.get(message.tool_call_id)
            text = _text(message.content, index)
            if message.status == "error":
                text = f"Error: {text}" if not text.lower().startswith("error") else text
            converted.append(
                ChatMessage(
                    role,
                    text,
                    name=name if isinstance(name, str) else None,
                    tool_call_id=_optional_str(message.tool_call_id, index, "tool_call_id"),
                )
            )
        else:
            text = _text(message.content, index)
            if role == "user" and not text.strip():
                raise ValueError(
                    f"messages[{index}]: the human message is empty"
                    f"{' (only whitespace)' if text else ''}; pass a question or an instruction"
                )
            converted.append(ChatMessage(role, text))
    return converted


def check_input(model_input: Any) -> None:
    """A clear ``ValueError`` naming the first item of a message list LangChain cannot read."""
    if isinstance(model_input, bytes | bytearray):
        raise ValueError("input: bytes are not supported; pass a string or a list of messages")
    if not isinstance(model_input, Sequence) or isinstance(model_input, str | PromptValue):
        return
    for index, item in enumerate(model_input):
        try:
            convert_to_messages([item])
        except ValidationError as error:
            raise ValueError(f"messages[{index}]: {short_errors(error)}") from None
        except (NotImplementedError, ValueError, TypeError, KeyError) as error:
            detail = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
            raise ValueError(
                f"messages[{index}]: {type(item).__name__} is not a message ({detail[:200]}); "
                "pass LangChain messages, (role, text) tuples, strings or "
                "{'role': ..., 'content': ...} dicts"
            ) from None


def _tool_call(call: Any, index: int, number: int) -> ToolCall:
    where = f"messages[{index}].tool_calls[{number}]"
    if not isinstance(call, dict):
        raise ValueError(f"{where}: expected a tool call dict, got {type(call).__name__}")
    name, args = call.get("name"), call.get("args", {})
    if not isinstance(name, str) or not name:
        raise ValueError(f"{where}.name: expected the tool's name, got {name!r}")
    if not isinstance(args, dict):
        raise ValueError(f"{where}.args: expected a dict of arguments, got {type(args).__name__}")
    return ToolCall(name, dict(args), _optional_str(call.get("id"), index, "tool call id"))


def _optional_str(value: Any, index: int, field: str) -> str | None:
    if value is None or isinstance(value, str):
        return value
    raise ValueError(f"messages[{index}].{field}: expected a string, got {type(value).__name__}")


def _role(message: BaseMessage, index: int) -> Role:
    if isinstance(message, AIMessage):
        return "assistant"
    if isinstance(message, HumanMessage):
        return "user"
    if isinstance(message, SystemMessage):
        return "system"
    if isinstance(message, ToolMessage):
        return "tool"
    if isinstance(message, LangChainChatMessage) and message.role.lower() in _ROLES:
        return _ROLES[message.role.lower()]
    kind = type(message).__name__
    if isinstance(message, LangChainChatMessage):
        kind += f" with role {message.role!r}"
    raise ValueError(
        f"messages[{index}]: {kind} is not supported; use system, human, AI or tool messages "
        f"(or a ChatMessage with role one of {sorted(_ROLES)})"
    )


def _text(content: Any, index: int, skip: frozenset[str] = frozenset()) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list | tuple):
        raise ValueError(
            f"messages[{index}].content: {type(content).__name__} content is not supported; "
            "NudgedChatModel reads text only (a string or a list of text blocks)"
        )
    parts = []
    for number, block in enumerate(content):
        if isinstance(block, str):
            parts.append(block)
        elif isinstance(block, dict) and block.get("type") == "text":
            parts.append(str(block.get("text", "")))
        elif isinstance(block, dict) and block.get("type") in skip:
            continue
        else:
            kind = block.get("type") if isinstance(block, dict) else type(block).__name__
            raise ValueError(
                f"messages[{index}].content[{number}]: {kind!r} content is not supported; "
                "NudgedChatModel reads text only (strings or {'type': 'text'} blocks)"
            )
    return "".join(parts)
