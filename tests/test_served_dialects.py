"""The SGLang dialect, and vLLM's connect checks, against stand-ins answering in the engines'
documented shapes over real tiny models (tests/fake_servers.py). SGLang does not run here:
these tests are its only check. vLLM also runs for real (integration_tests/test_vllm.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from fake_servers import FakeSGLang, FakeVLLM

from langchain_nudging import NudgingPair
from langchain_nudging.backends.base import ContextWindowError, Token
from langchain_nudging.backends.http import ServerClient, ServerError
from langchain_nudging.backends.registry import text_model
from langchain_nudging.backends.sglang import SGLangModel
from langchain_nudging.backends.vllm import VLLMModel
from langchain_nudging.config import NudgingConfig, SamplingConfig
from langchain_nudging.models import LoadedModel
from langchain_nudging.prompts import ChatMessage
from langchain_nudging.request import Request
from langchain_nudging.structured import OutputSpec

QUESTIONS = ["What is the capital of France?", "Write a short poem about the sea."]
CONFIG = NudgingConfig(max_tokens=40, gamma=0.4)


def client(fake: Any, url: str) -> ServerClient:
    return ServerClient(url, transport=httpx.MockTransport(fake))


def sglang(fake: FakeSGLang, url: str = "http://sglang.test:30000") -> SGLangModel:
    return SGLangModel(client(fake, url), {})


@pytest.fixture
def fakes(llama_a: LoadedModel, gemma_b: LoadedModel, tmp_path: Path) -> tuple[Any, Any]:
    return (FakeSGLang(llama_a, tmp_path / "a"), FakeSGLang(gemma_b, tmp_path / "b"))


def answer(pair: NudgingPair, question: str, **request: Any) -> Any:
    request.setdefault("config", CONFIG)
    generation = pair.generate(Request([ChatMessage("user", question)], **request))
    list(generation)
    return generation


def test_sglang_answers_as_the_same_models_in_this_process(
    fakes: tuple[FakeSGLang, FakeSGLang], llama_a: LoadedModel, gemma_b: LoadedModel
) -> None:
    served = NudgingPair(sglang(fakes[0]), sglang(fakes[1], "http://sglang.test:30001"))
    local = NudgingPair(text_model(llama_a), text_model(gemma_b))
    for question in QUESTIONS:
        mine, theirs = answer(served, question), answer(local, question)
        assert mine.text == theirs.text
        assert [(s.source, s.text) for s in mine.segments] == [
            (s.source, s.text) for s in theirs.segments
        ]
    assert {s.source for s in mine.segments} == {"base", "nudge"}


def test_sglang_verifies_a_draft_in_one_request_from_where_it_starts(
    fakes: tuple[FakeSGLang, FakeSGLang],
) -> None:
    model = sglang(fakes[0])
    session = model.session("Question: what is two plus two?\nAnswer:", SamplingConfig())
    answers = [" The", " The answer", " The answer is", " The answer is four"]
    fakes[0].requests.clear()
    tokens = list(session.peek_each(answers))
    generate = [body for path, body in fakes[0].requests if path == "/generate"]
    assert len(generate) == 1
    longest = model.text.encode("Question: what is two plus two?\nAnswer:", answers[-1])
    shortest = model.text.encode("Question: what is two plus two?\nAnswer:", answers[0])
    assert generate[0]["input_ids"] == longest
    assert generate[0]["logprob_start_len"] == len(shortest) - 1
    for text, token in zip(answers, tokens, strict=True):
        assert token == sglang(fakes[0]).session(
            "Question: what is two plus two?\nAnswer:", SamplingConfig()
        ).peek(text)


@pytest.mark.parametrize("incremental", [False, True])
def test_sglang_streams_in_either_streaming_mode(
    llama_a: LoadedModel, tmp_path: Path, incremental: bool
) -> None:
    fake = FakeSGLang(llama_a, tmp_path, incremental=incremental)
    model = sglang(fake)
    streamed = list(model.session("Once upon a time", SamplingConfig()).generate("", 12))
    ids = model.text.encode("Once upon a time")
    detokenizer = model.text.detokenizer(ids)
    one_by_one = []
    while len(one_by_one) < len(streamed):
        [(token_id, top1, top2)], _ = model.choose([ids], SamplingConfig())
        ends = token_id in model.text.stop_ids
        one_by_one.append(Token(detokenizer.add(token_id), top1, top2, ends))
        ids.append(token_id)
    assert streamed == one_by_one
    assert sum(1 for path, b in fake.requests if path == "/generate" and b["stream"]) == 1


def test_a_window_closed_early_aborts_its_request(
    fakes: tuple[FakeSGLang, FakeSGLang],
) -> None:
    session = sglang(fakes[0]).session("Once upon a time", SamplingConfig())
    window = session.generate("", 30)
    next(window)
    window.close()  # type: ignore[attr-defined]
    streamed = [b for path, b in fakes[0].requests if path == "/generate" and b["stream"]]
    assert fakes[0].aborted == [streamed[0]["rid"]]


def test_sglang_constrained_answers_fit_their_schema(
    fakes: tuple[FakeSGLang, FakeSGLang],
) -> None:
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 12}},
        "required": ["city"],
        "additionalProperties": False,
    }
    pair = NudgingPair(sglang(fakes[0]), sglang(fakes[1], "http://sglang.test:30001"))
    generation = answer(pair, "Name a city as JSON.", output=OutputSpec(schema=schema))
    value = json.loads(generation.text)
    assert set(value) == {"city"}
    assert isinstance(value["city"], str)
    biased = [b for _, b in fakes[0].requests + fakes[1].requests if b and "sampling_params" in b]
    assert any("logit_bias" in b["sampling_params"] for b in biased)


def test_sampling_needs_raw_logprobs(llama_a: LoadedModel, tmp_path: Path) -> None:
    scaled = sglang(FakeSGLang(llama_a, tmp_path / "s", raw_when_sampling=False))
    assert not scaled.raw_when_sampling
    scaled.session("Hi", SamplingConfig())  # greedy stays served
    with pytest.raises(ValueError, match="SGLANG_RETURN_ORIGINAL_LOGPROB"):
        scaled.session("Hi", SamplingConfig(temperature=0.7, seed=1))
    raw = sglang(FakeSGLang(llama_a, tmp_path / "r"))
    first = list(raw.session("Hi", SamplingConfig(temperature=0.7, seed=1)).generate("", 8))
    again = list(raw.session("Hi", SamplingConfig(temperature=0.7, seed=1)).generate("", 8))
    assert first == again  # one seed per position


def test_sglang_errors_are_clear(fakes: tuple[FakeSGLang, FakeSGLang]) -> None:
    model = sglang(fakes[0])
    with pytest.raises(ContextWindowError):
        model.choose([[5] * 3000], SamplingConfig())
    with pytest.raises(ValueError, match="unknown server parameters"):
        SGLangModel(client(fakes[0], "http://sglang.test:30000"), {"modle": "x"})


def test_a_tokenizer_that_is_not_the_servers_is_refused(
    llama_a: LoadedModel, gemma_b: LoadedModel, tmp_path: Path
) -> None:
    fake = FakeSGLang(llama_a, tmp_path / "a")
    FakeSGLang(gemma_b, tmp_path / "b")  # saves b's tokenizer
    with pytest.raises(ServerError, match="does not tokenize as the server does"):
        SGLangModel(client(fake, "http://sglang.test:1"), {"tokenizer": str(tmp_path / "b")})


def test_sglang_and_vllm_are_recognized_without_a_prefix(
    fakes: tuple[FakeSGLang, FakeSGLang], llama_a: LoadedModel, tmp_path: Path
) -> None:
    from langchain_nudging.backends import http

    for fake, kind in ((fakes[0], SGLangModel), (FakeVLLM(llama_a, tmp_path / "v"), VLLMModel)):
        probe = client(fake, "http://any.test:1")
        dialect = next(d for d in http._DIALECTS.values() if d.recognizes(probe))
        assert isinstance(dialect.build(probe, {}), kind)


def test_vllm_refuses_processed_logprobs(llama_a: LoadedModel, tmp_path: Path) -> None:
    fake = FakeVLLM(llama_a, tmp_path, raw=False)
    with pytest.raises(ServerError, match="--logprobs-mode raw_logprobs"):
        VLLMModel(client(fake, "http://vllm.test:8000"), {})


def test_vllm_refuses_a_server_without_two_logprobs(llama_a: LoadedModel, tmp_path: Path) -> None:
    fake = FakeVLLM(llama_a, tmp_path, max_logprobs=1)
    with pytest.raises(ServerError, match="--max-logprobs"):
        VLLMModel(client(fake, "http://vllm.test:8000"), {})


def test_vllm_model_parameter_names_a_served_model(llama_a: LoadedModel, tmp_path: Path) -> None:
    fake = FakeVLLM(llama_a, tmp_path)
    with pytest.raises(ServerError, match="not 'other'"):
        VLLMModel(client(fake, "http://vllm.test:8000"), {"model": "other"})
    model = VLLMModel(client(fake, "http://vllm.test:8000"), {"model": llama_a.name})
    assert model.served_name == llama_a.name
