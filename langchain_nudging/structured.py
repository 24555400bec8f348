"""What an answer must be: free text, a tool call, or JSON matching a schema (docs/tools.md).

An :class:`OutputSpec` describes one request's output: the tools it may call and how
(``tool_choice``), and a JSON schema (or any JSON object) the answer must match. It gives the
grammar that constrains both models' token choices (an llguidance Lark grammar, the same text
for both tokenizers), the instructions both prompts carry, and the parser of the finished
answer. Nothing here knows of LangChain, models or threads.

A tool call is written as one compact JSON object, the format both models see in their
prompts::

    {"name": "get_weather", "arguments": {"city": "Paris"}}
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any

import llguidance

#: JSON as ``json.dumps`` writes it: no pretty-printing (a model that starts indenting can
#: spend its whole budget on whitespace), and ", " / ": " so that there are word boundaries
#: where the base model can take a turn.
JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
#: A text answer when tools are bound: anything that does not start with "{" (which starts a
#: tool call) or with whitespace.
FREE_TEXT = r"/[^{\s][\s\S]*/"
#: ``call_threshold``: the threshold measured for the pair (serving/generation.py).
CALIBRATED = "calibrated"
#: Most calls in one answer (``parallel_calls``): a small model left free may list calls
#: until the budget ends.
MAX_PARALLEL_CALLS = 4


class GrammarError(ValueError):
    """A schema or tool definition the grammar library cannot compile."""


class IncompleteAnswerError(ValueError):
    """A constrained answer that ended (budget, stop rule) before its JSON was complete."""


@dataclass(frozen=True, slots=True)
class ToolSpec:
    """A tool the models may call: its name, description and the JSON schema of its arguments."""

    name: str
    description: str = ""
    parameters: dict[str, Any] = field(default_factory=dict)

    def definition(self) -> str:
        """The line that introduces this tool in the prompts."""
        return _dumps(
            {"name": self.name, "description": self.description, "parameters": self.parameters}
        )

    def openai(self) -> dict[str, Any]:
        """The tool as an OpenAI-style function definition (what chat templates read)."""
        parameters = self.parameters or {"type": "object", "properties": {}}
        function = {"name": self.name, "description": self.description, "parameters": parameters}
        return {"type": "function", "function": function}

    def call_schema(self) -> dict[str, Any]:
        """JSON schema of a call to this tool, in the answer format."""
        arguments = dict(self.parameters) or {"type": "object", "properties": {}}
        arguments.setdefault("type", "object")
        # A model left free to add keys may add them forever; extra keys also fail most tools.
        arguments.setdefault("additionalProperties", False)
        return {
            "type": "object",
            "properties": {"name": {"const": self.name}, "arguments": arguments},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }


@dataclass(frozen=True, slots=True)
class ToolCall:
    """A call of a tool, as written in an answer or in the conversation's history."""

    name: str
    arguments: dict[str, Any]
    id: str | None = None

    def text(self) -> str:
        """The call in the answer format."""
        return _dumps({"name": self.name, "arguments": self.arguments})


@dataclass(frozen=True)
class OutputSpec:
    """What one answer must be.

    ``tool_choice``: ``"auto"`` (text or a call), ``"required"`` (a call to any tool),
    ``"none"`` (text; tools are not shown) or a tool's name (a call to that tool).
    ``schema``: a JSON schema the answer must match when it is not a tool call;
    ``json_object``: JSON mode, a JSON object (matching ``schema`` when one is given, but the
    prompts only ask for JSON: describe the fields in the prompt). ``max_string_length`` caps
    every JSON string whose schema sets no length, enum, const or pattern: small models can
    loop inside a string until the budget ends, and the cap closes the string instead.
    ``call_threshold`` (``"auto"`` only): the call/no-call choice is made before the answer
    starts, from the deciding model's probability of starting a tool call (serving/generation.py
    ``Generation._decide_call``). A number: a call at or above that probability.
    ``"calibrated"``: a call when the call score (that probability, weighted by how much
    showing the tools raised it) reaches the threshold measured for the pair. ``None`` leaves
    the choice to the models' first tokens. ``parallel_calls``: a call answer may hold several
    calls, one JSON object a line (``parallel_tool_calls`` not ``False``).
    """

    tools: tuple[ToolSpec, ...] = ()
    tool_choice: str = "auto"
    schema: dict[str, Any] | None = None
    json_object: bool = False
    max_string_length: int | None = None
    call_threshold: float | str | None = None
    parallel_calls: bool = False

    def __post_init__(self) -> None:
        # One tool per name: the same tool given twice counts once; of two different tools
        # with one name, the later wins (as a later definition replaces an earlier one).
        by_name: dict[str, ToolSpec] = {}
        for tool in self.tools:
            if tool.name in by_name and by_name[tool.name] != tool:
                warnings.warn(
                    f"tools: two different tools are named {tool.name!r}; the later one is used",
                    stacklevel=4,
                )
            by_name[tool.name] = tool
        object.__setattr__(self, "tools", tuple(by_name.values()))
        names = list(by_name)
        if self.tool_choice not in ("auto", "required", "none"):
            if not self.tools:
                raise ValueError(
                    f"tool_choice={self.tool_choice!r} but no tools are bound; "
                    "pass tools to bind_tools"
                )
            if self.tool_choice not in names:
                raise ValueError(
                    f"tool_choice={self.tool_choice!r} is not a bound tool; bound tools: {names}"
                )
        elif self.tool_choice == "required" and not self.tools:
            raise ValueError("tool_choice='required' but no tools are bound")
        threshold = self.call_threshold
        if isinstance(threshold, str):
            if threshold != CALIBRATED:
                raise ValueError(f"call_threshold: {threshold!r} is not {CALIBRATED!r}")
        elif threshold is not None and not 0.0 <= threshold <= 1.0:
            raise ValueError(f"call_threshold must be in [0, 1], got {threshold}")
        if self.max_string_length is not None and self.max_string_length < 1:
            raise ValueError(f"max_string_length must be >= 1, got {self.max_string_length}")
        _ = self.grammar  # compiled here: a schema the library cannot take fails at once

    @property
    def callable_tools(self) -> tuple[ToolSpec, ...]:
        """The tools the answer may call."""
        if self.tool_choice == "none":
            return ()
        if self.tool_choice in ("auto", "required"):
            return self.tools
        return tuple(t for t in self.tools if t.name == self.tool_choice)

    @property
    def constrained(self) -> bool:
        """Whether a grammar applies: tools are bound, or the answer is JSON. With tools
        bound and ``tool_choice="none"``, a text answer may not start with ``{`` (a small
        model would otherwise write a call as text)."""
        return bool(self.tools) or self.json_answer

    @property
    def several_calls(self) -> bool:
        """Whether an answer may hold several calls (a named tool's call is one)."""
        return self.parallel_calls and self.tool_choice in ("auto", "required") and bool(self.tools)

    @property
    def json_answer(self) -> bool:
        """Whether an answer that is not a call must be JSON (a schema, or JSON mode)."""
        return self.schema is not None or self.json_object

    @property
    def must_call(self) -> bool:
        return bool(self.callable_tools) and self.tool_choice != "auto"

    @property
    def decides_call(self) -> bool:
        """Whether the call/no-call choice is made by :attr:`call_threshold` up front."""
        return self.call_threshold is not None and self.tool_choice == "auto" and bool(self.tools)

    def decided(self, call: bool) -> OutputSpec:
        """This spec once the choice is made: a call of any tool, or no call."""
        return replace(self, tool_choice="required" if call else "none", call_threshold=None)

    @property
    def call_grammar(self) -> str:
        """The grammar of one call alone (what :attr:`call_threshold` measures: the mass of
        the tokens that start a call, ``{``; an array of calls starts with ``[``)."""
        single = replace(self, tool_choice="required", call_threshold=None, parallel_calls=False)
        return single.grammar or ""

    @property
    def json_only(self) -> bool:
        """The answer can only be JSON (a forced call, a schema or JSON mode without tools)."""
        return self.must_call or self.json_answer

    @cached_property
    def grammar(self) -> str | None:
        """The llguidance grammar of the answer, or ``None`` for unconstrained text."""
        if not self.constrained:
            return None
        alternatives: list[str] = []
        rules: list[str] = []
        if tools := self.callable_tools:
            calls = [tool.call_schema() for tool in tools]
            schema = calls[0] if len(calls) == 1 else {"anyOf": calls}
            rules.append("call: %json " + self._json(schema))
            alternatives.append("call")
            if self.several_calls:
                several = {"type": "array", "items": schema, "minItems": 2}
                several["maxItems"] = MAX_PARALLEL_CALLS
                rules.append("calls: %json " + self._json(several))
                alternatives.append("calls")
        if not self.must_call:
            if self.json_answer:
                answer = self.schema or any_json_object(self.max_string_length)
                rules.append("answer: %json " + self._json(answer))
            else:
                rules.append(f"answer: {FREE_TEXT}")
            alternatives.append("answer")
        lark = "start: " + " | ".join(alternatives) + "\n" + "\n".join(rules) + "\n"
        grammar = llguidance.LLMatcher.grammar_from_lark(lark)
        if error := llguidance.LLMatcher.validate_grammar(grammar):
            what = "the tools' argument schemas" if tools else "the JSON schema"
            raise GrammarError(f"{what} cannot be compiled into a grammar: {error.strip()}")
        return grammar

    def _json(self, schema: dict[str, Any]) -> str:
        schema = tighten(schema, self.max_string_length)
        return _dumps({**schema, "x-guidance": JSON_STYLE})

    def instructions(self, list_tools: bool = True) -> str:
        """What both prompts say about tools and the answer's format (appended to the system).

        ``list_tools=False`` leaves out the tool list, for a chat template that lists them.
        """
        parts: list[str] = []
        if (tools := self.callable_tools) and list_tools:
            parts.append(
                "You can call these tools. Each line gives a tool's name, what it does and "
                "the JSON schema of its arguments:\n" + "\n".join(t.definition() for t in tools)
            )
        if tools:
            form = '{"name": "<tool name>", "arguments": {<arguments>}}'
            if self.tool_choice not in ("auto", "required"):
                parts.append(
                    f"Answer by calling {self.tool_choice}, with nothing but one JSON object: "
                    + form.replace("<tool name>", self.tool_choice)
                    + "."
                )
            elif self.tool_choice == "auto":
                otherwise = (
                    "Otherwise answer with a JSON object that matches the response schema."
                    if self.json_answer
                    else "Otherwise answer in words."
                )
                parts.append(
                    f"To call a tool, answer with nothing but one JSON object: {form}. " + otherwise
                )
            else:
                parts.append(f"Answer with nothing but one tool call, a JSON object: {form}.")
            if self.parallel_calls and self.tool_choice == "required":
                parts.append(
                    "To make several calls at once, answer with a JSON array of such objects."
                )
        if self.schema is not None and not self.json_object and not self.must_call:
            parts.append(
                "Answer with a JSON object that matches this JSON schema:\n" + _dumps(self.schema)
            )
        elif self.json_only and not self.must_call:
            parts.append("Answer with a JSON object.")
        return "\n\n".join(parts)

    def parse(self, text: str) -> ToolCall | None:
        """The (first) tool call an answer makes, or ``None`` for a text or JSON answer.

        Raises :class:`IncompleteAnswerError` when a constrained answer is incomplete (the
        budget or a stop rule ended it before its JSON closed).
        """
        calls = self.parse_calls(text)
        return calls[0] if calls else None

    def parse_calls(self, text: str) -> list[ToolCall]:
        """The tool calls an answer makes: one, several (a JSON array of calls, with
        :attr:`parallel_calls`) or none (a text or JSON answer); raises like :meth:`parse`."""
        if not self.constrained:
            return []
        stripped = text.strip()
        several = self.several_calls and stripped.startswith("[")
        text_answer = not self.must_call and not self.json_answer
        if not stripped.startswith("{") and not several and text_answer:
            return []  # a text answer in "auto" mode
        try:
            value = json.loads(stripped)
        except json.JSONDecodeError:
            what = "tool call" if self.callable_tools and not self.json_answer else "JSON answer"
            raise IncompleteAnswerError(
                f"the answer ended before its {what} was complete: {text!r}"
            ) from None
        items = value if several and isinstance(value, list) else [value]
        calls = [call for item in items if (call := self._call(item)) is not None]
        return calls if len(calls) == len(items) else []

    def _call(self, value: Any) -> ToolCall | None:
        names = {tool.name for tool in self.callable_tools}
        if (
            isinstance(value, dict)
            and set(value) == {"name", "arguments"}
            and value["name"] in names
            and isinstance(value["arguments"], dict)
        ):
            return ToolCall(value["name"], value["arguments"])
        return None


def tighten(schema: Any, max_string_length: int | None) -> Any:
    """A copy of ``schema`` that a model cannot fill forever; what validates under the copy
    validates under ``schema``.

    An object that lists its ``properties`` and says nothing of others gets
    ``additionalProperties: false`` (a model left free adds keys until the budget ends); a
    free string (no length, enum, const, pattern or format of its own) gets
    ``maxLength: max_string_length`` and ``minLength: 1``.
    """
    if isinstance(schema, list):
        return [tighten(item, max_string_length) for item in schema]
    if not isinstance(schema, dict):
        return schema
    literal = ("const", "enum", "default", "examples")  # values, not schemas
    out = {k: v if k in literal else tighten(v, max_string_length) for k, v in schema.items()}
    kinds = schema.get("type")
    kinds = kinds if isinstance(kinds, list) else [kinds]
    if "properties" in schema and "additionalProperties" not in schema:
        out["additionalProperties"] = False
    free = not {"maxLength", "enum", "const", "pattern", "format"} & schema.keys()
    if "string" in kinds and free and max_string_length is not None:
        out["maxLength"] = max_string_length
    if "string" in kinds and free and "minLength" not in schema:
        # A confident base model closes a string at once ({"expression": ""}): a free
        # string has at least one character.
        out["minLength"] = 1
    return out


def any_json_object(max_string_length: int | None) -> dict[str, Any]:
    """JSON mode: any JSON object, its strings capped like :func:`tighten` caps them."""
    string: dict[str, Any] = {"type": "string"}
    if max_string_length is not None:
        string["maxLength"] = max_string_length
    value = {
        "anyOf": [
            string,
            {"type": "number"},
            {"type": "boolean"},
            {"type": "null"},
            {"type": "array", "items": {"$ref": "#/$defs/value"}},
            {"type": "object", "additionalProperties": {"$ref": "#/$defs/value"}},
        ]
    }
    return {
        "$defs": {"value": value},
        "type": "object",
        "additionalProperties": {"$ref": "#/$defs/value"},
    }


def tool_call_prefix(text: str) -> str | None:
    """The tool's name once ``text`` (a call being written) has got past it, else ``None``."""
    head = '{"name": '
    if not text.startswith(head):
        return None
    try:
        name, end = json.JSONDecoder().raw_decode(text, len(head))
    except json.JSONDecodeError:
        return None
    return name if isinstance(name, str) and text[end:].startswith(', "arguments": ') else None


def arguments_offset(text: str) -> int:
    """Where a call's arguments start in its text (after ``tool_call_prefix`` succeeded)."""
    return text.index(', "arguments": ') + len(', "arguments": ')


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)
