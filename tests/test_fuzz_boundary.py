"""Property tests at the library's boundary: whatever comes in, a clear error naming the field
or a well-formed result, never a traceback from deep inside (tiny tokenizers, no models load)."""

from __future__ import annotations

import contextlib
import io
import math
import re
from collections.abc import Iterator
from typing import Any
from unittest import mock

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage
from langchain_core.messages import ChatMessage as LangChainChatMessage
from pydantic import ValidationError

from langchain_nudging import NudgedChatModel, cli
from langchain_nudging.backends.chat_template import template_of
from langchain_nudging.chat import model as cm
from langchain_nudging.chat.messages import to_chat_messages
from langchain_nudging.config import ALGORITHM_KNOBS, SAMPLING_KNOBS, NudgingConfig, SamplingConfig
from langchain_nudging.prompts import ChatMessage, normalize, render_prompts
from langchain_nudging.structured import ToolCall

pytestmark = pytest.mark.timeout(120)

FUZZ = settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

SP_SPECIALS = ["<|im_start|>", "<|im_end|>", "<s>", "</s>", "<unk>", "<pad>"]
GEMMA_SPECIALS = ["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"]
ROLES = ["system", "user", "assistant", "tool"]

GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\\n' + message['content'] + '<end_of_turn>\\n' }}"
    "{% endfor %}"
)


@pytest.fixture(scope="module")
def gemma_like(make_tokenizer: Any) -> Any:
    tokenizer = make_tokenizer("sp", chat_template=GEMMA_TEMPLATE)
    tokenizer.add_special_tokens({"bos_token": "<bos>", "eos_token": "<eos>"})
    tokenizer.add_tokens(["<start_of_turn>", "<end_of_turn>"], special_tokens=True)
    return tokenizer


# --- strategies -----------------------------------------------------------------------------------

SPECIAL = st.sampled_from(SP_SPECIALS + GEMMA_SPECIALS)
PRIVATE_USE = st.characters(min_codepoint=0xF0000, max_codepoint=0xF0020)
PIECE = st.one_of(
    st.text(max_size=12),
    SPECIAL,
    st.text(PRIVATE_USE, max_size=3),
    st.sampled_from(["\nQuestion:", "\nAnswer: ", "\nResult:", "\n", "{{ x }}", "{% if %}"]),
)
CONTENT = st.one_of(
    st.lists(PIECE, max_size=8).map("".join),
    st.just(""),
    st.builds(lambda s, n: s * n, SPECIAL | st.just("ab"), st.integers(2000, 6000)),  # huge
)


@st.composite
def conversations(draw: st.DrawFn, roles: list[str] = ROLES) -> list[ChatMessage]:
    messages = []
    for _ in range(draw(st.integers(0, 7))):
        rare = draw(st.integers(0, 30)) == 0
        role = draw(st.sampled_from([*roles, "critic"] if rare else roles))
        content = draw(CONTENT)
        calls: tuple[ToolCall, ...] = ()
        if role == "assistant" and draw(st.booleans()):
            args = draw(st.dictionaries(st.text(max_size=5), CONTENT, max_size=2))
            calls = (ToolCall(draw(st.text(min_size=1, max_size=8)), args, "c1"),)
        elif role != "assistant" and draw(st.integers(0, 30)) == 0:
            calls = (ToolCall("f", {}, "c1"),)  # only assistants carry calls: an error
        name = draw(st.none() | st.text(max_size=6)) if role == "tool" else None
        messages.append(ChatMessage(role, content, calls, name, "c1" if name else None))  # type: ignore[arg-type]
    return messages


def without_specials(messages: list[ChatMessage]) -> list[ChatMessage]:
    """The same conversation with each special-token string written as plain text."""
    specials = sorted(SP_SPECIALS + GEMMA_SPECIALS, key=len, reverse=True)
    pattern = re.compile("|".join(re.escape(s) for s in specials))

    def clean(text: str) -> str:
        return pattern.sub("§", text)

    def clean_call(call: ToolCall) -> ToolCall:
        args = {clean(k): clean(v) for k, v in call.arguments.items()}
        return ToolCall(clean(call.name), args, call.id)

    return [
        ChatMessage(
            m.role,
            clean(m.content),
            tuple(clean_call(c) for c in m.tool_calls),
            m.name and clean(m.name),
            m.tool_call_id,
        )
        for m in messages
    ]


def marked(prompt: Any) -> list[str]:
    return [prompt[a:b] for a, b in prompt.controls]


def outcome(call: Any, *args: Any, **kwargs: Any) -> tuple[Any, ValueError | None]:
    """``(result, None)``, or ``(None, error)`` for a ``ValueError`` (a pydantic
    ``ValidationError`` included). Reaching a model load counts as a valid input."""
    try:
        return call(*args, **kwargs), None
    except _LoadedError:
        return None, None
    except ValueError as error:
        return None, error


# --- prompt rendering -----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["chatml", "gemma"])
@FUZZ
@given(messages=conversations())
def test_rendering_is_an_error_naming_messages_or_has_the_clean_markers(
    sp_tokenizer: Any, gemma_like: Any, kind: str, messages: list[ChatMessage]
) -> None:
    template = template_of(sp_tokenizer if kind == "chatml" else gemma_like)
    prompts, error = outcome(render_prompts, messages, template)
    if error is not None:
        assert re.match(r"messages(\[\d+\](\.role)?)?: ", str(error)), str(error)
        return
    clean = render_prompts(without_specials(messages), template)
    assert len(prompts.nudging.controls) == len(clean.nudging.controls)
    assert marked(prompts.nudging) == marked(clean.nudging)
    assert prompts.base.controls == ()
    # Spans are ordered, disjoint and inside the text; the answer prefix holds none.
    ends = [0] + [e for span in prompts.nudging.controls for e in span]
    assert ends == sorted(ends)
    assert ends[-1] <= len(prompts.nudging)
    # Every message text is in the prompt verbatim (specials included, as text).
    for message in messages:
        if message.role in ("user", "assistant") and message.content and not message.tool_calls:
            assert message.content in prompts.nudging
    # Turn labels inside content never start a turn of the base transcript; the answer
    # prefix (a final assistant message) is kept verbatim, so it is left out of the count.
    turns = sum(1 for m in messages if m.role == "user")
    prefix = normalize(messages)[2]
    head = prompts.base[: len(prompts.base) - len(prefix)]
    assert head.count("\nQuestion:") <= turns


@FUZZ
@given(text=st.lists(st.text(max_size=20), min_size=1, max_size=4).map("\n".join))
def test_a_clean_conversation_renders_the_template_unchanged(sp_tokenizer: Any, text: str) -> None:
    text = "".join(ch for ch in text if not 0xF0000 <= ord(ch) <= 0xF001F)
    prompts = render_prompts([ChatMessage("user", text)], template_of(sp_tokenizer))
    chat = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": text},
        {"role": "assistant", "content": "X"},
    ]
    whole = sp_tokenizer.apply_chat_template(chat, tokenize=False, continue_final_message=True)
    assert prompts.nudging + "X" == whole
    assert len(prompts.nudging.controls) == 5


# --- message conversion ---------------------------------------------------------------------------

BLOCK = st.one_of(
    st.text(max_size=10),
    st.builds(lambda t: {"type": "text", "text": t}, st.text(max_size=10)),
    st.builds(
        lambda t: {"type": t, "url": "http://x"}, st.sampled_from(["image", "audio", "file"])
    ),
    st.builds(lambda t: {"type": "tool_use", "id": t}, st.text(max_size=4)),
    st.integers(),
    st.none(),
)
LC_CONTENT = st.one_of(st.text(max_size=30), st.lists(BLOCK, max_size=4))


@st.composite
def langchain_messages(draw: st.DrawFn) -> Any:
    kind = draw(st.sampled_from(["human", "system", "ai", "tool", "chat", "raw"]))
    content = draw(LC_CONTENT)
    if kind == "raw":  # bypasses LangChain's own validation, as a careless caller may
        return HumanMessage.model_construct(content=draw(st.none() | st.integers() | LC_CONTENT))
    try:
        if kind == "human":
            return HumanMessage(content=content)
        if kind == "system":
            return SystemMessage(content=content)
        if kind == "ai":
            call = st.builds(
                lambda n, a: {"name": n, "args": a, "id": "c", "type": "tool_call"},
                st.text(min_size=1, max_size=5),
                st.dictionaries(st.text(max_size=3), st.integers()),
            )
            calls = draw(st.lists(call, max_size=2))
            return AIMessage(content=content, tool_calls=calls)
        if kind == "tool":
            return ToolMessage(content=content, tool_call_id=draw(st.text(max_size=4)))
        role = draw(st.sampled_from(["user", "assistant", "developer", "critic", "ai", ""]))
        return LangChainChatMessage(role=role, content=content)
    except ValidationError:
        return HumanMessage.model_construct(content=content)


@FUZZ
@given(messages=st.lists(langchain_messages(), max_size=6))
def test_message_conversion_is_an_error_naming_the_message_or_plain_text(messages: list) -> None:
    converted, error = outcome(to_chat_messages, messages)
    if error is not None:
        where = r"messages(\[\d+\](\.content(\[\d+\])?|\.tool_calls\[\d+\]\.\w+)?)?: "
        assert re.match(where, str(error)), str(error)
        return
    assert len(converted) == len(messages)
    for message, chat in zip(messages, converted, strict=True):
        assert chat.role in ROLES
        assert isinstance(chat.content, str)
        if isinstance(message.content, str) and not isinstance(message, ToolMessage):
            assert chat.content == message.content


GARBAGE = st.one_of(
    st.integers(),
    st.floats(),
    st.none(),
    st.binary(max_size=4),
    st.text(max_size=8),
    st.dictionaries(st.sampled_from(["role", "content", "x"]), st.text(max_size=5) | st.integers()),
    st.tuples(st.text(max_size=6), st.text(max_size=6) | st.integers() | st.none()),
    st.builds(object),
    st.lists(st.integers(), max_size=2),
)


@pytest.fixture(scope="module")
def no_loading() -> Iterator[NudgedChatModel]:
    with mock.patch.object(cm, "text_model", side_effect=_LoadedError("a model was loaded")):
        yield NudgedChatModel()


class _LoadedError(AssertionError):
    """Raised where a model would load: the input got past every check."""


@FUZZ
@given(items=st.lists(GARBAGE, min_size=1, max_size=4))
def test_garbage_through_the_chat_model_fails_naming_the_message(
    no_loading: NudgedChatModel, items: list
) -> None:
    _, error = outcome(no_loading.invoke, items)  # valid messages reach the (absent) models
    if error is not None:
        assert re.match(r"(messages(\[\d+\])?[.:]|input: )", str(error)), str(error)


@pytest.mark.parametrize(
    ("value", "match"),
    [
        (None, "Invalid input type"),
        (42, "Invalid input type"),
        (b"bytes", "input: bytes"),
        ([object()], r"messages\[0\]: object is not a message"),
        ([HumanMessage("hi"), 3], r"messages\[1\]: int is not a message"),
        ([("critic", "x")], r"messages\[0\]: tuple is not a message"),
        ([{"role": "user", "content": 5}], r"messages\[0\]: content"),
        ([HumanMessage.model_construct(content=None)], r"messages\[0\]\.content: NoneType"),
        ([HumanMessage.model_construct(content={"a": 1})], r"messages\[0\]\.content: dict"),
        ([SystemMessage("only a system")], "at least one user message"),
        (
            [
                AIMessage.model_construct(content="", tool_calls=[{"name": "f", "args": 5}]),
                HumanMessage("x"),
            ],
            r"messages\[0\]\.tool_calls\[0\]\.args",
        ),
    ],
)
def test_bad_inputs_name_the_message_before_loading(
    no_loading: NudgedChatModel, value: Any, match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        no_loading.invoke(value)


SETTINGS = {
    "gamma": st.floats(allow_nan=True) | st.integers(-5, 5) | st.just(1e308),
    "max_tokens": st.integers(-(2**70), 2**70),
    "draft_tokens": st.integers(-10, 10_000),
    "chunk_tokens": st.integers(-10, 10_000),
    "temperature": st.floats(allow_nan=True),
    "top_p": st.floats(allow_nan=True),
    "top_k": st.integers(-(2**65), 2**65),
    "seed": st.integers(-(2**70), 2**70) | st.none(),
    "timeout": st.floats(allow_nan=True) | st.none(),
    "stop": st.lists(st.text(max_size=3), max_size=2) | st.integers(),
    "model": st.text(max_size=6) | st.integers() | st.none(),
}
ANY = st.one_of(st.text(max_size=5), st.integers(), st.floats(), st.none(), st.booleans())


@FUZZ
@given(options=st.fixed_dictionaries({}, optional={k: v | ANY for k, v in SETTINGS.items()}))
def test_chat_model_settings_are_valid_or_name_the_field(options: dict[str, Any]) -> None:
    model, error = outcome(NudgedChatModel, **options)
    if error is not None:
        assert isinstance(error, ValidationError)
        fields = {str(e["loc"][0]) for e in error.errors()}
        assert fields <= set(options) | {"base_model"}, (fields, options)
        return
    assert 0.0 <= model.gamma <= 1.0
    assert model.seed is None or 0 <= model.seed < 2**64
    assert model.timeout is None or (model.timeout > 0 and math.isfinite(model.timeout))


@FUZZ
@given(options=st.fixed_dictionaries({}, optional={k: v | ANY for k, v in SETTINGS.items()}))
def test_per_call_options_are_valid_or_name_the_option(
    no_loading: NudgedChatModel, options: dict[str, Any]
) -> None:
    _, error = outcome(no_loading.invoke, "hi", **options)
    if error is not None:
        assert any(name in str(error) for name in options), (str(error), options)


# --- config validation ----------------------------------------------------------------------------

NUMBER = st.one_of(st.integers(-(2**70), 2**70), st.floats(allow_nan=True), ANY)
CONFIG_FIELDS = [*NudgingConfig.model_fields, "gama", "top-p"]
SAMPLING_FIELDS = [*SamplingConfig.model_fields, "temp"]


@FUZZ
@given(values=st.dictionaries(st.sampled_from(CONFIG_FIELDS), NUMBER, max_size=5))
def test_nudging_config_is_valid_or_names_the_field(values: dict[str, Any]) -> None:
    config, error = outcome(NudgingConfig, **values)
    if error is not None:
        assert isinstance(error, ValidationError)
        fields = {str(e["loc"][0]) for e in error.errors()}
        assert fields <= set(values), (fields, values)
        return
    assert 0.0 <= config.gamma <= 1.0
    assert 1 <= config.draft_tokens <= 4096
    assert 1 <= config.chunk_tokens <= 4096
    assert config.max_tokens >= 1
    assert all(isinstance(s, str) and s for s in config.stop)


@FUZZ
@given(values=st.dictionaries(st.sampled_from(SAMPLING_FIELDS), NUMBER, max_size=4))
def test_sampling_config_is_valid_or_names_the_field(values: dict[str, Any]) -> None:
    sampling, error = outcome(SamplingConfig, **values)
    if error is not None:
        assert isinstance(error, ValidationError)
        fields = {str(e["loc"][0]) for e in error.errors()}
        assert fields <= set(values), (fields, values)
        return
    assert 0.0 <= sampling.temperature <= 100.0
    assert 0.0 < sampling.top_p <= 1.0
    assert sampling.top_k >= 0


# --- the command line (in-process; the models never load) ----------------------------------------


def run_cli(argv: list[str]) -> tuple[int | str, str]:
    """``(exit code, stderr)`` of ``nudging argv``; ``"loaded"`` when the models would load."""
    errors = io.StringIO()

    def load(*_args: Any, **_kwargs: Any) -> Any:
        raise _LoadedError("the models would load")

    with (
        mock.patch.object(cli.NudgingPair, "load", side_effect=load),
        contextlib.redirect_stderr(errors),
    ):
        try:
            code: int | str = cli.main(argv)
        except _LoadedError:
            code = "loaded"
        except SystemExit as exit_:  # argparse
            code = int(exit_.code or 0)
    return code, errors.getvalue()


FLAGS = {cli.flag(name): name for name in (*ALGORITHM_KNOBS, *SAMPLING_KNOBS)}
NUMERIC_TEXT = st.one_of(
    st.integers(-(2**70), 2**70).map(str),
    st.floats(allow_nan=True).map(str),
    st.sampled_from(["nan", "inf", "-inf", "1e999", "0x10", "", "abc", "1_000", " 3 "]),
)


@FUZZ
@given(flag=st.sampled_from(list(FLAGS)), value=NUMERIC_TEXT)
def test_cli_numbers_are_valid_or_name_the_option(flag: str, value: str) -> None:
    code, stderr = run_cli(["chat", f"{flag}={value}", "hello"])
    if code == "loaded":
        return
    assert code == 2, stderr
    assert "Traceback" not in stderr
    assert flag in stderr or FLAGS[flag] in stderr, stderr


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["chat", "--bogus"], "unrecognized arguments: --bogus"),
        (["chat", "--marks", "loud"], "--marks"),
        (["frobnicate"], "invalid choice"),
        (["chat", "--base", "", "hi"], "--base: model='' is empty"),
        (["chat", "--nudging", "./no-such-dir", "hi"], "--nudging: model path './no-such-dir'"),
        (["chat", "--base", "/no/such/model", "hi"], "/no/such/model"),
        (["chat", "--base", "my model", "hi"], "--base: model path 'my model' does not exist"),
        (["chat", "--device", "toaster", "hi"], "--device: device='toaster'"),
        (["chat", "--dtype", "int8", "hi"], "--dtype: dtype='int8'"),
        (["chat", "--device-map", "everywhere", "hi"], "--device-map 'everywhere'"),
        (["chat", "--seed", str(2**64), "hi"], "--seed"),
        (["chat", "--stop", "", "hi"], "stop"),
        (["eval", "--task", "nope"], "task: 'nope'"),
        (["eval", "--task", "ifeval", "--concurrency", "0"], "concurrency"),
    ],
)
def test_cli_bad_input_fails_before_loading(argv: list[str], needle: str) -> None:
    code, stderr = run_cli(argv)
    assert code == 2, stderr
    assert needle in stderr
    assert "Traceback" not in stderr


def test_cli_unreachable_hub_id_fails_before_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, stderr = run_cli(["chat", "--nudging", "models/not-here", "hi"])
    assert code == 2
    assert "--nudging: model='models/not-here'" in stderr
    assert "cannot be reached" in stderr
