"""NudgedChatModel: the LangChain contract, on tiny random-weight models (see conftest.py)."""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from collections.abc import Iterator
from typing import Any
from unittest import mock

import pytest
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.language_models import BaseChatModel
from langchain_core.load import dumpd, load
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    FunctionMessage,
    HumanMessage,
    RemoveMessage,
    SystemMessage,
    ToolMessage,
)
from langchain_core.messages import ChatMessage as LangChainChatMessage
from langchain_tests.unit_tests import ChatModelUnitTests

from langchain_nudging import NudgedChatModel
from langchain_nudging.backends.registry import BUNDLED_BASE_ID, BUNDLED_NUDGING_ID, text_model
from langchain_nudging.chat import model as cm
from langchain_nudging.chat.chunks import finish_reason_for
from langchain_nudging.chat.messages import to_chat_messages
from langchain_nudging.chat.options import CallOptions
from langchain_nudging.config import (
    ALGORITHM_KNOBS,
    SAMPLING_KNOBS,
    NudgingConfig,
    SamplingConfig,
)
from langchain_nudging.prompts import ChatMessage
from langchain_nudging.serving.engine import NudgingEngine
from langchain_nudging.serving.handle import RequestHandle
from langchain_nudging.serving.shared import shared_engine

STORY = "Tell me a story."  # runs for hundreds of tokens on the tiny pair
QUESTION = "What is the capital of France?"


class TestNudgedChatModelStandard(ChatModelUnitTests):
    """langchain-tests' unit suite, on the default (bundled) pair: nothing may load here."""

    @property
    def chat_model_class(self) -> type[NudgedChatModel]:
        return NudgedChatModel

    @property
    def chat_model_params(self) -> dict[str, Any]:
        return {"gamma": 0.4}

    @property
    def init_from_env_params(self) -> tuple[dict[str, str], dict[str, Any], dict[str, Any]]:
        # The API key comes from the environment, and dumps as a reference to that variable.
        return (
            {"LANGCHAIN_NUDGING_API_KEY": "key-from-env"},
            {"gamma": 0.4},
            {"api_key": "key-from-env"},
        )

    @pytest.mark.xfail(
        reason="the suite loads with allowed_objects='all', which in langchain-core 1.x admits "
        "only classes of langchain-core's own mapping, never a partner package's; "
        "test_serdes_with_the_class_allowed runs the same round trip as a user would",
        raises=ValueError,
        strict=True,
    )
    def test_serdes(self, model: BaseChatModel, snapshot: Any) -> None:
        super().test_serdes(model, snapshot)

    def test_serdes_with_the_class_allowed(self, model: BaseChatModel, snapshot: Any) -> None:
        env_params, _params, _attrs = self.init_from_env_params
        with mock.patch.dict(os.environ, env_params):
            assert dumpd(model) == snapshot(name="serialized")
            back = load(
                dumpd(model),
                valid_namespaces=model.get_lc_namespace()[:1],
                allowed_objects=[NudgedChatModel],
                secrets_from_env=True,
            )
        assert isinstance(back, NudgedChatModel)
        assert back.asdict() == model.asdict()
        assert back.api_key is not None
        assert back.api_key.get_secret_value() == "key-from-env"


# -- fixtures ----------------------------------------------------------------------------------


@pytest.fixture
def chat(llama_a: Any, gemma_b: Any) -> NudgedChatModel:
    return NudgedChatModel(model=llama_a, nudging_model=gemma_b, max_tokens=48)


@pytest.fixture
def long_chat(llama_a: Any, gemma_b: Any) -> NudgedChatModel:
    return NudgedChatModel(model=llama_a, nudging_model=gemma_b, max_tokens=400, max_rounds=400)


@pytest.fixture
def engine(llama_a: Any, gemma_b: Any) -> Iterator[NudgingEngine]:
    """The shared engine the chat models of these tests use; idle again after each test."""
    engine = shared_engine(text_model(llama_a), text_model(gemma_b))
    yield engine
    assert engine.wait_idle(timeout=20)


@pytest.fixture
def handles(monkeypatch: pytest.MonkeyPatch) -> list[RequestHandle]:
    """Every request submitted during the test, to read how it ended."""
    submitted: list[RequestHandle] = []
    submit = NudgingEngine.submit

    def recording(self: NudgingEngine, *args: Any, **kwargs: Any) -> RequestHandle:
        handle = submit(self, *args, **kwargs)
        submitted.append(handle)
        return handle

    monkeypatch.setattr(NudgingEngine, "submit", recording)
    return submitted


async def await_idle(engine: NudgingEngine) -> None:
    """``engine.wait_idle`` off the event loop."""
    assert await asyncio.to_thread(engine.wait_idle, 20)


class TokenRecorder(BaseCallbackHandler):
    def __init__(self, engine: NudgingEngine | None = None) -> None:
        self.tokens: list[str] = []
        self.chunks: list[Any] = []
        self.engine = engine
        self.most_live = 0

    def on_llm_new_token(self, token: str, *, chunk: Any = None, **kwargs: Any) -> None:
        self.tokens.append(token)
        self.chunks.append(chunk)
        if self.engine is not None:
            self.most_live = max(self.most_live, self.engine.live_requests)


def segments_of(message: BaseMessage) -> list[dict[str, Any]]:
    return message.response_metadata.get("segments", [])


# -- construction ------------------------------------------------------------------------------


def test_construction_loads_nothing() -> None:
    with mock.patch.object(cm, "text_model", side_effect=AssertionError("loaded")) as load:
        model = NudgedChatModel(temperature=0, max_tokens=100, timeout=60, stop=[], api_key="k")
        model._identifying_params  # noqa: B018
        model._get_ls_params()
    assert load.call_count == 0


def test_models_come_from_the_factory(llama_a: Any, gemma_b: Any) -> None:
    models = {BUNDLED_BASE_ID: text_model(llama_a), BUNDLED_NUDGING_ID: text_model(gemma_b)}
    with mock.patch.object(cm, "text_model", side_effect=lambda s, **_: models[s]) as factory:
        first, second = NudgedChatModel(max_tokens=8), NudgedChatModel(max_tokens=8)
        assert factory.call_count == 0
        assert first.load() is first
        assert [c.args for c in factory.call_args_list] == [
            (BUNDLED_BASE_ID,),
            (BUNDLED_NUDGING_ID,),
        ]
        assert first.invoke(QUESTION).content
        engine = shared_engine(models[BUNDLED_BASE_ID], models[BUNDLED_NUDGING_ID])
        assert second.get_engine() is first.get_engine() is engine
        assert first.get_token_ids("Paris") == models[BUNDLED_BASE_ID].token_ids("Paris")
        # Only the loading fields that differ from their defaults reach the factory.
        assert factory.call_args.kwargs == {}
        NudgedChatModel(dtype="float32", device="cpu").load()
        assert factory.call_args.kwargs == {"dtype": "float32", "device": "cpu"}


@pytest.mark.parametrize(("field", "value"), [("dtype", "int8"), ("device", "not-a-device")])
def test_bad_loading_options_fail_when_the_models_load(field: str, value: Any) -> None:
    model = NudgedChatModel(**{field: value})  # the backend that serves a spec checks them
    with pytest.raises(ValueError, match=field):
        model.load()
    with pytest.raises(ValueError, match=field):
        model.invoke(QUESTION)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("gamma", -0.1),
        ("gamma", 1.5),
        ("max_tokens", 0),
        ("draft_tokens", 0),
        ("draft_tokens", 5000),
        ("chunk_tokens", 0),
        ("max_rounds", 0),
        ("temperature", -1.0),
        ("top_p", 0.0),
        ("top_k", -1),
        ("seed", -1),
        ("timeout", 0),
        ("stop", [""]),
        ("nudging_model", 3),
        ("base_user_prefix", ""),
        ("gama", 0.3),
    ],
)
def test_bad_settings_fail_at_construction(field: str, value: Any) -> None:
    with pytest.raises(ValueError, match=field):
        NudgedChatModel(**{field: value})


def test_bad_model_source_names_the_field() -> None:
    with pytest.raises(ValueError, match=r"model\n.*unknown bundled model 'bundled:nope'"):
        NudgedChatModel(model="bundled:nope")
    with pytest.raises(ValueError, match="nudging_model"):
        NudgedChatModel(nudging_model="   ")


def test_model_alias_and_field_name_both_work() -> None:
    assert NudgedChatModel(model="a/b").base_model == "a/b"
    assert NudgedChatModel(base_model="a/b").base_model == "a/b"


def test_config_building() -> None:
    model = NudgedChatModel(gamma=0.3, draft_tokens=8, stop=["END"], temperature=0.7, seed=5)
    config = model.nudging_config(["STOP", "END"], max_tokens=7, top_p=0.9)
    assert config.gamma == 0.3
    assert config.draft_tokens == 8
    assert config.chunk_tokens == 16
    assert config.max_tokens == 7
    assert config.max_rounds == 150
    assert (config.max_same_nudges, config.loop_passage_words, config.min_repeat_chars) == (
        3,
        5,
        30,
    )
    tuned = model.nudging_config(max_same_nudges=2, loop_passage_words=8, min_repeat_chars=50)
    assert (tuned.max_same_nudges, tuned.loop_passage_words, tuned.min_repeat_chars) == (2, 8, 50)
    assert config.stop == ("END", "STOP")  # construction stops, then the call's, once each
    assert config.base_sampling == SamplingConfig(temperature=0.7, top_p=0.9, seed=5)
    assert config.nudging_sampling == config.base_sampling
    separate = SamplingConfig(temperature=0.2, seed=1)
    assert NudgedChatModel(nudging_sampling=separate).nudging_config().nudging_sampling == separate
    assert NudgedChatModel().nudging_config().base_sampling.greedy


def test_each_knob_is_a_field_a_per_call_option_and_a_config_value() -> None:
    model = NudgedChatModel()
    assert model.nudging_config() == NudgingConfig()
    for name in (*ALGORITHM_KNOBS, *SAMPLING_KNOBS):
        declared = NudgingConfig.model_fields.get(name) or SamplingConfig.model_fields[name]
        field = NudgedChatModel.model_fields[name]
        assert (field.default, field.metadata) == (declared.default, declared.metadata), name
        assert field.description is not None
        assert declared.description is not None
        assert field.description.startswith(declared.description)
        assert name in CallOptions.model_fields
        assert name in model._identifying_params


def test_tracing_params() -> None:
    model = NudgedChatModel(max_tokens=10, stop=["x"], temperature=0.5)
    assert model._llm_type == "nudging-chat"
    params = model._get_ls_params(stop=["y"])
    assert params == {
        "ls_provider": "nudging",
        "ls_model_name": BUNDLED_BASE_ID,
        "ls_model_type": "chat",
        "ls_temperature": 0.5,
        "ls_max_tokens": 10,
        "ls_stop": ["x", "y"],
    }
    assert model._get_ls_params(model="other/base", max_tokens=3)["ls_model_name"] == "other/base"
    assert model._get_ls_params(max_tokens=3)["ls_max_tokens"] == 3
    identifying = model._identifying_params
    assert identifying["model"] == BUNDLED_BASE_ID
    assert identifying["nudging_model"] == BUNDLED_NUDGING_ID
    assert identifying["gamma"] == 0.4


@pytest.mark.parametrize(
    ("engine_reason", "langchain_reason"),
    [
        ("stop", "stop"),
        ("length", "length"),
        ("round_cap", "length"),
        ("repetition", "stop"),
        (None, "stop"),
    ],
)
def test_finish_reason_mapping(engine_reason: str | None, langchain_reason: str) -> None:
    assert finish_reason_for(engine_reason) == langchain_reason


# -- messages ----------------------------------------------------------------------------------


def test_message_conversion() -> None:
    messages = [
        SystemMessage("Be brief."),
        HumanMessage("Hi, I am Ana.", name="ana"),
        HumanMessage(["Two ", {"type": "text", "text": "parts."}]),
        AIMessage("Hello Ana."),
        LangChainChatMessage(role="assistant", content="Anything else?"),
        LangChainChatMessage(role="user", content="Yes."),
        LangChainChatMessage(role="developer", content="Stay polite."),
    ]
    assert to_chat_messages(messages) == [
        ChatMessage("system", "Be brief."),
        ChatMessage("user", "Hi, I am Ana."),
        ChatMessage("user", "Two parts."),
        ChatMessage("assistant", "Hello Ana."),
        ChatMessage("assistant", "Anything else?"),
        ChatMessage("user", "Yes."),
        ChatMessage("system", "Stay polite."),
    ]


BAD_MESSAGES: list[tuple[list[BaseMessage], str]] = [
    ([], "empty"),
    ([ToolMessage("42", tool_call_id="c1")], "at least one user message"),
    ([FunctionMessage("42", name="f")], r"messages\[0\]: FunctionMessage is not supported"),
    (
        [
            HumanMessage("add"),
            AIMessage([{"type": "text", "text": "x"}, {"type": "image", "url": "http://x"}]),
        ],
        r"messages\[1\]\.content\[1\]: 'image'",
    ),
    (
        [HumanMessage([{"type": "image_url", "image_url": {"url": "http://x/y.png"}}])],
        r"messages\[0\]\.content\[0\]: 'image_url' content is not supported",
    ),
    (
        [HumanMessage(["hi", {"type": "image", "url": "http://x/y.png"}])],
        r"content\[1\]: 'image'",
    ),
    (
        [HumanMessage([{"type": "audio", "base64": "AAAA", "mime_type": "audio/wav"}])],
        "'audio' content",
    ),
    ([LangChainChatMessage(role="critic", content="meh")], "role 'critic'"),
    ([HumanMessage("hi"), RemoveMessage(id="m1")], r"messages\[1\]: RemoveMessage"),
    ([SystemMessage("only a system message")], "at least one user message"),
]


@pytest.mark.parametrize(("messages", "match"), BAD_MESSAGES)
def test_bad_messages_fail_before_generation_and_the_model_stays_usable(
    chat: NudgedChatModel,
    engine: NudgingEngine,
    handles: list[RequestHandle],
    messages: list[BaseMessage],
    match: str,
) -> None:
    with pytest.raises(ValueError, match=match):
        chat.invoke(messages)
    assert handles == []
    assert engine.live_requests == 0
    assert chat.invoke(QUESTION).content


def test_prompt_over_the_context_window(chat: NudgedChatModel, engine: NudgingEngine) -> None:
    with pytest.raises(ValueError, match="context window"):
        chat.invoke("word " * 3000)
    assert engine.live_requests == 0
    assert engine.live_sessions == 0
    assert chat.invoke(QUESTION).content


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"max_tokens": 0}, "max_tokens=0"),
        ({"temperature": -1}, "temperature=-1"),
        ({"gamma": 2}, "gamma=2"),
        ({"top_p": 1.5}, "top_p"),
        ({"timeout": -1}, "timeout"),
        ({"mode": "solo"}, "mode"),
        ({"stop": [""]}, "stop"),
        ({"bogus": 1}, r"unknown option\(s\) \['bogus'\]"),
    ],
)
def test_bad_call_options_fail_before_loading(options: dict[str, Any], match: str) -> None:
    model = NudgedChatModel()
    with mock.patch.object(cm, "text_model", side_effect=AssertionError("loaded")) as load:
        with pytest.raises(ValueError, match=match):
            model.invoke(QUESTION, **options)
        with pytest.raises(ValueError, match=match):
            asyncio.run(model.ainvoke(QUESTION, **options))
    assert load.call_count == 0


def test_history_with_names_repeats_and_text_blocks(chat: NudgedChatModel) -> None:
    history = [
        SystemMessage("You answer in one line."),
        SystemMessage("You are kind."),
        HumanMessage("My name is Ana.", name="ana"),
        HumanMessage([{"type": "text", "text": "I have a grey cat."}]),
        AIMessage("Nice to meet you."),
        AIMessage("Cats are lovely."),
        HumanMessage(QUESTION),
    ]
    result = chat.invoke(history)
    assert isinstance(result, AIMessage)
    assert result.content


# -- generations on the tiny pair --------------------------------------------------------------


def test_chunks_carry_provenance_and_the_last_carries_usage(chat: NudgedChatModel) -> None:
    chunks = list(chat.stream(STORY))
    *segments, last = chunks
    assert len(segments) >= 2
    for chunk in segments:
        assert isinstance(chunk, AIMessageChunk)
        (provenance,) = segments_of(chunk)
        assert provenance["text"] == chunk.content != ""
        assert provenance["source"] in ("base", "nudge")
        prob = provenance["base_top1_prob"]
        assert prob is None or 0.0 <= prob <= 1.0
        assert chunk.usage_metadata is None
        assert chunk.chunk_position is None
    assert {segments_of(c)[0]["source"] for c in segments} == {"base", "nudge"}
    assert segments_of(segments[0])[0]["base_top1_prob"] is None  # nudged: base never asked
    assert last.chunk_position == "last"
    assert last.content == ""
    meta = last.response_metadata
    assert meta["model_name"] == "tiny-llama"
    assert meta["nudging_model_name"] == "tiny-gemma3"
    assert meta["finish_reason"] == "length"
    assert meta["nudging_finish_reason"] == "length"
    stats = meta["nudging_stats"]
    assert stats["base_tokens"] > 0
    assert stats["nudge_tokens"] > 0
    written = stats["base_tokens"] + stats["nudge_tokens"]
    # Cut at 48 tokens; a cut inside a character leaves its first bytes (at most 3) out.
    assert 45 <= written <= 48
    assert stats["rounds"] >= 1
    assert 0 < stats["nudged_share"] < 1
    assert last.usage_metadata == {
        "input_tokens": stats["prompt_tokens"],
        "output_tokens": written,
        "total_tokens": stats["prompt_tokens"] + written,
    }
    full = chunks[0]
    for chunk in chunks[1:]:
        full += chunk
    assert [s["text"] for s in segments_of(full)] == [c.content for c in segments]


def test_invoke_equals_the_joined_stream_and_counts_with_the_base_tokenizer(
    chat: NudgedChatModel, llama_a: Any
) -> None:
    result = chat.invoke(STORY)
    streamed = "".join(str(c.content) for c in chat.stream(STORY))
    assert result.content == streamed
    segments = segments_of(result)
    assert "".join(s["text"] for s in segments) == result.content
    answer_ids = llama_a.tokenizer(str(result.content), add_special_tokens=False)["input_ids"]
    assert result.usage_metadata is not None
    assert result.usage_metadata["output_tokens"] == len(answer_ids)
    assert 45 <= len(answer_ids) <= 48  # a cut inside a character leaves its first bytes out
    assert result.response_metadata["finish_reason"] == "length"
    assert chat.get_num_tokens(str(result.content)) == len(answer_ids)


async def test_ainvoke_and_astream_match_the_sync_answer(chat: NudgedChatModel) -> None:
    expected = chat.invoke(STORY).content
    assert (await chat.ainvoke(STORY)).content == expected
    chunks = [chunk async for chunk in chat.astream(STORY)]
    assert "".join(str(c.content) for c in chunks) == expected
    assert chunks[-1].chunk_position == "last"
    assert chunks[-1].usage_metadata is not None


def _spanning_stop(chunks: list[str]) -> str:
    """A stop string that first occurs across the boundary of two segments."""
    full = "".join(chunks)
    offset = 0
    for left, right in itertools.pairwise(chunks):
        offset += len(left)
        if len(left) >= 2 and len(right) >= 2:
            stop = left[-2:] + right[:2]
            if full.find(stop) == offset - 2 and "\n" not in stop:
                return stop
    raise AssertionError(f"no usable segment boundary in {chunks!r}")


def test_stop_strings_across_segments_per_call_and_at_construction(
    llama_a: Any, gemma_b: Any
) -> None:
    plain = NudgedChatModel(model=llama_a, nudging_model=gemma_b, max_tokens=80)
    pieces = [str(c.content) for c in plain.stream(STORY) if c.content]
    stop = _spanning_stop(pieces)
    full = "".join(pieces)
    expected = full[: full.find(stop)]

    per_call = list(plain.stream(STORY, stop=[stop]))
    assert "".join(str(c.content) for c in per_call) == expected
    assert per_call[-1].response_metadata["finish_reason"] == "stop"
    assert not any(stop in str(c.content) for c in per_call)

    built = NudgedChatModel(model=llama_a, nudging_model=gemma_b, max_tokens=80, stop=[stop])
    result = built.invoke(STORY)
    assert result.content == expected
    assert result.response_metadata["finish_reason"] == "stop"


def test_on_llm_new_token_fires_once_per_chunk(chat: NudgedChatModel) -> None:
    recorder = TokenRecorder()
    result = chat.invoke(STORY, config={"callbacks": [recorder]})
    assert "".join(recorder.tokens) == result.content
    assert len(recorder.tokens) == len(segments_of(result)) + 1  # segments, then the last chunk
    assert all(isinstance(chunk.message, AIMessageChunk) for chunk in recorder.chunks)

    recorder = TokenRecorder()
    chunks = list(chat.stream(STORY, config={"callbacks": [recorder]}))
    assert len(recorder.tokens) == len(chunks)
    assert recorder.tokens == [c.content for c in chunks]
    assert segments_of(recorder.chunks[0].message)


async def test_async_callbacks_fire_once_per_chunk(chat: NudgedChatModel) -> None:
    recorder = TokenRecorder()
    result = await chat.ainvoke(STORY, config={"callbacks": [recorder]})
    assert "".join(recorder.tokens) == result.content
    assert len(recorder.tokens) == len(segments_of(result)) + 1


def test_streaming_field_makes_invoke_stream(llama_a: Any, gemma_b: Any) -> None:
    model = NudgedChatModel(model=llama_a, nudging_model=gemma_b, max_tokens=24, streaming=True)
    recorder = TokenRecorder()
    result = model.invoke(STORY, config={"callbacks": [recorder]})
    assert "".join(recorder.tokens) == result.content
    assert result.usage_metadata is not None


def test_output_version_v1(llama_a: Any, gemma_b: Any) -> None:
    model = NudgedChatModel(
        model=llama_a, nudging_model=gemma_b, max_tokens=24, output_version="v1"
    )
    full = None
    for chunk in model.stream(STORY):
        full = chunk if full is None else full + chunk
    assert full is not None
    assert [b["type"] for b in full.content_blocks] == ["text"]
    assert full.text == "".join(s["text"] for s in segments_of(full))
    assert model.invoke(STORY).text == full.text


def test_modes(chat: NudgedChatModel) -> None:
    base = chat.invoke(STORY, mode="base")
    assert {s["source"] for s in segments_of(base)} == {"base"}
    assert base.response_metadata["mode"] == "base"
    nudging = chat.invoke(STORY, mode="nudging")
    assert {s["source"] for s in segments_of(nudging)} == {"nudge"}


def test_per_call_model_override(chat: NudgedChatModel, llama_b: Any) -> None:
    result = chat.invoke(QUESTION, model=llama_b)
    assert result.response_metadata["model_name"] == "tiny-llama-b"
    assert chat.invoke(QUESTION).response_metadata["model_name"] == "tiny-llama"


def test_per_call_options_apply(chat: NudgedChatModel) -> None:
    longer = str(chat.invoke(STORY).content)
    result = chat.invoke(STORY, max_tokens=10)  # a cut between whole characters
    assert result.response_metadata["finish_reason"] == "length"
    assert result.usage_metadata is not None
    assert result.usage_metadata["output_tokens"] == 10
    assert longer.startswith(str(result.content))
    assert len(str(result.content)) < len(longer)


def test_max_tokens_cut_inside_a_character_stays_within_the_cap(chat: NudgedChatModel) -> None:
    result = chat.invoke(STORY, max_tokens=5)  # token 5 is the first byte of a 3-byte character
    assert result.usage_metadata is not None
    assert result.usage_metadata["output_tokens"] <= 5


def test_batch_runs_concurrently_through_the_engine(
    chat: NudgedChatModel, engine: NudgingEngine
) -> None:
    questions = [STORY, QUESTION, "Why is the sky blue?"]
    alone = [chat.invoke(q).content for q in questions]
    recorder = TokenRecorder(engine)
    results = chat.batch(questions, config={"callbacks": [recorder]})
    assert [r.content for r in results] == alone
    assert recorder.most_live >= 2


async def test_abatch_runs_concurrently_through_the_engine(
    chat: NudgedChatModel, engine: NudgingEngine
) -> None:
    questions = [STORY, QUESTION, "Why is the sky blue?"]
    alone = [chat.invoke(q).content for q in questions]
    recorder = TokenRecorder(engine)
    results = await chat.abatch(questions, config={"callbacks": [recorder]})
    assert [r.content for r in results] == alone
    assert recorder.most_live >= 2


# -- leaving early, timeouts -------------------------------------------------------------------


def test_leaving_stream_early_cancels_the_request(
    long_chat: NudgedChatModel, engine: NudgingEngine, handles: list[RequestHandle]
) -> None:
    for _chunk in long_chat.stream(STORY):
        assert engine.live_requests == 1
        break
    assert engine.wait_idle(timeout=20)
    (handle,) = handles
    assert handle.result().stats.finish_reason == "cancelled"
    assert long_chat.invoke(QUESTION, max_tokens=8).content


async def test_leaving_astream_early_cancels_the_request(
    long_chat: NudgedChatModel, engine: NudgingEngine, handles: list[RequestHandle]
) -> None:
    async for _chunk in long_chat.astream(STORY):
        assert engine.live_requests == 1
        break
    await await_idle(engine)

    stream = long_chat.astream(STORY)
    await stream.__anext__()
    await stream.aclose()
    await await_idle(engine)

    first = asyncio.Event()

    async def consume() -> None:
        async for _chunk in long_chat.astream(STORY):
            first.set()

    task = asyncio.create_task(consume())
    await first.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await await_idle(engine)

    assert [h.result().stats.finish_reason for h in handles] == ["cancelled"] * 3
    assert (await long_chat.ainvoke(QUESTION, max_tokens=8)).content


def test_timeout_cancels_and_raises(
    long_chat: NudgedChatModel, engine: NudgingEngine, handles: list[RequestHandle]
) -> None:
    with pytest.raises(TimeoutError, match=r"timeout=0\.001s"):
        long_chat.invoke(STORY, timeout=0.001)
    assert engine.wait_idle(timeout=20)
    assert handles[0].result().stats.finish_reason == "cancelled"
    timed = long_chat.model_copy(update={"timeout": 0.001})
    with pytest.raises(TimeoutError):
        list(timed.stream(STORY))
    assert engine.wait_idle(timeout=20)
    assert long_chat.invoke(QUESTION, max_tokens=8, timeout=60).content


async def test_async_timeout_cancels_and_raises(
    long_chat: NudgedChatModel, engine: NudgingEngine
) -> None:
    with pytest.raises(TimeoutError, match="timeout"):
        await long_chat.ainvoke(STORY, timeout=0.001)
    await await_idle(engine)
    assert (await long_chat.ainvoke(QUESTION, max_tokens=8)).content


async def test_astream_events_carry_provenance(chat: NudgedChatModel) -> None:
    streamed = []
    async for event in chat.astream_events(STORY, version="v2"):
        if event["event"] == "on_chat_model_stream":
            streamed.append(event["data"]["chunk"])
        elif event["event"] == "on_chat_model_end":
            output = event["data"]["output"]
    with_text = [c for c in streamed if c.content]
    assert len(with_text) >= 2
    assert all(segments_of(c)[0]["source"] in ("base", "nudge") for c in with_text)
    assert streamed[-1].chunk_position == "last"
    assert 45 <= output.usage_metadata["output_tokens"] <= 48
    assert "".join(s["text"] for s in segments_of(output)) == output.content


def test_loop_rules_are_per_call_options_validated_like_fields() -> None:
    model = NudgedChatModel(min_repeat_chars=40)
    assert model.nudging_config().min_repeat_chars == 40
    with pytest.raises(ValueError, match="min_repeat_chars"):
        NudgedChatModel(min_repeat_chars=0)
    with pytest.raises(ValueError, match="max_same_nudges"):
        model.invoke("hi", max_same_nudges=0)


def test_a_timeout_ends_the_answer_within_one_forward_pass(
    llama_a: Any, gemma_b: Any, engine: NudgingEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A long base window (96 tokens) used to run to its end after the timeout fired."""
    passes, at_cancel = [0], []
    cancel = RequestHandle.cancel

    def counted_cancel(self: RequestHandle) -> None:
        at_cancel.append(passes[0])
        cancel(self)

    def slow_pass(*_: Any) -> None:
        passes[0] += 1
        time.sleep(0.02)

    monkeypatch.setattr(RequestHandle, "cancel", counted_cancel)
    hooks = [m.model.register_forward_pre_hook(slow_pass) for m in (llama_a, gemma_b)]
    try:
        chat = NudgedChatModel(
            model=llama_a, nudging_model=gemma_b, max_tokens=400, chunk_tokens=96, mode="base"
        )
        with pytest.raises(TimeoutError):
            chat.invoke(STORY, timeout=0.3)
        assert engine.wait_idle(timeout=20)
    finally:
        for hook in hooks:
            hook.remove()
    assert at_cancel
    assert passes[0] - at_cancel[0] <= 1, (passes[0], at_cancel)
