"""The LangChain side of tools and structured output (docs/tools.md).

``bind_tools`` arguments and ``response_format`` -> an :class:`~.structured.OutputSpec`; a
streamed answer -> content or ``tool_call_chunks``; ``with_structured_output``'s parsers.
The grammar, the prompts' instructions and the answer format live in :mod:`.structured`.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Sequence
from operator import itemgetter
from typing import Any, Literal, cast

from langchain_core.exceptions import OutputParserException
from langchain_core.messages import AIMessage, ToolCallChunk
from langchain_core.messages.tool import tool_call_chunk
from langchain_core.runnables import Runnable, RunnableLambda, RunnableMap, RunnablePassthrough
from langchain_core.utils.function_calling import convert_to_json_schema, convert_to_openai_tool
from langchain_core.utils.pydantic import is_basemodel_subclass

from ..structured import (
    IncompleteAnswerError,
    OutputSpec,
    ToolSpec,
    arguments_offset,
    tool_call_prefix,
)

StructuredMethod = Literal["json_schema", "function_calling", "json_mode"]
METHODS: tuple[str, ...] = ("json_schema", "function_calling", "json_mode")


def format_tools(tools: Sequence[Any], strict: bool | None = None) -> list[dict[str, Any]]:
    """Tools (``BaseTool``, functions, pydantic classes, JSON schemas, OpenAI dicts) as OpenAI
    function definitions, or a ``ValueError`` naming the tool that cannot be converted."""
    formatted = []
    for index, tool in enumerate(tools):
        try:
            formatted.append(convert_to_openai_tool(tool, strict=strict))
        except Exception as error:
            raise ValueError(
                f"tools[{index}]: {tool!r} cannot be used as a tool: {error}"
            ) from None
    return formatted


def tool_choice_name(tool_choice: Any) -> str:
    """LangChain/OpenAI/Anthropic spellings of ``tool_choice`` -> auto/required/none/<name>."""
    if tool_choice is None or tool_choice == "auto":
        return "auto"
    if tool_choice is True or tool_choice in ("any", "required"):
        return "required"
    if tool_choice is False or tool_choice == "none":
        return "none"
    if isinstance(tool_choice, str):
        return tool_choice
    if isinstance(tool_choice, dict):
        function = tool_choice.get("function")
        if isinstance(function, dict) and isinstance(function.get("name"), str):
            return function["name"]  # OpenAI: {"type": "function", "function": {"name": ...}}
        if isinstance(tool_choice.get("name"), str):
            return tool_choice["name"]  # Anthropic: {"type": "tool", "name": ...}
        if tool_choice.get("type") in ("auto", "any", "none", "required"):
            return tool_choice_name(tool_choice["type"])
    raise ValueError(
        f"tool_choice={tool_choice!r}: expected 'auto', 'any', 'required', 'none', a bound "
        "tool's name or {'type': 'function', 'function': {'name': ...}}"
    )


def response_schema(response_format: Any) -> tuple[dict[str, Any] | None, bool]:
    """``response_format`` -> (JSON schema or None, JSON mode?)."""
    if response_format is None:
        return None, False
    if isinstance(response_format, dict) and response_format.get("type") == "json_object":
        # {"type": "json_object", "schema": {...}}: JSON mode whose answer also matches a
        # schema (what with_structured_output(method="json_mode") binds).
        schema = response_format.get("schema")
        if schema is not None and not isinstance(schema, dict):
            raise ValueError("response_format: a json_object format's 'schema' must be a dict")
        return schema, True
    if isinstance(response_format, dict) and response_format.get("type") == "json_schema":
        inner = response_format.get("json_schema")
        if not isinstance(inner, dict) or not isinstance(inner.get("schema"), dict):
            raise ValueError(
                "response_format: {'type': 'json_schema'} needs "
                "'json_schema': {'name': ..., 'schema': {...}}"
            )
        return inner["schema"], False
    try:
        return convert_to_json_schema(response_format), False
    except Exception as error:
        raise ValueError(
            f"response_format={response_format!r}: expected {{'type': 'json_object'}}, "
            "{'type': 'json_schema', 'json_schema': {...}}, a pydantic model, a TypedDict or a "
            f"JSON schema ({error})"
        ) from None


def output_spec(
    tools: Sequence[dict[str, Any]] | None,
    tool_choice: Any,
    response_format: Any,
    max_string_length: int | None = None,
    call_threshold: float | str | None = None,
    parallel_calls: bool = False,
) -> OutputSpec:
    """Everything a call says about its output, validated; the grammar is compiled here."""
    specs = tuple(
        ToolSpec(
            t["function"]["name"],
            t["function"].get("description", ""),
            t["function"].get("parameters") or {},
        )
        for t in tools or ()
    )
    if tool_choice is not None and not specs and tool_choice_name(tool_choice) != "none":
        raise ValueError(
            f"tool_choice={tool_choice!r} but no tools are bound; pass tools to bind_tools"
        )
    schema, json_mode = response_schema(response_format)
    return OutputSpec(
        tools=specs,
        tool_choice=tool_choice_name(tool_choice),
        schema=schema,
        json_object=json_mode,
        max_string_length=max_string_length,
        call_threshold=call_threshold,
        parallel_calls=parallel_calls,
    )


class ToolCallStream:
    """Turns one answer's text, as it streams, into content or tool calls' chunks.

    A call is recognised by its first character (``{``; ``[`` starts an array of calls when
    the spec allows several) when the answer may also be text. Each call's name and a fresh
    id go out as soon as the name is complete (chunk ``index`` 0, 1, ... in the answer's
    order), then its arguments as they arrive; a call's closing brace is held back until the
    call is complete. When the answer may be a call or a JSON response, nothing goes out until
    the end.
    """

    def __init__(self, spec: OutputSpec) -> None:
        self.spec = spec
        self.text = ""
        self.call_ids: list[str] = []
        self._kind: Literal["text", "call", "undecided"] = "text"
        if spec.callable_tools:
            self._kind = "call" if spec.must_call else "undecided"
        self._args_sent: list[int] = []  # per call whose name went out

    @property
    def call_id(self) -> str:
        """The first call's id (one is made up front)."""
        if not self.call_ids:
            self.call_ids.append(_new_id())
        return self.call_ids[0]

    @property
    def is_call(self) -> bool:
        return self._kind == "call"

    def add(self, text: str) -> tuple[str, list[ToolCallChunk]]:
        """What a new piece of the answer releases: (content, tool call chunks)."""
        self.text += text
        if self._kind == "undecided":
            head = self.text.lstrip()
            if not head or self.spec.json_answer:
                return "", []  # a call and a JSON answer look alike until the end
            starts = ("{", "[") if self.spec.several_calls else ("{",)
            self._kind = "call" if head.startswith(starts) else "text"
            if self._kind == "text":
                return self.text, []
        if self._kind == "text":
            return text, []
        return "", self._call_chunks(final=False)

    def finish(self) -> tuple[str, list[ToolCallChunk]]:
        """The rest, once the answer ended; raises when a call or JSON answer is incomplete."""
        calls = self.spec.parse_calls(self.text)
        if self._kind == "undecided":
            if not calls:
                return self.text, []
            self._kind = "call"
        if self._kind == "text":
            return "", []
        if not calls:
            raise IncompleteAnswerError(f"the answer is not a call of a bound tool: {self.text!r}")
        return "", self._call_chunks(final=True)

    def _pieces(self, final: bool) -> list[tuple[str, bool]]:
        """Each call's text so far, and whether it is complete."""
        body = self.text.strip() if final else self.text.lstrip()
        if not body.startswith("["):
            return [(body, final)]
        pieces: list[tuple[str, bool]] = []
        decoder, position = json.JSONDecoder(), 1
        while position < len(body):
            while body[position : position + 1] in (",", " "):
                position += 1
            if body[position : position + 1] != "{":
                break
            try:
                _, end = decoder.raw_decode(body, position)
            except json.JSONDecodeError:
                pieces.append((body[position:], False))
                break
            pieces.append((body[position:end], True))
            position = end
        return pieces

    def _call_chunks(self, final: bool) -> list[ToolCallChunk]:
        chunks: list[ToolCallChunk] = []
        for index, (piece, complete) in enumerate(self._pieces(final)):
            if index == len(self._args_sent):
                name = tool_call_prefix(piece)
                if name is None:
                    break
                while len(self.call_ids) <= index:
                    self.call_ids.append(_new_id())
                chunks.append(
                    tool_call_chunk(name=name, args="", id=self.call_ids[index], index=index)
                )
                self._args_sent.append(0)
            args = piece[arguments_offset(piece) :]
            args = args[:-1]  # the call's closing brace (held back while streaming)
            if len(args) > self._args_sent[index]:
                chunks.append(tool_call_chunk(args=args[self._args_sent[index] :], index=index))
                self._args_sent[index] = len(args)
            if not complete:
                break
        return chunks


def _new_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


# -- with_structured_output ------------------------------------------------------------------
def structured_output(
    bound: Runnable,
    schema: Any,
    method: str,
    include_raw: bool,
) -> Runnable:
    """``bound`` (the model with tools or a response format bound) followed by the parser."""
    parse = RunnableLambda(_parser(schema, method), name="parse_structured_output")
    if not include_raw:
        return bound | parse
    with_parsed = RunnablePassthrough.assign(
        parsed=itemgetter("raw") | parse, parsing_error=lambda _: None
    )
    without = RunnablePassthrough.assign(parsed=lambda _: None)
    return RunnableMap(raw=bound) | with_parsed.with_fallbacks(
        [without], exception_key="parsing_error"
    )


def schema_name(schema: Any) -> str:
    if isinstance(schema, dict):
        if "function" in schema and isinstance(schema["function"], dict):
            return schema["function"]["name"]
        return str(schema.get("title") or schema.get("name") or "response")
    return convert_to_openai_tool(schema)["function"]["name"]


def _parser(schema: Any, method: str) -> Callable[[AIMessage], Any]:
    """The whole answer -> the schema's type (a pydantic object, or a dict)."""

    def parse(message: AIMessage) -> Any:
        if method == "function_calling":
            if not message.tool_calls:
                raise OutputParserException(
                    "the answer has no tool call", llm_output=str(message.content)
                )
            value = message.tool_calls[0]["args"]
        else:
            text = message.text if isinstance(message.content, list) else message.content
            try:
                value = json.loads(text)
            except json.JSONDecodeError as error:
                raise OutputParserException(
                    f"the answer is not JSON: {error}", llm_output=text
                ) from None
        if isinstance(schema, type) and is_basemodel_subclass(schema):
            try:
                if hasattr(schema, "model_validate"):
                    return schema.model_validate(value)
                return cast(Any, schema).parse_obj(value)  # pydantic.v1
            except Exception as error:
                raise OutputParserException(
                    f"the answer does not validate as {schema.__name__}: {error}",
                    llm_output=json.dumps(value),
                ) from None
        return value

    return parse
