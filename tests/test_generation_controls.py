"""Repetition controls (docs/generation.md): validated per model, applied to the choice and
never to the raw softmax gamma is compared with, over the answer so far, with every cached
choice still valid; what each server backend passes on or refuses."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from fake_servers import FakeSGLang, FakeVLLM
from pydantic import ValidationError

from langchain_nudging import ChatMessage, NudgingConfig
from langchain_nudging.algorithm import NudgingRun
from langchain_nudging.backends.hf import TokenChooser
from langchain_nudging.backends.http import ServerClient
from langchain_nudging.backends.llamacpp import LlamaCppModel
from langchain_nudging.backends.local import LocalModel
from langchain_nudging.backends.penalties import FrequencyPresencePenalty
from langchain_nudging.backends.sglang import SGLangModel
from langchain_nudging.backends.vllm import VLLMModel
from langchain_nudging.config import SamplingConfig
from langchain_nudging.models import LoadedModel
from langchain_nudging.prompts import render_prompts
from langchain_nudging.reference import ReferenceModel, reference_nudge

PENALTIES = {
    "repetition_penalty": 1.3,
    "frequency_penalty": 0.5,
    "presence_penalty": 0.4,
    "no_repeat_ngram_size": 3,
}


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("repetition_penalty", 0.0),
        ("repetition_penalty", 11.0),
        ("frequency_penalty", 2.5),
        ("presence_penalty", -2.5),
        ("no_repeat_ngram_size", -1),
        ("no_repeat_ngram_size", 65),
        ("min_p", 1.5),
        ("min_p", -0.1),
    ],
)
def test_out_of_range_controls_are_refused_naming_the_field(name: str, value: Any) -> None:
    with pytest.raises(ValidationError, match=name):
        SamplingConfig(**{name: value})


def test_defaults_are_off_and_each_control_counts_as_penalized() -> None:
    assert not SamplingConfig().penalized
    assert not SamplingConfig(min_p=0.3).penalized  # min_p reads no context
    for name, value in PENALTIES.items():
        assert SamplingConfig(**{name: value}).penalized


def test_the_controls_are_chat_model_fields_and_per_call_options(
    llama_a: LoadedModel, gemma_b: LoadedModel
) -> None:
    from langchain_nudging import NudgedChatModel
    from langchain_nudging.chat.options import call_options

    chat = NudgedChatModel(model=llama_a, nudging_model=gemma_b, repetition_penalty=1.2)
    assert chat.repetition_penalty == 1.2
    assert NudgedChatModel.model_fields["min_p"].default == 0.0
    assert call_options({"frequency_penalty": 0.3}).frequency_penalty == 0.3  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="no_repeat_ngram_size"):
        call_options({"no_repeat_ngram_size": -2})


# -- the choice -------------------------------------------------------------------------------


def chooser(**sampling: Any) -> TokenChooser:
    return TokenChooser(SamplingConfig(**sampling), "cpu")


def test_a_penalty_changes_the_token_chosen_but_not_the_probability_gamma_reads() -> None:
    logits = torch.tensor([5.0, 4.9, 1.0, 0.0])
    raw = torch.softmax(logits, dim=-1)
    plain = chooser().choose(logits, None, [0])
    penalized = chooser(repetition_penalty=1.5).choose(logits, None, [0])
    assert plain[0] == 0
    assert penalized[0] == 1  # 5 / 1.5 < 4.9
    assert penalized[1:] == plain[1:] == pytest.approx((float(raw[0]), float(raw[1])))
    assert chooser(repetition_penalty=1.5).choose(logits, None, [])[0] == 0  # nothing repeated


def test_frequency_and_presence_follow_openai() -> None:
    scores = torch.zeros(1, 4)
    ids = torch.tensor([[1, 1, 2]])
    out = FrequencyPresencePenalty(0.5, 0.25)(ids, scores)  # type: ignore[arg-type]
    assert out.tolist() == [[0.0, -1.25, -0.75, 0.0]]
    logits = torch.tensor([3.0, 2.9, 2.0])
    assert chooser(frequency_penalty=0.2).choose(logits, None, [0])[0] == 1
    assert chooser(presence_penalty=0.05).choose(logits, None, [0])[0] == 0


def test_no_repeat_ngram_bans_an_ngram_already_in_the_answer() -> None:
    logits = torch.tensor([0.0, 1.0, 5.0, 4.0])
    # The answer ends with "1": "1 2" is already in it, so 2 is banned.
    assert chooser(no_repeat_ngram_size=2).choose(logits, None, [1, 2, 1])[0] == 3
    # The ban applies within what a grammar allows, and gives way where it would ban all.
    only_two = torch.tensor([False, False, True, False])
    assert chooser(no_repeat_ngram_size=2).choose(logits, only_two, [1, 2, 1])[0] == 2


def test_min_p_drops_unlikely_tokens_when_sampling() -> None:
    logits = torch.log(torch.tensor([0.5, 0.3, 0.1, 0.1]))
    seen = set()
    picker = chooser(temperature=1.0, seed=3, min_p=0.5)
    for _ in range(200):
        seen.add(picker.choose(logits)[0])
    assert seen == {0, 1}
    assert chooser(min_p=0.9).choose(logits)[0] == 0  # greedy: the argmax always survives


# -- the context, and the caches --------------------------------------------------------------


def test_the_prompt_is_not_the_penalties_context(llama_a: LoadedModel) -> None:
    """The first answer token is chosen as without penalties, though the prompt holds many
    tokens: the context is the answer so far."""
    model = LocalModel(llama_a)
    prompt = "The quick brown fox jumps over the lazy dog. The quick brown fox"
    plain = model.session(prompt, SamplingConfig()).peek("")
    penalized = model.session(prompt, SamplingConfig(repetition_penalty=5.0)).peek("")
    assert penalized == plain


def test_a_session_reusing_its_choices_chooses_as_fresh_sessions(llama_a: LoadedModel) -> None:
    """A choice is a function of the ids before it even under penalties, so a session that
    answers from its choice tree (a window after a peek, a prefix asked again) gives what a
    fresh session computes for each question."""
    model = LocalModel(llama_a)
    sampling = SamplingConfig(**PENALTIES)
    prompt = "Question: What is the capital of France?\nAnswer:"
    session = model.session(prompt, sampling)
    first = list(session.generate("", 12))
    text = "".join(t.text for t in first)
    cut = text[: len(text) // 2]
    questions = [cut, text, "", cut + " the the the", text]
    for answer in questions:
        again = session.peek(answer)
        fresh = model.session(prompt, sampling).peek(answer)
        assert (again.text, again.is_eos) == (fresh.text, fresh.is_eos), answer
        assert again.top1_prob == pytest.approx(fresh.top1_prob, abs=1e-5)
    window = list(session.generate(cut, 8))
    assert [t.text for t in window] == [
        t.text for t in model.session(prompt, sampling).generate(cut, 8)
    ]
    assert session.stats().choices_reused > 0
    plain = list(model.session(prompt, SamplingConfig()).generate("", 12))
    assert [t.text for t in plain] != [t.text for t in first]  # the penalties act here


@pytest.mark.parametrize("options", [PENALTIES, {"repetition_penalty": 1.5}])
def test_nudging_under_penalties_equals_the_uncached_reference(
    llama_a: LoadedModel, gemma_b: LoadedModel, options: dict[str, Any]
) -> None:
    """Every cached choice (boundaries verified together, windows after peeks, drafts) is
    the one the uncached reference computes from scratch with the same penalties."""
    base, nudging = LocalModel(llama_a), LocalModel(gemma_b)
    prompts = render_prompts([ChatMessage("user", "Tell me a story.")], nudging.chat_template)
    sampling = SamplingConfig(**options)
    config = NudgingConfig(
        gamma=0.4,
        max_tokens=40,
        draft_tokens=5,
        chunk_tokens=3,
        stop=prompts.stop,
        base_sampling=sampling,
        nudging_sampling=sampling,
    )
    run = NudgingRun(
        base.session(prompts.base, sampling), nudging.session(prompts.nudging, sampling), config
    )
    segments = list(run)
    refs = ReferenceModel(llama_a), ReferenceModel(gemma_b)
    oracle = reference_nudge(*refs, prompts.base, prompts.nudging, config)
    assert run.text == oracle.text
    assert (run.finish_reason, run.rounds) == (oracle.finish_reason, oracle.rounds)
    assert {s.source for s in segments} == {"base", "nudge"}
    plain = reference_nudge(
        *refs, prompts.base, prompts.nudging, config.model_copy(update=_unpenalized())
    )
    assert plain.text != run.text


def _unpenalized() -> dict[str, Any]:
    return {"base_sampling": SamplingConfig(), "nudging_sampling": SamplingConfig()}


def test_the_independent_oracle_refuses_penalties(llama_a: LoadedModel) -> None:
    from langchain_nudging.oracle import independent_nudge

    config = NudgingConfig(base_sampling=SamplingConfig(repetition_penalty=1.2))
    with pytest.raises(ValueError, match="repetition controls"):
        independent_nudge(llama_a, llama_a, "a", "b", config)


# -- servers ----------------------------------------------------------------------------------


def client(fake: Any, url: str) -> ServerClient:
    return ServerClient(url, transport=httpx.MockTransport(fake))


def test_vllm_passes_repetition_penalty_and_min_p_and_refuses_the_others(
    llama_a: LoadedModel, tmp_path: Path
) -> None:
    fake = FakeVLLM(llama_a, tmp_path)
    model = VLLMModel(client(fake, "http://vllm.test:8000"), {})
    sampling = SamplingConfig(repetition_penalty=1.2, min_p=0.1)
    body = model.body([1, 2], sampling, 1, None)
    assert (body["repetition_penalty"], body["min_p"]) == (1.2, 0.1)
    assert model.body([1, 2], SamplingConfig(), 1, None)["repetition_penalty"] == 1.0
    for name in ("frequency_penalty", "presence_penalty", "no_repeat_ngram_size"):
        with pytest.raises(ValueError, match=name):
            model.session("Hi", SamplingConfig(**{name: PENALTIES[name]}))
    session = model.session("Hi", sampling)
    fake.requests.clear()
    list(session.peek_each(["", " a", " a b"]))
    # Penalized boundaries are asked one prompt per call, each the server's own choice.
    prompts = [b["prompt"] for p, b in fake.requests if p.endswith("/completions")]
    assert prompts
    assert all(isinstance(p[0], int) for p in prompts)


def test_sglang_passes_repetition_penalty(llama_a: LoadedModel, tmp_path: Path) -> None:
    model = SGLangModel(client(FakeSGLang(llama_a, tmp_path), "http://sglang.test:30000"), {})
    body = model.body([1, 2], SamplingConfig(repetition_penalty=1.2, min_p=0.2), 1)
    params = body["sampling_params"]
    assert (params["repetition_penalty"], params["min_p"]) == (1.2, 0.2)
    with pytest.raises(ValueError, match="frequency_penalty"):
        model.session("Hi", SamplingConfig(frequency_penalty=0.3))


def test_llamacpp_passes_every_penalty_and_runs_them_first() -> None:
    sampling = SamplingConfig(
        repetition_penalty=1.1, frequency_penalty=0.3, presence_penalty=0.2, min_p=0.05
    )
    body = LlamaCppModel.body(None, [1], sampling, 1, 2, 0, True, False)  # type: ignore[arg-type]
    assert (body["repeat_penalty"], body["frequency_penalty"], body["presence_penalty"]) == (
        1.1,
        0.3,
        0.2,
    )
    assert body["min_p"] == 0.05
    assert body["samplers"] == ["penalties", "top_k", "top_p", "min_p", "temperature"]
    plain = LlamaCppModel.body(None, [1], SamplingConfig(), 1, 2, 0, True, False)  # type: ignore[arg-type]
    assert plain["samplers"] == ["top_k", "top_p", "temperature"]
    assert plain["repeat_penalty"] == 1.0


def test_a_per_call_penalty_reaches_both_models(llama_a: LoadedModel, gemma_b: LoadedModel) -> None:
    from langchain_nudging import NudgedChatModel, NudgingPair
    from langchain_nudging.backends.registry import text_model
    from langchain_nudging.request import Request

    chat = NudgedChatModel(model=llama_a, nudging_model=gemma_b, max_tokens=30)
    question = "Tell me a story."
    penalized = chat.invoke(question, repetition_penalty=1.5).content
    assert penalized != chat.invoke(question).content
    pair = NudgingPair(text_model(llama_a), text_model(gemma_b))
    sampling = SamplingConfig(repetition_penalty=1.5)
    config = NudgingConfig(max_tokens=30, base_sampling=sampling, nudging_sampling=sampling)
    generation = pair.generate(Request([ChatMessage("user", question)], config))
    assert "".join(s.text for s in generation) == penalized
