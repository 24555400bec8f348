"""Chat messages -> the base model's plain-text transcript and the nudging model's chat prompt.

Both prompts end where the answer starts; the answer text is appended to both verbatim, so the
two models always read the same answer.

The base model (pretrained only) reads a plain transcript::

    {system}
    Question: {first user message}
    Answer: {first assistant message}
    Question: {second user message}
    Answer: {answer so far}

Its turn markers (``"\\nQuestion:"``, ``"\\nAnswer:"``, ``"\\nResult:"``) are stop strings,
since a base model happily writes the next question itself. The nudging model reads the same
conversation through its own chat template, the answer so far being the start of the assistant
turn.

With tools or a response format (:class:`~langchain_nudging.structured.OutputSpec`), both
prompts carry its instructions after the system text; a tool call in the history is written as
the answer format's JSON (``{"name": ..., "arguments": ...}``) and a tool's result as a
``Result: ...`` line (base) or a user turn ``Result of <tool>: ...`` (chat). A chat template that
knows tools (it reads a ``tools`` variable) gets the tools, the calls and the ``tool`` turns in
its own format instead (docs/tools.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from .structured import OutputSpec, ToolCall

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

Role = Literal["system", "user", "assistant", "tool"]
DEFAULT_SYSTEM = "You are a helpful assistant."
_SENTINEL = "NUDGINGANSWERSTARTSHERE"


@dataclass(frozen=True, slots=True)
class ChatMessage:
    """One message. An assistant message may carry ``tool_calls``; a ``tool`` message is a
    tool's result, with the tool's ``name`` and the ``tool_call_id`` it answers."""

    role: Role
    content: str
    tool_calls: tuple[ToolCall, ...] = ()
    name: str | None = None
    tool_call_id: str | None = None

    def text(self) -> str:
        """The message as answer text: its content, then each tool call's JSON on a line."""
        return "\n".join([p for p in (self.content,) if p] + [c.text() for c in self.tool_calls])


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
    tool_prefix: str = Field(default="Result: ", min_length=1)
    separator: str = Field(default="\n", min_length=1)

    @property
    def stop(self) -> tuple[str, ...]:
        """Turn markers that end the base model's answer."""
        markers = (self.user_prefix.strip(), self.assistant_prefix.strip())
        return tuple(self.separator + m for m in markers if m)

    @property
    def tool_stop(self) -> str:
        """The tool-result marker, a stop string when tools take part in the conversation."""
        return self.separator + self.tool_prefix.strip()


@dataclass(frozen=True, slots=True)
class Prompts:
    """Both prompts of one request and the stop strings the base transcript needs."""

    base: str
    nudging: str
    stop: tuple[str, ...]


def normalize(messages: Sequence[ChatMessage]) -> tuple[str | None, list[ChatMessage], str]:
    """Split into (system, turns, answer prefix) and check the conversation.

    Consecutive user (or assistant) messages are joined (many templates insist on
    alternation); tool messages stay one turn each. A final assistant message without tool
    calls is the start of the answer, which the model continues.
    """
    if not messages:
        raise ValueError("messages: the conversation is empty; give at least one user message")
    system_parts: list[str] = []
    turns: list[ChatMessage] = []
    for index, message in enumerate(messages):
        if message.role not in ("system", "user", "assistant", "tool"):
            raise ValueError(
                f"messages[{index}].role: {message.role!r} is not one of "
                "'system', 'user', 'assistant', 'tool'"
            )
        if message.tool_calls and message.role != "assistant":
            raise ValueError(f"messages[{index}]: only assistant messages carry tool calls")
        if message.role == "system":
            system_parts.append(message.content)
        elif turns and turns[-1].role == message.role != "tool":
            last = turns[-1]
            content = "\n\n".join(p for p in (last.content, message.content) if p)
            turns[-1] = ChatMessage(message.role, content, (*last.tool_calls, *message.tool_calls))
        else:
            turns.append(message)
    if not any(t.role == "user" for t in turns):
        raise ValueError("messages: the conversation needs at least one user message")
    prefix = ""
    if turns[-1].role == "assistant" and not turns[-1].tool_calls:
        prefix = turns.pop().content
    system = "\n\n".join(system_parts) if system_parts else None
    return system, turns, prefix


def base_prompt(
    system: str | None, turns: Sequence[ChatMessage], prefix: str, fmt: BasePromptFormat
) -> str:
    lines = [system if system is not None else fmt.system]
    labels = {"user": fmt.user_prefix, "assistant": fmt.assistant_prefix, "tool": fmt.tool_prefix}
    lines.extend(labels[turn.role] + turn.text() for turn in turns)
    lines.append(fmt.assistant_prefix + prefix)
    return fmt.separator.join(lines)


def chat_prompt(
    tokenizer: PreTrainedTokenizerBase,
    system: str | None,
    turns: Sequence[ChatMessage],
    prefix: str,
    tools: Sequence[dict[str, Any]] | None = None,
) -> str:
    """The chat template's rendering, cut where the assistant's answer starts.

    The template renders a sentinel as the final assistant message with
    ``continue_final_message=True``; the prompt is everything before the sentinel. Templates
    that reject a system role get the system text at the head of the first user message.
    ``tools`` (OpenAI-style function definitions) go to a template that reads them; the turns
    then keep their tool calls and ``tool`` roles for the template to render.
    """
    native = tools is not None
    chat = [_template_message(t, native) for t in _plain_turns(turns, native)]
    chat.append({"role": "assistant", "content": prefix + _SENTINEL})
    with_system = [{"role": "system", "content": system}, *chat] if system else chat
    try:
        rendered = _render(tokenizer, with_system, tools)
    except Exception:  # templates raise errors of their own for a system role
        if not system:
            raise
        first_user = next(i for i, m in enumerate(chat) if m["role"] == "user")
        folded = [dict(m) for m in chat]
        folded[first_user]["content"] = system + "\n\n" + folded[first_user]["content"]
        rendered = _render(tokenizer, folded, tools)
    if not rendered.endswith(_SENTINEL):
        raise ValueError("the nudging model's chat template does not end with the answer")
    return rendered[: -len(_SENTINEL)]


def reads_tools(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether the tokenizer's chat template renders a ``tools`` variable."""
    template = getattr(tokenizer, "chat_template", None)
    templates = template.values() if isinstance(template, dict) else [template or ""]
    return any("tools" in t for t in templates)


def _plain_turns(turns: Sequence[ChatMessage], native: bool) -> list[ChatMessage]:
    """For a template that knows no tools: a tool's result becomes a user turn."""
    if native:
        return list(turns)
    out: list[ChatMessage] = []
    for turn in turns:
        if turn.role == "tool":
            label = f"Result of {turn.name}" if turn.name else "Result"
            turn = ChatMessage("user", f"{label}: {turn.content}")
        if out and out[-1].role == turn.role == "user":
            out[-1] = ChatMessage("user", out[-1].content + "\n\n" + turn.content)
        else:
            out.append(turn)
    return out


def _template_message(turn: ChatMessage, native: bool) -> dict[str, Any]:
    if not native or not (turn.tool_calls or turn.role == "tool"):
        return {"role": turn.role, "content": turn.text()}
    if turn.role == "tool":
        return {
            "role": "tool",
            "content": turn.content,
            "name": turn.name,
            "tool_call_id": turn.tool_call_id,
        }
    calls = [
        {
            "id": call.id,
            "type": "function",
            "function": {"name": call.name, "arguments": call.arguments},
        }
        for call in turn.tool_calls
    ]
    return {"role": "assistant", "content": turn.content, "tool_calls": calls}


def _render(
    tokenizer: PreTrainedTokenizerBase,
    chat: list[dict[str, Any]],
    tools: Sequence[dict[str, Any]] | None = None,
) -> str:
    return tokenizer.apply_chat_template(
        chat, tools=tools, tokenize=False, continue_final_message=True
    )


def render_prompts(
    messages: Sequence[ChatMessage],
    nudging_tokenizer: PreTrainedTokenizerBase,
    fmt: BasePromptFormat | None = None,
    output: OutputSpec | None = None,
) -> Prompts:
    """Both prompts for one conversation (and what its answer must be).

    A nudging tokenizer without a chat template reads the base transcript too.
    """
    fmt = fmt or BasePromptFormat()
    system, turns, prefix = normalize(messages)
    output = output or OutputSpec()
    instructions = output.instructions()
    base_system = system if system is not None else fmt.system
    if instructions:
        base_system += "\n\n" + instructions
    base = base_prompt(base_system, turns, prefix, fmt)
    stop = fmt.stop
    if output.callable_tools or any(t.role == "tool" or t.tool_calls for t in turns):
        stop = (*stop, fmt.tool_stop)
    if not getattr(nudging_tokenizer, "chat_template", None):
        return Prompts(base=base, nudging=base, stop=stop)
    tools = None
    chat_system = system or fmt.system
    if output.callable_tools and reads_tools(nudging_tokenizer):
        # The template lists the tools itself; the system keeps the format rules.
        tools = [tool.openai() for tool in output.callable_tools]
        instructions = output.instructions(list_tools=False)
    if instructions:
        chat_system += "\n\n" + instructions
    nudging = chat_prompt(nudging_tokenizer, chat_system, turns, prefix, tools)
    return Prompts(base=base, nudging=nudging, stop=stop)
