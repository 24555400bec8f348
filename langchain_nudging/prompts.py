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
``Result: ...`` line (base) or a user turn ``Result of <tool>: ...`` (chat; the last one,
when the answer follows it, also asks for the answer to state the result). A chat template that
knows tools (it reads a ``tools`` variable) gets the tools, the calls and the ``tool`` turns in
its own format instead (docs/tools.md).

Both prompts are :class:`~langchain_nudging.backends.base.Prompt` objects. The base transcript
is all text (no control markers) and a line of a message's content that starts with a turn
label (``"Question:"``, ``"Answer:"``, ``"Result:"``) gets a leading space, so that it does not
read as a turn. In the chat prompt only the template's own markers are control markers: a
special-token string inside a message (``"<|im_end|>"``, ``"<start_of_turn>"``) is text.
docs/prompts.md states both rules.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from .backends.base import ChatTemplate, Prompt
from .structured import OutputSpec, ToolCall

Role = Literal["system", "user", "assistant", "tool"]
DEFAULT_SYSTEM = "You are a helpful assistant."
_SENTINEL = "NUDGINGANSWERSTARTSHERE"
#: After the tool results that the answer follows (chat template without tools): a small
#: model otherwise restates the question ("The calculator returns the result of ...").
ANSWER_FROM_RESULT = "Answer my question with this result, stating it."


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
    """Both prompts of one request and the stop strings the base transcript needs.

    ``base`` has no control markers; ``nudging`` marks its chat template's own markers (none
    when the nudging model reads the base transcript).
    """

    base: Prompt
    nudging: Prompt
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
    """The base transcript (see the module docstring); content lines that start with a turn
    label are neutralised (:func:`neutralise_labels`), the answer prefix is kept verbatim."""
    first = system if system is not None else fmt.system
    lines = [neutralise_labels(first, fmt, first_line=True)]
    labels = {"user": fmt.user_prefix, "assistant": fmt.assistant_prefix, "tool": fmt.tool_prefix}
    lines.extend(labels[turn.role] + neutralise_labels(turn.text(), fmt) for turn in turns)
    lines.append(fmt.assistant_prefix + prefix)
    return fmt.separator.join(lines)


def neutralise_labels(text: str, fmt: BasePromptFormat, first_line: bool = False) -> str:
    """``text`` with a space before each turn label that starts one of its lines.

    A turn label is a prefix of ``fmt`` stripped (``"Question:"``, ``"Answer:"``,
    ``"Result:"``); a line starts after ``fmt.separator``, and at the start of ``text`` when
    ``first_line`` (the system text, which opens the transcript). ``"\nAnswer: 4"`` becomes
    ``"\n Answer: 4"``: it no longer reads as a turn, nor matches a stop string.
    """
    labels = [p.strip() for p in (fmt.user_prefix, fmt.assistant_prefix, fmt.tool_prefix)]
    labels = sorted({label for label in labels if label}, key=len, reverse=True)
    if not labels or not text:
        return text
    start = r"\A|" if first_line else ""
    pattern = f"({start}{re.escape(fmt.separator)})(?={'|'.join(map(re.escape, labels))})"
    return re.sub(pattern, r"\1 ", text)


def chat_prompt(
    template: ChatTemplate,
    system: str | None,
    turns: Sequence[ChatMessage],
    prefix: str,
    tools: Sequence[dict[str, Any]] | None = None,
) -> Prompt:
    """The chat template's rendering, cut where the assistant's answer starts.

    The template renders a sentinel as the final assistant message with
    ``continue_final_message=True``; the prompt is everything before the sentinel. Templates
    that reject a system role get the system text at the head of the first user message.
    ``tools`` (OpenAI-style function definitions) go to a template that reads them; the turns
    then keep their tool calls and ``tool`` roles for the template to render. ``system=None``
    leaves the system to the template; ``""`` is an explicit empty system message.

    The result's ``controls`` are the template's own markers: every one of
    ``template.markers`` in the messages (and in ``tools``) is swapped for a placeholder while
    the template renders, and put back as text (:class:`_Markers`).
    """
    markers = _Markers(template.markers)
    native = tools is not None
    plain = [_template_message(t, native) for t in _plain_turns(turns, native)]
    chat = [markers.hide_message(m) for m in plain]
    chat.append({"role": "assistant", "content": markers.hide(prefix) + _SENTINEL})
    hidden_system = markers.hide(system) if system is not None else None
    hidden_tools = markers.hide(list(tools), required=False) if tools is not None else None
    if hidden_system is not None:
        with_system = [{"role": "system", "content": hidden_system}, *chat]
    else:
        with_system = chat
    try:
        rendered = template.render(with_system, hidden_tools)
    except Exception:  # templates raise errors of their own for a system role
        if hidden_system is None:
            raise
        folded = [dict(m) for m in chat]
        if hidden_system:
            first_user = next(i for i, m in enumerate(chat) if m["role"] == "user")
            folded[first_user]["content"] = hidden_system + "\n\n" + folded[first_user]["content"]
        rendered = template.render(folded, hidden_tools)
    if not rendered.endswith(_SENTINEL):
        raise ValueError("the nudging model's chat template does not end with the answer")
    return markers.reveal(rendered[: -len(_SENTINEL)])


# Placeholders: U+F0000 <hex digits U+F0010..U+F001F> U+F0001, private-use characters that no
# tokenizer treats specially. Such characters already in a message are hidden the same way.
_OPEN, _CLOSE, _DIGIT0 = "\U000f0000", "\U000f0001", 0xF0010
_RESERVED = re.compile("[\U000f0000-\U000f001f]")
_PLACEHOLDER = re.compile("\U000f0000([\U000f0010-\U000f001f]+)\U000f0001")


def _placeholder(index: int) -> str:
    return _OPEN + "".join(chr(_DIGIT0 + int(d, 16)) for d in f"{index:x}") + _CLOSE


@dataclass(frozen=True, slots=True)
class _MarkerTable:
    """A template's marker strings, arranged for a leftmost-longest scan."""

    by_length: dict[int, frozenset[str]]
    lengths: tuple[int, ...]  # longest first
    candidates: re.Pattern[str]  # a character that may start a marker or a placeholder


@functools.lru_cache(maxsize=16)
def _table(strings: tuple[str, ...]) -> _MarkerTable:
    """The scan table of a template's markers (built once per set of markers)."""
    groups: dict[int, set[str]] = {}
    for text in strings:
        groups.setdefault(len(text), set()).add(text)
    firsts = "".join(re.escape(c) for c in sorted({text[0] for text in strings}))
    return _MarkerTable(
        {n: frozenset(g) for n, g in groups.items()},
        tuple(sorted(groups, reverse=True)),
        re.compile(f"[{firsts}\U000f0000-\U000f001f]"),
    )


class _Markers:
    """Hides special-token strings in a chat's text and finds the template's own markers."""

    def __init__(self, markers: Sequence[str]) -> None:
        table = _table(tuple(markers))
        self.by_length = table.by_length
        self.lengths = table.lengths
        self.candidates = table.candidates
        self.hidden: list[str] = []  # placeholder index -> the original text
        self.required: set[int] = set()  # placeholders the template must render

    def _matches(self, text: str) -> Iterator[tuple[int, int]]:
        """Leftmost-longest, non-overlapping marker strings and reserved characters in text."""
        position = 0
        for found in self.candidates.finditer(text):
            start = found.start()
            if start < position:
                continue
            if _RESERVED.match(text, start):
                yield start, start + 1
                position = start + 1
                continue
            for length in self.lengths:
                if text[start : start + length] in self.by_length[length]:
                    yield start, start + length
                    position = start + length
                    break

    def hide(self, value: Any, required: bool = True) -> Any:
        """``value`` (strings, in dicts, lists and tuples) with each marker string replaced.

        The template must render every ``required`` placeholder (message text); others (ids,
        names, tool definitions) are ones a template may leave out.
        """
        if isinstance(value, str):
            pieces, last = [], 0
            for start, end in self._matches(value):
                if required:
                    self.required.add(len(self.hidden))
                pieces += [value[last:start], _placeholder(len(self.hidden))]
                self.hidden.append(value[start:end])
                last = end
            return "".join(pieces) + value[last:] if pieces else value
        if isinstance(value, dict):
            return {self.hide(k, required): self.hide(v, required) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return type(value)(self.hide(v, required) for v in value)
        return value

    def hide_message(self, message: dict[str, Any]) -> dict[str, Any]:
        """A template message with every string in it hidden (names, ids and tool calls too);
        the template must render what its ``content`` held."""
        return {k: self.hide(v, required=k == "content") for k, v in message.items()}

    def reveal(self, rendered: str) -> Prompt:
        """The prompt: placeholders back to their text, marker strings as control spans, in
        one pass over the rendered template."""
        out: list[str] = []
        controls: list[tuple[int, int]] = []
        size, last, seen = 0, 0, set()
        for start, end in self._matches(rendered):
            if start < last:  # inside a placeholder just read
                continue
            out.append(rendered[last:start])
            size += start - last
            piece = rendered[start:end]
            if _RESERVED.match(piece):
                placeholder = _PLACEHOLDER.match(rendered, start)
                if placeholder is None:
                    raise self._changed()
                index = int("".join(f"{ord(c) - _DIGIT0:x}" for c in placeholder.group(1)), 16)
                if index >= len(self.hidden):
                    raise self._changed()
                seen.add(index)
                piece, end = self.hidden[index], placeholder.end()
            else:
                controls.append((size, size + len(piece)))
            out.append(piece)
            size += len(piece)
            last = end
        out.append(rendered[last:])
        if not self.required <= seen:
            raise self._changed()
        return Prompt("".join(out), controls)

    def _changed(self) -> ValueError:
        return ValueError(
            "the nudging model's chat template lost or changed a special-token string of the "
            "messages (it was held by a placeholder while the template rendered); the prompt "
            "cannot tell the template's own control markers from message text"
        )


def _plain_turns(turns: Sequence[ChatMessage], native: bool) -> list[ChatMessage]:
    """For a template that knows no tools: a tool's result becomes a user turn."""
    if native:
        return list(turns)
    out: list[ChatMessage] = []
    last_user = max((i for i, t in enumerate(turns) if t.role == "user"), default=-1)
    for index, turn in enumerate(turns):
        if turn.role == "tool":
            label = f"Result of {turn.name}" if turn.name else "Result"
            text = f"{label}: {turn.content}"
            if index > last_user and index == len(turns) - 1:
                text += "\n\n" + ANSWER_FROM_RESULT  # the answer the models write next
            turn = ChatMessage("user", text)
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


def render_prompts(
    messages: Sequence[ChatMessage],
    chat_template: ChatTemplate | None,
    fmt: BasePromptFormat | None = None,
    output: OutputSpec | None = None,
) -> Prompts:
    """Both prompts for one conversation (and what its answer must be).

    ``chat_template`` is the nudging model's; without one (``None``), the nudging model reads
    the base transcript too. A conversation
    without a system message gets ``fmt.system`` in both prompts; an empty system message is an
    empty system in both.
    """
    fmt = fmt or BasePromptFormat()
    system, turns, prefix = normalize(messages)
    output = output or OutputSpec()
    instructions = output.instructions()
    given = system if system is not None else fmt.system
    base_system = _join(given, instructions)
    base = Prompt(base_prompt(base_system, turns, prefix, fmt))
    stop = fmt.stop
    if output.callable_tools or any(t.role == "tool" or t.tool_calls for t in turns):
        stop = (*stop, fmt.tool_stop)
    if chat_template is None:
        return Prompts(base=base, nudging=base, stop=stop)
    tools = None
    if output.callable_tools and chat_template.reads_tools:
        # The template lists the tools itself; the system keeps the format rules.
        tools = [tool.openai() for tool in output.callable_tools]
        instructions = output.instructions(list_tools=False)
    chat_system = _join(given, instructions)
    nudging = chat_prompt(chat_template, chat_system, turns, prefix, tools)
    return Prompts(base=base, nudging=nudging, stop=stop)


def _join(system: str, instructions: str) -> str:
    return "\n\n".join(p for p in (system, instructions) if p)


def after_tool_result(messages: Sequence[ChatMessage]) -> bool:
    """Whether a tool's result came in after the conversation's last user message: the answer
    is then expected to use it (``Generation._decide_call``)."""
    for message in reversed(messages):
        if message.role == "tool":
            return True
        if message.role == "user":
            return False
    return False
