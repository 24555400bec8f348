"""Grammar-constrained nudging: the output spec, both models' matchers, tools in the prompts and
the LangChain side (bind_tools, with_structured_output), on tiny random-weight models."""

from __future__ import annotations

import json
from typing import Any

import pytest
from langchain_core.exceptions import OutputParserException
from langchain_core.messages import AIMessage, AIMessageChunk, HumanMessage, ToolMessage
from langchain_core.tools import tool
from pydantic import BaseModel, Field
from pydantic.v1 import BaseModel as BaseModelV1
from typing_extensions import TypedDict

from langchain_nudging import NudgedChatModel, NudgingConfig, NudgingPair
from langchain_nudging.backends.chat_template import template_of
from langchain_nudging.backends.grammar import GrammarViolationError
from langchain_nudging.backends.registry import text_model
from langchain_nudging.chat.tools import ToolCallStream, output_spec, tool_choice_name
from langchain_nudging.config import SamplingConfig
from langchain_nudging.prompts import ANSWER_FROM_RESULT, ChatMessage, render_prompts
from langchain_nudging.request import Request
from langchain_nudging.structured import (
    GrammarError,
    IncompleteAnswerError,
    OutputSpec,
    ToolCall,
    ToolSpec,
    tighten,
)

# Bounded values only: random-weight models must finish the JSON within a small budget.
SETTINGS = {
    "type": "object",
    "properties": {
        "ok": {"type": "boolean"},
        "color": {"enum": ["red", "green", "blue"]},
        "n": {"type": "integer", "minimum": 0, "maximum": 99},
    },
    "required": ["ok", "color", "n"],
}
ADD = ToolSpec(
    "add",
    "Add two integers.",
    {
        "type": "object",
        "properties": {
            "a": {"type": "integer", "minimum": 0, "maximum": 9},
            "b": {"type": "integer", "minimum": 0, "maximum": 9},
        },
        "required": ["a", "b"],
    },
)
PING = ToolSpec("ping", "Check the service.", {})
ASK = [ChatMessage("user", "What is 2 + 3?")]


def check_settings(value: Any) -> None:
    assert set(value) == {"ok", "color", "n"}
    assert isinstance(value["ok"], bool)
    assert value["color"] in ("red", "green", "blue")
    assert isinstance(value["n"], int)
    assert 0 <= value["n"] <= 99


# -- the output spec ----------------------------------------------------------------------------
def test_unconstrained_spec_has_no_grammar_and_no_instructions() -> None:
    spec = OutputSpec()
    assert spec.grammar is None
    assert spec.instructions() == ""
    assert spec.parse("anything at all") is None
    none = OutputSpec((ADD,), "none")  # text that cannot pass for a call; tools not shown
    assert "{" not in none.instructions()
    assert none.grammar is not None
    assert none.parse('Five, {"name": "add"}') is None


def test_bad_specs_raise_clear_errors_at_once() -> None:
    with pytest.raises(GrammarError, match=r"cannot be compiled.*Invalid type: strin"):
        OutputSpec(schema={"type": "object", "properties": {"a": {"type": "strin"}}})
    with pytest.raises(GrammarError, match="tools' argument schemas"):
        OutputSpec((ToolSpec("t", "", {"type": "object", "if": {}}),), "required")
    with pytest.raises(ValueError, match=r"tool_choice='mul' is not a bound tool.*\['add'\]"):
        OutputSpec((ADD,), "mul")
    with pytest.raises(ValueError, match="tool_choice='add' but no tools are bound"):
        OutputSpec((), "add")
    with pytest.raises(ValueError, match="max_string_length must be >= 1"):
        OutputSpec(json_object=True, max_string_length=0)


def test_the_same_tool_twice_counts_once_and_a_name_clash_warns() -> None:
    assert OutputSpec((ADD, ADD), "required").tools == (ADD,)
    other = ToolSpec("add", "Something else.", {})
    with pytest.warns(UserWarning, match="two different tools are named 'add'"):
        spec = OutputSpec((ADD, other), "required")
    assert spec.tools == (other,)


def test_tighten_closes_listed_objects_and_caps_free_strings_only() -> None:
    schema = {
        "type": "object",
        "properties": {
            "free": {"type": "string"},
            "short": {"type": "string", "maxLength": 3},
            "choice": {"enum": ["a", "b"], "type": "string"},
            "dated": {"type": "string", "format": "date"},
            "maybe": {"type": ["string", "null"]},
            "const": {"const": {"type": "string"}},
            "any": {"type": "object"},
        },
    }
    out = tighten(schema, 10)
    props = out["properties"]
    assert out["additionalProperties"] is False
    assert props["free"]["maxLength"] == 10
    assert props["free"]["minLength"] == 1  # a confident model closes an empty string at once
    assert "minLength" not in props["choice"]
    assert props["short"]["maxLength"] == 3
    assert "maxLength" not in props["choice"]
    assert "maxLength" not in props["dated"]
    assert props["maybe"]["maxLength"] == 10
    assert props["const"] == {"const": {"type": "string"}}  # a value, not a schema
    assert "additionalProperties" not in props["any"]  # a free-form object stays free
    assert schema["properties"]["free"] == {"type": "string"}  # the caller's schema untouched


def test_parse_tells_calls_text_and_incomplete_answers_apart() -> None:
    auto = OutputSpec((ADD, PING), "auto")
    assert auto.parse('{"name": "add", "arguments": {"a": 1, "b": 2}}') == ToolCall(
        "add", {"a": 1, "b": 2}
    )
    assert auto.parse("Five.") is None
    with pytest.raises(IncompleteAnswerError, match="before its tool call was complete"):
        auto.parse('{"name": "add", "arguments": {"a": 1')
    schema = OutputSpec(schema=SETTINGS)
    assert schema.parse('{"ok": true, "color": "red", "n": 1}') is None  # an answer, not a call
    with pytest.raises(IncompleteAnswerError, match="JSON answer"):
        schema.parse('{"ok": tr')


def test_instructions_name_the_tools_and_the_format() -> None:
    text = OutputSpec((ADD, PING), "auto").instructions()
    assert ADD.definition() in text
    assert PING.definition() in text
    assert '{"name": "<tool name>", "arguments": {<arguments>}}' in text
    assert "Otherwise answer in words." in text
    forced = OutputSpec((ADD, PING), "add").instructions()
    assert PING.definition() not in forced  # only the callable tool is shown
    assert "Answer by calling add" in forced
    assert json.dumps(SETTINGS) in OutputSpec(schema=SETTINGS).instructions()
    # JSON mode asks for JSON without showing the schema (the user's prompt describes it).
    assert OutputSpec(schema=SETTINGS, json_object=True).instructions() == (
        "Answer with a JSON object."
    )


# -- constrained generation on both models -----------------------------------------------------
@pytest.fixture
def pair(llama_a: Any, gemma_b: Any) -> NudgingPair:
    return NudgingPair(text_model(llama_a), text_model(gemma_b))  # two different tokenizers


@pytest.mark.parametrize("mode", ["nudged", "base", "nudging"])
def test_a_schema_constrained_answer_parses_and_validates(pair: NudgingPair, mode: str) -> None:
    request = Request(ASK, NudgingConfig(max_tokens=200), mode, output=OutputSpec(schema=SETTINGS))
    generation = pair.generate(request)
    list(generation)
    assert generation.stats.finish_reason == "stop"
    check_settings(json.loads(generation.text))
    masks = generation.stats.grammar_masks
    assert all(count > 0 for count in masks.values())


def test_both_models_write_parts_of_one_constrained_answer(pair: NudgingPair) -> None:
    """Text one model writes advances the other model's matcher: every segment, by either
    model, continues valid JSON."""
    spec = OutputSpec(schema={"type": "array", "items": SETTINGS, "minItems": 2, "maxItems": 2})
    for gamma in (0.3, 0.5, 0.7):
        config = NudgingConfig(gamma=gamma, max_tokens=300)
        generation = pair.generate(Request(ASK, config, output=spec))
        segments = list(generation)
        assert generation.stats.finish_reason == "stop"
        for value in json.loads(generation.text):
            check_settings(value)
        if {s.source for s in segments} == {"base", "nudge"}:
            return
    pytest.fail("no gamma gave segments from both models")


def test_a_forced_tool_call_names_a_bound_tool_with_valid_arguments(pair: NudgingPair) -> None:
    for choice in ("required", "add", "ping"):
        spec = OutputSpec((ADD, PING), choice)
        generation = pair.generate(Request(ASK, NudgingConfig(max_tokens=200), output=spec))
        list(generation)
        call = spec.parse(generation.text)
        assert call is not None, generation.text
        assert call.name in (("add", "ping") if choice == "required" else (choice,))
        if call.name == "add":
            assert set(call.arguments) == {"a", "b"}
            assert all(0 <= v <= 9 for v in call.arguments.values())
        else:
            assert call.arguments == {}


def test_sampling_stays_inside_the_grammar(pair: NudgingPair) -> None:
    sampling = SamplingConfig(temperature=1.5, seed=7)
    config = NudgingConfig(max_tokens=200, base_sampling=sampling, nudging_sampling=sampling)
    for _ in range(3):
        generation = pair.generate(Request(ASK, config, output=OutputSpec(schema=SETTINGS)))
        list(generation)
        check_settings(json.loads(generation.text))


def test_unconstrained_requests_compute_no_mask(pair: NudgingPair) -> None:
    generation = pair.generate(Request(ASK, NudgingConfig(max_tokens=24)))
    list(generation)
    assert generation.stats.grammar_masks == {"base": 0, "nudging": 0}


def test_confidence_is_the_raw_softmax_under_a_grammar(llama_a: Any) -> None:
    model = text_model(llama_a)
    spec = OutputSpec(schema=SETTINGS)
    free = model.session("Question: hi\nAnswer: ", SamplingConfig())
    held = model.session("Question: hi\nAnswer: ", SamplingConfig(), grammar=spec.grammar)
    for answer in ("", '{"ok": ', '{"ok": true, "color": "'):
        a, b = free.peek(answer), held.peek(answer)
        assert (a.top1_prob, a.top2_prob) == (b.top1_prob, b.top2_prob)
    assert held.peek("").text == "{"  # the grammar's only opening
    free.close()
    held.close()


def test_an_answer_outside_the_grammar_is_a_clear_error(llama_a: Any) -> None:
    grammar = OutputSpec(schema=SETTINGS).grammar
    session = text_model(llama_a).session("Q\nA: ", SamplingConfig(), grammar=grammar)
    with pytest.raises(GrammarViolationError, match="does not fit the grammar"):
        session.peek("not json")
    assert session.peek('{"ok": ').text  # the session still serves valid answers
    session.close()


# -- tools in the prompts -----------------------------------------------------------------------
HISTORY = [
    ChatMessage("user", "What is 2 + 3?"),
    ChatMessage("assistant", "", (ToolCall("add", {"a": 2, "b": 3}, "c1"),)),
    ChatMessage("tool", "5", name="add", tool_call_id="c1"),
]

# A Qwen-like template that renders tools, tool calls and tool turns itself.
TOOLS_TEMPLATE = (
    "{% if tools %}<|im_start|>system\nTOOLS:{% for t in tools %} {{ t.function.name }}"
    "{% endfor %}<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
    "{% if m.tool_calls %}{% for c in m.tool_calls %}<call>{{ c.function.name }}"
    "{{ c.function.arguments | tojson }}</call>{% endfor %}{% endif %}"
    "{% if m.role != 'assistant' or not loop.last %}<|im_end|>\n{% endif %}{% endfor %}"
)


def test_base_transcript_shows_tools_calls_and_results(sp_tokenizer: Any) -> None:
    spec = OutputSpec((ADD,), "auto")
    prompts = render_prompts(HISTORY, template_of(sp_tokenizer), output=spec)
    assert prompts.base == (
        "You are a helpful assistant.\n\n"
        + spec.instructions()
        + "\nQuestion: What is 2 + 3?"
        + '\nAnswer: {"name": "add", "arguments": {"a": 2, "b": 3}}'
        + "\nResult: 5"
        + "\nAnswer: "
    )
    assert "\nResult:" in prompts.stop
    # Without tools, the tool marker is no stop string (answers may say "Result:").
    assert "\nResult:" not in render_prompts(ASK, template_of(sp_tokenizer)).stop


def test_a_template_without_tools_gets_them_as_text(sp_tokenizer: Any) -> None:
    prompts = render_prompts(HISTORY, template_of(sp_tokenizer), output=OutputSpec((ADD,), "auto"))
    assert ADD.definition() in prompts.nudging
    assert '<|im_start|>assistant\n{"name": "add", "arguments": {"a": 2, "b": 3}}' in (
        prompts.nudging
    )
    assert (
        "<|im_start|>user\nResult of add: 5\n\n" + ANSWER_FROM_RESULT + "<|im_end|>"
        in prompts.nudging
    )
    assert prompts.nudging.endswith("<|im_start|>assistant\n")


def test_a_template_that_reads_tools_renders_them_itself(make_tokenizer: Any) -> None:
    tokenizer = make_tokenizer("sp", chat_template=TOOLS_TEMPLATE)
    spec = OutputSpec((ADD,), "auto")
    prompts = render_prompts(HISTORY, template_of(tokenizer), output=spec)
    assert "TOOLS: add" in prompts.nudging
    assert ADD.definition() not in prompts.nudging  # listed by the template, not twice
    assert "Otherwise answer in words." in prompts.nudging  # the format rules stay
    assert '<call>add{"a": 2, "b": 3}</call>' in prompts.nudging
    assert "<|im_start|>tool\n5<|im_end|>" in prompts.nudging


# -- the LangChain side ---------------------------------------------------------------------------
class Settings(BaseModel):
    """Display settings."""

    ok: bool
    color: str = Field(json_schema_extra={"enum": ["red", "green", "blue"]})
    n: int = Field(ge=0, le=99)


class SettingsV1(BaseModelV1):
    ok: bool
    n: int


class SettingsDict(TypedDict):
    ok: bool
    n: int


@tool
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


@tool
def ping() -> str:
    """Check the service."""
    return "ok"


@pytest.fixture
def chat(llama_a: Any, gemma_b: Any) -> NudgedChatModel:
    return NudgedChatModel(model=llama_a, nudging_model=gemma_b, max_tokens=200)


def test_tool_choice_spellings() -> None:
    assert tool_choice_name(None) == "auto"
    assert tool_choice_name("any") == tool_choice_name(True) == "required"
    assert tool_choice_name({"type": "function", "function": {"name": "add"}}) == "add"
    assert tool_choice_name({"type": "tool", "name": "add"}) == "add"
    with pytest.raises(ValueError, match="tool_choice=3"):
        tool_choice_name(3)


def test_bind_tools_refuses_bad_input_before_anything_runs(chat: NudgedChatModel) -> None:
    with pytest.raises(ValueError, match=r"tool_choice='mul' is not a bound tool"):
        chat.bind_tools([add], tool_choice="mul")
    with pytest.raises(ValueError, match="no tools are bound"):
        chat.bind_tools([], tool_choice="any")
    with pytest.raises(GrammarError, match="Invalid type: strin"):
        chat.bind_tools([{"name": "t", "parameters": {"type": "strin"}}])
    with pytest.raises(ValueError, match=r"tools\[0\]: 42 cannot be used as a tool"):
        chat.bind_tools([42])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="tool_choice='any' but no tools are bound"):
        chat.invoke("hi", tool_choice="any")
    with pytest.raises(ValueError, match="method='xml'"):
        chat.with_structured_output(Settings, method="xml")  # type: ignore[arg-type]
    assert chat.invoke("hi", max_tokens=4).content  # still usable


def test_a_forced_call_comes_back_as_tool_calls_and_streams_as_chunks(
    chat: NudgedChatModel,
) -> None:
    bound = chat.bind_tools([add], tool_choice="any", parallel_tool_calls=False)
    message = bound.invoke("What is 2 + 3?")
    assert isinstance(message, AIMessage)
    assert message.content == ""
    assert message.response_metadata["finish_reason"] == "tool_calls"
    (call,) = message.tool_calls
    assert call["name"] == "add"
    assert set(call["args"]) == {"a", "b"}
    assert call["id"].startswith("call_")
    chunks = list(bound.stream("What is 2 + 3?"))
    assert sum(bool(c.tool_call_chunks) for c in chunks) >= 2  # name first, then arguments
    assert chunks[0].tool_call_chunks == [] or chunks[0].tool_call_chunks[0]["name"] == "add"
    full = chunks[0]
    for chunk in chunks[1:]:
        full += chunk
    assert isinstance(full, AIMessageChunk)
    assert [(c["name"], c["args"]) for c in full.tool_calls] == [(call["name"], call["args"])]


def test_tool_history_and_auto_choice_run(chat: NudgedChatModel) -> None:
    history = [
        HumanMessage("What is 2 + 3?"),
        AIMessage("", tool_calls=[{"name": "add", "args": {"a": 2, "b": 3}, "id": "c1"}]),
        ToolMessage("5", tool_call_id="c1"),
    ]
    message = chat.bind_tools([add]).invoke(history)
    assert isinstance(message, AIMessage)
    assert message.content or message.tool_calls
    if message.tool_calls:
        assert message.tool_calls[0]["name"] == "add"


@pytest.mark.parametrize("method", ["json_schema", "function_calling", "json_mode"])
@pytest.mark.parametrize(
    "schema", [Settings, SettingsV1, SettingsDict, Settings.model_json_schema()]
)
def test_structured_output_every_method_and_schema_kind(
    chat: NudgedChatModel, method: str, schema: Any
) -> None:
    result = chat.with_structured_output(schema, method=method).invoke("Settings?")
    if isinstance(schema, type) and schema is not SettingsDict:
        assert isinstance(result, schema)
        value = result.dict() if schema is SettingsV1 else result.model_dump()
    else:
        assert isinstance(result, dict)
        value = result
    assert isinstance(value["ok"], bool)
    assert isinstance(value["n"], int)


def test_include_raw_reports_a_parsing_error_instead_of_raising(llama_a: Any, gemma_b: Any) -> None:
    # A budget of 3 tokens cannot hold the JSON: the model raises a clear error, which
    # include_raw=True would capture; without it, the error reaches the caller.
    short = NudgedChatModel(model=llama_a, nudging_model=gemma_b, max_tokens=3)
    with pytest.raises(IncompleteAnswerError, match="raise max_tokens"):
        short.with_structured_output(Settings).invoke("Settings?")
    ok = NudgedChatModel(model=llama_a, nudging_model=gemma_b, max_tokens=200)
    out = ok.with_structured_output(Settings, include_raw=True).invoke("Settings?")
    assert set(out) == {"raw", "parsed", "parsing_error"}
    assert isinstance(out["raw"], AIMessage)
    assert isinstance(out["parsed"], Settings)
    assert out["parsing_error"] is None


def test_a_parsed_value_that_fails_validation_is_an_output_parser_error(
    chat: NudgedChatModel,
) -> None:
    class Strict(BaseModel):
        n: int

        def model_post_init(self, _: Any) -> None:
            raise ValueError("never valid")

    with pytest.raises(OutputParserException, match="does not validate as Strict"):
        chat.with_structured_output(Strict).invoke("n?")


def test_tool_call_stream_holds_the_closing_brace_until_the_end() -> None:
    stream = ToolCallStream(output_spec([add_tool()], "any", None, None))
    pieces = ['{"name": "ad', 'd", "arguments": {"a"', ": 1, ", '"b": 2}', "}"]
    out = [stream.add(p) for p in pieces]
    assert all(content == "" for content, _ in out)
    args = "".join(c["args"] or "" for _, chunks in out for c in chunks)
    rest = stream.finish()[1]
    args += "".join(c["args"] or "" for c in rest)
    assert args == '{"a": 1, "b": 2}'
    assert out[1][1][0]["name"] == "add"  # the name as soon as it is complete
    text = ToolCallStream(output_spec([add_tool()], "auto", None, None))
    assert text.add("Five") == ("Five", [])
    assert text.add(" it is.") == (" it is.", [])
    assert text.finish() == ("", [])
    cut = ToolCallStream(output_spec([add_tool()], "any", None, None))
    cut.add('{"name": "add", "arguments": {"a": 1')
    with pytest.raises(IncompleteAnswerError):
        cut.finish()


TWO_CALLS = '[{"name": "add", "arguments": {"a": 1, "b": 2}}, {"name": "ping", "arguments": {}}]'


def test_several_calls_are_a_json_array_that_the_grammar_allows_and_parse_reads(
    byte_tokenizer: Any,
) -> None:
    import llguidance.hf

    tokenizer = llguidance.hf.from_tokenizer(byte_tokenizer)

    spec = OutputSpec((ADD, PING), "required", parallel_calls=True)
    assert spec.parse_calls(TWO_CALLS) == [ToolCall("add", {"a": 1, "b": 2}), ToolCall("ping", {})]
    assert spec.parse(TWO_CALLS) == ToolCall("add", {"a": 1, "b": 2})
    assert "JSON array" in spec.instructions()
    assert spec.grammar is not None
    one = OutputSpec((ADD, PING), "required")  # parallel_tool_calls=False: one call at most
    assert one.grammar is not None
    assert "JSON array" not in one.instructions()
    assert one.parse_calls(TWO_CALLS) == []

    def allows(grammar: str, text: str) -> bool:
        matcher = llguidance.LLMatcher(tokenizer, grammar, log_level=0)
        ids = tokenizer.tokenize_str(text)
        return bool(matcher.consume_tokens(ids)) and matcher.is_accepting()

    assert allows(spec.grammar, TWO_CALLS)
    assert not allows(one.grammar, TWO_CALLS)
    assert allows(one.grammar, '{"name": "ping", "arguments": {}}')
    five = "[" + ", ".join(['{"name": "ping", "arguments": {}}'] * 5) + "]"
    assert not allows(spec.grammar, five)  # at most MAX_PARALLEL_CALLS calls
    # The call threshold measures the mass of one call's start, with or without arrays.
    assert spec.call_grammar == one.call_grammar


def test_several_calls_stream_as_chunks_with_indices() -> None:
    spec = output_spec([add_tool(), ping_tool()], "auto", None, None, parallel_calls=True)
    stream = ToolCallStream(spec)
    pieces = [TWO_CALLS[i : i + 7] for i in range(0, len(TWO_CALLS), 7)]
    chunks = [c for piece in pieces for c in stream.add(piece)[1]]
    content, rest = stream.finish()
    assert content == ""
    chunks += rest
    names = [(c["index"], c["name"]) for c in chunks if c["name"]]
    assert names == [(0, "add"), (1, "ping")]
    ids = [c["id"] for c in chunks if c["id"]]
    assert len(set(ids)) == 2
    args = {i: "".join(c["args"] or "" for c in chunks if c["index"] == i) for i in (0, 1)}
    assert args == {0: '{"a": 1, "b": 2}', 1: "{}"}
    merged = AIMessageChunk(content="")
    for chunk in chunks:
        merged += AIMessageChunk(content="", tool_call_chunks=[chunk])
    assert [(c["name"], c["args"]) for c in merged.tool_calls] == [
        ("add", {"a": 1, "b": 2}),
        ("ping", {}),
    ]
    assert stream.is_call


def test_an_answer_with_several_calls_renders_each_in_the_history(sp_tokenizer: Any) -> None:
    calls = (ToolCall("add", {"a": 1, "b": 2}, "c1"), ToolCall("ping", {}, "c2"))
    history = [
        *ASK,
        ChatMessage("assistant", "", calls),
        ChatMessage("tool", "3", name="add", tool_call_id="c1"),
        ChatMessage("tool", "ok", name="ping", tool_call_id="c2"),
    ]
    prompts = render_prompts(history, template_of(sp_tokenizer), None, OutputSpec((ADD, PING)))
    assert calls[0].text() + "\n" + calls[1].text() in prompts.base
    assert "Result: 3\nResult: ok\nAnswer: " in prompts.base
    assert "Result of add: 3" in prompts.nudging
    assert "Result of ping: ok" in prompts.nudging


def test_a_forced_parallel_answer_end_to_end(chat: NudgedChatModel) -> None:
    """Tiny models, tool_choice="any": the answer is one call or an array of calls, every one
    a bound tool's with valid arguments, their chunks indexed in order."""
    bound = chat.bind_tools([add, ping], tool_choice="any")
    message = bound.invoke("Add 1 and 2, and check the service.")
    assert isinstance(message, AIMessage)
    assert message.tool_calls
    for call in message.tool_calls:
        assert call["name"] in ("add", "ping")
    assert len({c["id"] for c in message.tool_calls}) == len(message.tool_calls)
    single = chat.bind_tools([add, ping], tool_choice="any", parallel_tool_calls=False)
    assert len(single.invoke("Add 1 and 2, and check the service.").tool_calls) == 1


def ping_tool() -> dict[str, Any]:
    return {"type": "function", "function": {"name": "ping", "description": "", "parameters": {}}}


def add_tool() -> dict[str, Any]:
    return {
        "type": "function",
        "function": {"name": "add", "description": "", "parameters": ADD.parameters},
    }


@pytest.mark.parametrize(("threshold", "calls"), [(0.0, True), (1.0, False)])
def test_call_threshold_decides_between_a_call_and_text_up_front(
    pair: NudgingPair, threshold: float, calls: bool
) -> None:
    spec = OutputSpec((ADD, PING), "auto", call_threshold=threshold)
    generation = pair.generate(Request(ASK, NudgingConfig(max_tokens=200), output=spec))
    list(generation)
    probability = generation.stats.call_probability
    assert probability is not None
    assert 0.0 < probability < 1.0
    call = spec.parse(generation.text)
    assert (call is not None) is calls, generation.text
    if not calls:
        assert not generation.text.lstrip().startswith("{")


def test_a_no_call_decision_answers_as_if_no_tools_were_bound(pair: NudgingPair) -> None:
    """Decided "no call": both prompts are those of the same request with no tools bound (no
    tool list, no call format), and the answer is the ``tool_choice="none"`` one: the same
    text with only the grammar's first-character rule (no ``{``) kept. On real models that
    rule changes nothing (integration_tests/test_agents.py compares with no tools bound)."""
    config = NudgingConfig(max_tokens=40)
    plain = pair.generate(Request(ASK, config))
    none = pair.generate(Request(ASK, config, output=OutputSpec((ADD, PING), "none")))
    list(none)
    for threshold in (1.0, "calibrated"):
        spec = OutputSpec((ADD, PING), "auto", call_threshold=threshold)
        decided = pair.generate(Request(ASK, config, output=spec))
        assert "add" in decided.prompts.base  # rendered for the decision: tools shown
        list(decided)
        if threshold == "calibrated" and spec.parse(decided.text) is not None:
            continue  # the tiny models' score chose a call: nothing to compare
        assert decided.prompts.base == plain.prompts.base
        assert decided.prompts.nudging == plain.prompts.nudging
        assert decided.prompts.stop == plain.prompts.stop
        assert decided.text == none.text
        assert decided.stats.call_probability is not None


def test_the_calibrated_decision_compares_the_call_score(pair: NudgingPair) -> None:
    from langchain_nudging.serving.generation import call_score_threshold

    spec = OutputSpec((ADD, PING), "auto", call_threshold="calibrated")
    generation = pair.generate(Request(ASK, NudgingConfig(max_tokens=200), output=spec))
    list(generation)
    stats = generation.stats
    assert stats.call_probability is not None
    assert stats.call_score is not None
    assert stats.call_score > 0
    called = spec.parse(generation.text) is not None
    assert called is (stats.call_score >= call_score_threshold(pair.nudging.name))
    with pytest.raises(ValueError, match="call_threshold: 'sometimes'"):
        OutputSpec((ADD,), "auto", call_threshold="sometimes")


def test_right_after_a_tool_result_the_answer_uses_it_instead_of_calling_again(
    pair: NudgingPair,
) -> None:
    """Even a threshold of 0 (always call) does not call again right after a result, unless
    the call probability reaches AFTER_RESULT_CALL_PROBABILITY; a new user turn resets it."""
    history = [
        *ASK,
        ChatMessage("assistant", "", (ToolCall("add", {"a": 2, "b": 3}, "c1"),)),
        ChatMessage("tool", "5", name="add", tool_call_id="c1"),
    ]
    spec = OutputSpec((ADD, PING), "auto", call_threshold=0.0)
    generation = pair.generate(Request(history, NudgingConfig(max_tokens=40), output=spec))
    list(generation)
    probability = generation.stats.call_probability
    assert probability is not None
    assert probability < 0.99
    assert spec.parse(generation.text) is None, generation.text
    again = [*history, ChatMessage("user", "And 4 + 4?")]
    generation = pair.generate(Request(again, NudgingConfig(max_tokens=200), output=spec))
    list(generation)
    assert spec.parse(generation.text) is not None


def test_call_threshold_in_the_chat_model(llama_a: Any, gemma_b: Any) -> None:
    eager = NudgedChatModel(
        model=llama_a, nudging_model=gemma_b, max_tokens=200, tool_call_threshold=0.0
    )
    message = eager.bind_tools([add], parallel_tool_calls=False).invoke("What is 2 + 3?")
    assert isinstance(message, AIMessage)
    assert [c["name"] for c in message.tool_calls] == ["add"]
    stats = message.response_metadata["nudging_stats"]
    assert 0.0 < stats["call_probability"] < 1.0
    with pytest.raises(ValueError, match="tool_call_threshold"):
        NudgedChatModel(tool_call_threshold=1.5)


def multiply(a: int, b: int) -> int:
    """Multiply two integers."""
    return a * b


class Lookup(BaseModel):
    """Look a word up."""

    word: str = Field(max_length=12)


def test_functions_pydantic_classes_and_schemas_bind_as_tools(chat: NudgedChatModel) -> None:
    schema = {
        "name": "ping",
        "description": "Check the service.",
        "parameters": {"type": "object", "properties": {}},
    }
    bound = chat.bind_tools(
        [multiply, Lookup, schema, add], tool_choice="any", strict=True, parallel_tool_calls=False
    )
    names = [t["function"]["name"] for t in bound.kwargs["tools"]]  # type: ignore[attr-defined]
    assert names == ["multiply", "Lookup", "ping", "add"]
    message = bound.invoke("Multiply 2 by 3.")
    (call,) = message.tool_calls
    assert call["name"] in names
    for forced, keys in (("multiply", {"a", "b"}), ("Lookup", {"word"}), ("ping", set())):
        forced_call = chat.bind_tools([multiply, Lookup, schema], tool_choice=forced).invoke("Go.")
        assert forced_call.tool_calls[0]["name"] == forced
        assert set(forced_call.tool_calls[0]["args"]) == keys


def test_prepare_builds_the_grammar_tokenizers_off_the_worker(
    make_tokenizer: Any, llama_a: Any, build_model: Any
) -> None:
    fresh = text_model(build_model("gemma", make_tokenizer("sp")))  # a fresh nudging model
    pair = NudgingPair(text_model(llama_a), fresh)
    spec = OutputSpec(schema=SETTINGS)
    assert pair.prepared(None)
    assert pair.prepared(OutputSpec())
    assert not fresh.prepared(grammars=True)
    assert not pair.prepared(spec)
    pair.prepare(spec)
    assert pair.prepared(spec)
    assert fresh.prepared(grammars=True)


# -- what a backend cannot do is refused up front -----------------------------------------------
def test_a_backend_without_grammars_refuses_constrained_answers(pair: NudgingPair) -> None:
    from scripted_backend import ScriptedModel  # Capabilities(): no grammars, no grammar mass

    scripted = ScriptedModel("scripted:plain", unsure=0.9)
    with pytest.raises(ValueError, match="scripted:plain cannot constrain its answer"):
        NudgingPair(scripted, pair.nudging).generate(
            Request(ASK, output=OutputSpec(schema=SETTINGS))
        )
    # The base model alone needs no nudging model's grammar.
    solo = NudgingPair(pair.base, scripted).generate(
        Request(ASK, NudgingConfig(max_tokens=8), "base", output=OutputSpec(schema=SETTINGS))
    )
    list(solo)


def test_a_backend_without_grammar_mass_refuses_the_call_threshold(pair: NudgingPair) -> None:
    from scripted_backend import ScriptedModel

    scripted = ScriptedModel("scripted:plain", unsure=0.9)
    spec = OutputSpec((ADD, PING), "auto", call_threshold=0.5)
    with pytest.raises(ValueError, match=r"^tool_call_threshold: scripted:plain cannot measure"):
        NudgingPair(pair.base, scripted).generate(Request(ASK, output=spec))
