"""Loading options (revision, local_files_only, model_kwargs, a chat-template override),
unloading a chat model's pair (``unload``, ``keep_alive``), serialization, the exported errors
and empty input, on tiny models built in the test (no downloads)."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from langchain_core.load import dumpd, dumps, load, loads
from langchain_core.messages import HumanMessage, SystemMessage
from pydantic import ValidationError
from tiny_models import cache_hub_repo
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

import langchain_nudging
from langchain_nudging import NudgedChatModel, SamplingConfig
from langchain_nudging.backends import registry
from langchain_nudging.backends.registry import built_text_model, text_model
from langchain_nudging.chat import model as chat_module
from langchain_nudging.models import (
    CACHE_ENV_VAR,
    LoadedModel,
    ModelLoadError,
    clear_registry,
    load_model,
    loaded_models,
)
from langchain_nudging.models import load as loading
from langchain_nudging.serving import shared, unloading

WORDS = ["<unk>", "<s>", "</s>", "the", "cat", "sat", "on", "mat", "a", "dog"]
TEMPLATE = (
    "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}[assistant] {% endif %}"
)
SERVER = "http://127.0.0.1:9/v1"  # nothing listens there: a server spec that is never reached


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv(CACHE_ENV_VAR, str(tmp_path / "cache"))
    clear_registry()
    yield
    clear_registry()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(WORDS), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    folder = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def spy(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """The keywords of each `_load_pretrained` call (the load still happens)."""
    seen: list[dict[str, Any]] = []
    real = loading._load_pretrained

    def recording(*args: Any, **kwargs: Any) -> Any:
        seen.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(loading, "_load_pretrained", recording)
    return seen


# -- revision, local_files_only ------------------------------------------------------------------


def test_revision_reaches_from_pretrained_and_is_part_of_the_identity(
    model_dir, no_hub, hub_cache, spy
):
    cache_hub_repo(hub_cache, "tiny-org/tiny", model_dir)
    pinned = load_model("tiny-org/tiny", revision="main", progress=False)
    assert spy[-1]["revision"] == "main"
    assert pinned.name == "tiny-org/tiny@main"
    assert load_model("tiny-org/tiny", revision="main", progress=False) is pinned
    plain = load_model("tiny-org/tiny", progress=False)
    assert plain is not pinned
    assert spy[-1]["revision"] is None


def test_a_revision_not_in_the_cache_fails_at_once_naming_it(model_dir, no_hub, hub_cache):
    cache_hub_repo(hub_cache, "tiny-org/tiny", model_dir)
    started = time.monotonic()
    with pytest.raises(ModelLoadError, match=r"'tiny-org/tiny'.*at revision 'v2'"):
        load_model("tiny-org/tiny", revision="v2", progress=False)
    assert time.monotonic() - started < 10


def test_a_local_folder_ignores_revision(model_dir, spy):
    loaded = load_model(model_dir, revision="v2", progress=False)
    assert spy[-1]["revision"] is None
    assert load_model(model_dir, progress=False) is loaded


@pytest.mark.parametrize("bad", ["", "  ", 3])
def test_a_bad_revision(bad, model_dir):
    with pytest.raises(ModelLoadError, match="revision="):
        load_model(model_dir, revision=bad)


@pytest.mark.timeout(30)
def test_local_files_only_fails_at_once_without_probing_the_hub(no_hub, hub_cache, monkeypatch):
    monkeypatch.setattr(loading, "_hub_unreachable", lambda: pytest.fail("the Hub was probed"))
    started = time.monotonic()
    with pytest.raises(ModelLoadError) as caught:
        load_model("someorg/not-cached", local_files_only=True)
    assert time.monotonic() - started < 2
    message = str(caught.value)
    assert "model='someorg/not-cached'" in message
    assert "local_files_only=True" in message
    assert "hf download someorg/not-cached" in message


def test_local_files_only_loads_a_cached_hub_id_from_the_cache(
    model_dir, no_hub, hub_cache, monkeypatch, spy
):
    cache_hub_repo(hub_cache, "tiny-org/tiny", model_dir)
    monkeypatch.setattr(loading, "_hub_unreachable", lambda: pytest.fail("the Hub was probed"))
    loaded = load_model("tiny-org/tiny", local_files_only=True, progress=False)
    assert [call["local_files_only"] for call in spy] == [True]
    # Where the files come from is not which weights they are: the same model is shared.
    assert load_model("tiny-org/tiny", progress=False) is loaded


def test_an_unreachable_hub_is_probed_once_for_a_pair(no_hub, hub_cache, monkeypatch):
    calls = []
    monkeypatch.setattr(loading, "_FAILED_PROBES", {})
    real = loading._probe
    monkeypatch.setattr(loading, "_probe", lambda *a: calls.append(a) or real(*a))
    for repo in ("org/base-not-cached", "org/chat-not-cached"):
        with pytest.raises(ModelLoadError, match="cannot be reached"):
            load_model(repo)
    assert len(calls) == 1


# -- model_kwargs ---------------------------------------------------------------------------------


def test_model_kwargs_reach_the_model_and_decide_sharing(model_dir, spy):
    eager = load_model(model_dir, model_kwargs={"attn_implementation": "eager"}, progress=False)
    assert spy[-1]["model_kwargs"] == {"attn_implementation": "eager"}
    assert eager.model.config._attn_implementation == "eager"
    same = load_model(model_dir, model_kwargs={"attn_implementation": "eager"}, progress=False)
    assert same is eager
    assert load_model(model_dir, progress=False) is not eager
    assert load_model(model_dir, model_kwargs={}, progress=False) is not eager


class _Config:
    """Stands for a transformers quantization config: compared by `to_dict()`."""

    def __init__(self, bits: int) -> None:
        self.bits = bits

    def to_dict(self) -> dict[str, int]:
        return {"bits": self.bits}


def test_equal_config_objects_in_model_kwargs_share_one_text_model(model_dir, monkeypatch):
    monkeypatch.setattr(loading, "_load_pretrained", lambda *a, **k: pytest.fail("loaded"))
    assert registry._frozen({"quantization_config": _Config(4)}) == registry._frozen(
        {"quantization_config": _Config(4)}
    )
    assert registry._frozen({"q": _Config(4)}) != registry._frozen({"q": _Config(8)})


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"dtype": torch.float16}, r"\['dtype'\] set by langchain-nudging itself.*use dtype="),
        ({"device_map": "auto"}, "use device_map="),
        ({"revision": "x"}, "use revision="),
        ({"use_safetensors": False}, "use allow_pickle="),
        ("attn_implementation=sdpa", "expected a dict"),
        ({1: "x"}, "expected a dict"),
    ],
)
def test_model_kwargs_are_validated(kwargs, match, model_dir):
    with pytest.raises(ModelLoadError, match=match):
        load_model(model_dir, model_kwargs=kwargs)
    with pytest.raises(ValidationError, match=match):
        NudgedChatModel(model=str(model_dir), model_kwargs=kwargs)


# -- the chat template override ------------------------------------------------------------------


def test_a_chat_template_override_shares_the_weights(model_dir, tmp_path):
    plain = load_model(model_dir, progress=False)
    templated = load_model(model_dir, chat_template=TEMPLATE, progress=False)
    assert templated.model is plain.model
    assert templated.tokenizer.chat_template == TEMPLATE
    assert not getattr(plain.tokenizer, "chat_template", None)
    assert load_model(model_dir, chat_template=TEMPLATE, progress=False) is templated
    file = tmp_path / "template.jinja"
    file.write_text(TEMPLATE)
    assert load_model(model_dir, chat_template=file, progress=False) is templated
    assert load_model(model_dir, chat_template=str(file), progress=False) is templated


@pytest.mark.parametrize(
    ("template", "match"),
    [
        ("no/such/template.jinja", "neither a Jinja template"),
        ("{% for m in messages %}", "Jinja syntax error"),
        ("", "neither a Jinja template"),
    ],
)
def test_a_bad_chat_template(template, match, model_dir):
    with pytest.raises(ModelLoadError, match=match):
        load_model(model_dir, chat_template=template)
    with pytest.raises(ValidationError, match=match):
        NudgedChatModel(nudging_model=str(model_dir), nudging_chat_template=template)


def test_the_nudging_model_renders_with_the_override(build_model, byte_tokenizer, sp_tokenizer):
    base, nudging = build_model("llama", byte_tokenizer), build_model("gemma", sp_tokenizer)
    llm = NudgedChatModel(
        model=base, nudging_model=nudging, nudging_chat_template=TEMPLATE, max_tokens=4
    )
    pair = llm.get_engine().pair
    rendered = pair.nudging.chat_template.render([{"role": "user", "content": "hi"}], None)
    assert rendered.startswith("[user] hi")
    assert pair.nudging.model is nudging.model  # the same weights
    assert "<|im_start|>" in text_model(nudging).chat_template.render(
        [{"role": "user", "content": "hi"}], None
    )
    assert isinstance(llm.invoke("hi").content, str)
    llm.unload()


# -- options a backend cannot use ----------------------------------------------------------------


@pytest.mark.parametrize(
    "option",
    [{"revision": "v1"}, {"local_files_only": True}, {"model_kwargs": {"a": 1}},
     {"chat_template": TEMPLATE}],
)  # fmt: skip
def test_the_factory_refuses_hugging_face_options_for_a_server(option):
    name = next(iter(option))
    with pytest.raises(ValueError, match=rf"^{name}: option\(s\) of models loaded with"):
        text_model(SERVER, **option)


def test_a_chat_model_refuses_an_option_neither_model_can_use():
    with pytest.raises(ValidationError, match="model_kwargs: an option of models loaded"):
        NudgedChatModel(model=SERVER, nudging_model=SERVER, model_kwargs={"a": 1})
    with pytest.raises(ValidationError, match="nudging_chat_template: an option"):
        NudgedChatModel(nudging_model=SERVER, nudging_chat_template=TEMPLATE)
    with pytest.raises(ValidationError, match=r"revision: an option.*runtime='llamacpp'"):
        NudgedChatModel(runtime="llamacpp", revision="v1")


def test_a_mixed_pair_gives_each_option_to_the_model_that_can_use_it():
    llm = NudgedChatModel(
        nudging_model=SERVER, model_kwargs={"attn_implementation": "eager"}, revision="v1"
    )
    base_options, nudging_options = llm._pair_options(llm.base_model)
    assert base_options["model_kwargs"] == {"attn_implementation": "eager"}
    assert base_options["revision"] == "v1"
    assert "model_kwargs" not in nudging_options
    assert "revision" not in nudging_options


def test_nudging_model_kwargs_replace_model_kwargs_for_the_nudging_model():
    llm = NudgedChatModel(model_kwargs={"a": 1}, nudging_model_kwargs={})
    base_options, nudging_options = llm._pair_options(llm.base_model)
    assert base_options["model_kwargs"] == {"a": 1}
    assert "model_kwargs" not in nudging_options


# -- unload and keep_alive -----------------------------------------------------------------------


@pytest.fixture
def fresh_pair(build_model, byte_tokenizer, sp_tokenizer) -> tuple[LoadedModel, LoadedModel]:
    return build_model("llama", byte_tokenizer, seed=5), build_model("gemma", sp_tokenizer, seed=6)


def _engines_of(llm: NudgedChatModel) -> list[Any]:
    with shared._SHARED_LOCK:
        return [e for e in shared._SHARED.values() if e.pair.base.model is llm.base_model.model]


def test_unload_frees_the_pair_and_the_next_call_loads_it_again(fresh_pair):
    base, nudging = fresh_pair
    llm = NudgedChatModel(model=base, nudging_model=nudging, max_tokens=4)
    assert llm.unload() is False  # nothing built yet
    llm.invoke("hi")
    engine = llm.get_engine()
    assert _engines_of(llm) == [engine]
    assert llm.unload() is True
    assert engine.closed
    assert _engines_of(llm) == []
    assert built_text_model(base) is None
    assert built_text_model(nudging) is None
    assert llm.unload() is False
    assert llm.invoke("hi").content is not None  # loads again
    assert llm.get_engine() is not engine
    llm.unload()


def test_unload_keeps_a_model_another_engine_uses(fresh_pair, build_model, sp_tokenizer):
    base, nudging = fresh_pair
    other = NudgedChatModel(model=base, nudging_model=build_model("llama", sp_tokenizer, seed=7))
    other_engine = other.get_engine()
    llm = NudgedChatModel(model=base, nudging_model=nudging)
    engine = llm.get_engine()
    assert llm.unload() is True
    assert engine.closed
    assert not other_engine.closed
    assert built_text_model(base) is other_engine.pair.base  # still in use: kept
    assert built_text_model(nudging) is None
    other.unload()


def test_unloading_a_template_variant_keeps_the_weights_another_engine_uses(model_dir):
    folder, options = str(model_dir), {"dtype": "float32", "device": "cpu"}
    plain = NudgedChatModel(model=folder, nudging_model=folder, **options)
    plain_engine = plain.get_engine()
    weights = plain_engine.pair.nudging.model
    templated = NudgedChatModel(
        model=folder, nudging_model=folder, nudging_chat_template=TEMPLATE, **options
    )
    engine = templated.get_engine()
    assert engine is not plain_engine
    assert engine.pair.nudging.model is weights
    assert templated.unload() is True
    assert [m.tokenizer.chat_template for m in loaded_models()] == [None]  # the plain one
    assert load_model(folder, progress=False, **options).model is weights
    assert not plain_engine.closed
    assert plain.unload() is True
    assert loaded_models() == []


def _keep_alive_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "nudging-keep-alive" and t.is_alive()]


@pytest.mark.timeout(60)
def test_keep_alive_unloads_an_idle_pair_with_one_bounded_timer(fresh_pair):
    base, nudging = fresh_pair
    llm = NudgedChatModel(model=base, nudging_model=nudging, max_tokens=4, keep_alive=0.3)
    llm.invoke("hi")
    engine = llm.get_engine()  # not a call: no timer of its own
    llm.invoke("hi again")  # a call cancels the pending timer and starts one as it ends
    assert unloading.IDLE.timers() == 1
    assert len(_keep_alive_threads()) == 1
    deadline = time.monotonic() + 10
    while not engine.closed and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.closed
    assert built_text_model(base) is None
    time.sleep(0.1)
    assert _keep_alive_threads() == []
    assert unloading.IDLE.timers() == 0


@pytest.mark.timeout(60)
def test_keep_alive_never_unloads_during_a_call(fresh_pair):
    base, nudging = fresh_pair
    llm = NudgedChatModel(model=base, nudging_model=nudging, max_tokens=4, keep_alive=0.0)
    engine = llm.get_engine()
    unloading.IDLE.begin(engine)  # a call in flight
    unloading.IDLE.begin(engine)  # and another one
    unloading.IDLE.end(engine, 0.0)  # the second ends: the first still runs
    time.sleep(0.2)
    assert not engine.closed
    unloading.IDLE.end(engine, 0.0)
    deadline = time.monotonic() + 10
    while not engine.closed and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.closed
    assert asyncio.run(llm.ainvoke("hi")).content is not None  # loads again
    llm.unload()


def test_unload_cancels_a_pending_keep_alive_timer(fresh_pair):
    base, nudging = fresh_pair
    llm = NudgedChatModel(model=base, nudging_model=nudging, max_tokens=4, keep_alive=600)
    llm.invoke("hi")
    assert len(_keep_alive_threads()) == 1
    llm.unload()
    time.sleep(0.1)
    assert _keep_alive_threads() == []


@pytest.mark.parametrize(
    ("given", "seconds"),
    [(5, 5.0), ("30s", 30.0), ("5m", 300.0), ("1h", 3600.0), ("250ms", 0.25), (-1, None),
     ("-1", None), (None, None)],
)  # fmt: skip
def test_keep_alive_durations(given, seconds):
    assert NudgedChatModel(keep_alive=given).keep_alive == seconds


def test_a_bad_keep_alive():
    with pytest.raises(ValidationError, match=r"(?s)keep_alive.*expected seconds or a duration"):
        NudgedChatModel(keep_alive="soon")


# -- serialization -------------------------------------------------------------------------------


def _load_back(text: str, **extra: Any) -> Any:
    return loads(
        text,
        valid_namespaces=["langchain_nudging"],
        allowed_objects=[NudgedChatModel],
        **extra,
    )


def test_dumps_and_loads_round_trip_every_kind_of_field(monkeypatch):
    monkeypatch.setattr(registry, "text_model", lambda *a, **k: pytest.fail("loaded"))
    llm = NudgedChatModel(
        model="org/base", nudging_model="org/chat", gamma=0.25, stop=["\n\n"],
        nudging_sampling=SamplingConfig(temperature=0.5, seed=3), dtype=torch.bfloat16,
        revision="v1", model_kwargs={"attn_implementation": "sdpa"},
        nudging_chat_template=TEMPLATE, keep_alive="5m", api_key="sk-secret",
    )  # fmt: skip
    text = dumps(llm)
    assert "sk-secret" not in text
    back = _load_back(text, secrets_map={"LANGCHAIN_NUDGING_API_KEY": "sk-secret"})
    assert isinstance(back, NudgedChatModel)
    for field in ("base_model", "nudging_model", "gamma", "stop", "nudging_sampling", "revision",
                  "model_kwargs", "nudging_chat_template", "keep_alive"):  # fmt: skip
        assert getattr(back, field) == getattr(llm, field), field
    assert back.dtype == "bfloat16"
    assert back.api_key.get_secret_value() == "sk-secret"
    assert back.asdict() == {**llm.asdict(), "dtype": "bfloat16"}


def test_a_loaded_model_object_gives_a_clear_not_serializable_record(fresh_pair):
    base, _ = fresh_pair
    llm = NudgedChatModel(model=base)
    record = dumpd(llm)  # tracing dumps every model: this must not raise
    assert record["type"] == "not_implemented"
    assert "base_model is a LoadedModel object" in record["repr"]
    with pytest.raises(NotImplementedError, match="base_model is a LoadedModel object"):
        load(record, valid_namespaces=["langchain_nudging"], allowed_objects=[NudgedChatModel])


def test_an_option_that_is_no_json_value_is_named():
    llm = NudgedChatModel(model_kwargs={"quantization_config": _Config(4)})
    record = dumpd(llm)
    assert record["type"] == "not_implemented"
    assert "model_kwargs holds a dict that is no JSON value" in record["repr"]


# -- errors and empty input ----------------------------------------------------------------------


def test_the_errors_are_exported():
    for name in ("IncompleteAnswerError", "GrammarError", "PromptTooLongError",
                 "ContextWindowError", "EngineBusyError", "ModelLoadError"):  # fmt: skip
        assert name in langchain_nudging.__all__
        assert issubclass(getattr(langchain_nudging, name), Exception)
    assert issubclass(langchain_nudging.PromptTooLongError, langchain_nudging.ContextWindowError)


@pytest.mark.parametrize(
    "given",
    ["", "   ", "\n\t", [HumanMessage("")], [HumanMessage([{"type": "text", "text": " "}])],
     [SystemMessage("Be brief."), HumanMessage(" \n")], [("human", "")]],
)  # fmt: skip
async def test_an_empty_human_message_is_refused_before_anything_loads(given, monkeypatch):
    monkeypatch.setattr(chat_module, "text_model", lambda *a, **k: pytest.fail("loaded"))
    llm = NudgedChatModel()
    with pytest.raises(ValueError, match=r"messages\[\d\]: the human message is empty"):
        llm.invoke(given)
    with pytest.raises(ValueError, match="the human message is empty"):
        await llm.ainvoke(given)
    with pytest.raises(ValueError, match="the human message is empty"):
        list(llm.stream(given))
    assert loaded_models() == []
