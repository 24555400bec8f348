"""The cached session (backends/cached.py, backends/local.py) against the uncached oracle
(reference.py).

Tiny random-weight models from conftest.py; greedy fp32 unless a test says otherwise.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import re
import warnings
import weakref
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from langchain_nudging.algorithm import NudgingRun
from langchain_nudging.backends.base import Prompt, SessionStats, TextSession, Token, Work
from langchain_nudging.backends.hf import PromptTooLongError, TokenizerText
from langchain_nudging.backends.local import (
    LocalModel,
    LocalSession,
    Step,
    forward_together,
    width_class,
)
from langchain_nudging.config import NudgingConfig, SamplingConfig
from langchain_nudging.prompts import ChatMessage, render_prompts
from langchain_nudging.reference import ReferenceModel, reference_nudge

GREEDY = SamplingConfig()
PROMPT = "You are a helpful assistant.\nQuestion: What is the capital of France?\nAnswer:"
TOL = 1e-5
LONG_TEXT = (
    "The quick brown fox jumps over the lazy dog. First, we add two and three to get five. "
    "Café, naïve, über, Zürich: 日本語 and Привет. Let me think step by step; the answer is 42."
)


def assert_same(got: list[Token] | Token, want: list[Token] | Token) -> None:
    got_list = got if isinstance(got, list) else [got]
    want_list = want if isinstance(want, list) else [want]
    assert [(t.text, t.is_eos) for t in got_list] == [(t.text, t.is_eos) for t in want_list]
    for g, w in zip(got_list, want_list, strict=True):
        assert g.top1_prob == pytest.approx(w.top1_prob, abs=TOL)
        assert g.top2_prob == pytest.approx(w.top2_prob, abs=TOL)


@contextlib.contextmanager
def recorded_inputs(model: Any) -> Iterator[list[list[int]]]:
    """The ``input_ids`` of every forward pass of ``model`` while the block runs."""
    calls: list[list[int]] = []

    def record(_module: Any, args: tuple, kwargs: dict) -> None:
        ids = kwargs.get("input_ids")
        calls.append((ids if ids is not None else args[0])[0].tolist())

    handle = model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        yield calls
    finally:
        handle.remove()


def joined(tokens: list[Token]) -> str:
    return "".join(t.text for t in tokens)


def window(session: Any, answer: str, size: int, **options: Any) -> list[Token]:
    """A whole window of ``session.generate`` (tokens come one by one)."""
    return list(session.generate(answer, size, **options))


# --- cached == uncached ------------------------------------------------------------------------


@pytest.mark.parametrize("loaded_name", ["llama_a", "gemma_b"])
def test_session_matches_uncached_through_appends_rewrites_and_crops(
    loaded_name: str, request: pytest.FixtureRequest
) -> None:
    loaded = request.getfixturevalue(loaded_name)
    local_model, ref_model = LocalModel(loaded), ReferenceModel(loaded)
    prompt = LONG_TEXT + "\n" + PROMPT
    local = local_model.session(prompt, GREEDY)
    ref = ref_model.session(prompt, GREEDY)

    # Appends whose re-tokenization rewrites ids already in the cache (" cap" + "ital" ->
    # " capital", "f" + "é" -> "fé"): the session must drop those ids, not just append.
    text = TokenizerText(loaded.tokenizer)
    appends = [(" The cap", " The capital"), (" caf", " café"), (" the sk", " the sky")]
    for short, long in appends:
        before, after = text.encode(prompt + short), text.encode(prompt + long)
        assert after[: len(before)] != before, (short, long)

    first = window(local, "", 12)
    assert_same(first, window(ref, "", 12))
    steps: list[tuple[str, str, int]] = [
        ("peek", "", 0),
        ("generate", joined(first), 8),  # continue where the last window ended
        ("peek", " The cap", 0),  # crop back to the prompt, append
        ("peek", " The capital", 0),
        ("peek", " The capital of France is caf", 0),
        ("peek", " The capital of France is café", 0),
        ("generate", " The capital of France is café", 10),
        ("peek", " The cap", 0),  # crop into the middle
        ("generate", " The cap and the sk", 6),  # rewrite
        ("peek", " The cap and the sky", 0),
        ("peek", "", 0),  # crop to the prompt
        ("generate", " Zürich 🙂 €5", 6),  # byte-split characters
        ("peek", " Zürich 🙂 €5" + "!" * 20, 0),
    ]
    for kind, answer, n in steps:
        if kind == "peek":
            assert_same(local.peek(answer), ref.peek(answer))
        else:
            assert_same(window(local, answer, n), window(ref, answer, n))

    # The cache is reused: the oracle re-reads the whole prompt on every question.
    assert local.stats().tokens_processed * 4 < ref.stats().tokens_processed
    local.close()
    assert local_model.live_sessions == 0


def test_sliding_window_model_crops_past_the_window(gemma_b: Any) -> None:
    config = gemma_b.model.config
    assert "sliding_attention" in config.layer_types
    assert config.sliding_window < 600
    prompt = "Question: Summarize the following text.\nAnswer:"
    long = " " + " ".join([LONG_TEXT] * 12)
    text = TokenizerText(gemma_b.tokenizer)
    total = len(text.encode(prompt + long))
    assert total >= 700

    def cut_at(n_tokens: int) -> str:
        """The answer prefix that ends at a word boundary near ``n_tokens`` prompt+answer ids."""
        chars = len(long) * n_tokens // total
        return long[: long.rindex(" ", 0, chars)]

    at_650, at_610 = cut_at(650), cut_at(610)
    assert 600 < len(text.encode(prompt + at_610)) < len(text.encode(prompt + at_650)) < total

    local = LocalModel(gemma_b).session(prompt, GREEDY)
    ref = ReferenceModel(gemma_b).session(prompt, GREEDY)
    assert_same(local.peek(long), ref.peek(long))  # every layer has seen > 600 positions
    assert_same(local.peek(at_650), ref.peek(at_650))  # crop past the window
    assert_same(window(local, at_650 + " and", 16), window(ref, at_650 + " and", 16))
    assert_same(local.peek(at_610), ref.peek(at_610))
    assert_same(window(local, long, 8), window(ref, long, 8))
    local.close()


# --- generate's contract -----------------------------------------------------------------------


def test_min_prob_returns_the_unsure_token_last_and_stops(llama_a: Any) -> None:
    model = LocalModel(llama_a)
    answer = " The capital"
    free = window(model.session(PROMPT, GREEDY), answer, 24)
    assert len(free) == 24, "the free run must not end early for this check"
    probs = [t.top1_prob for t in free]
    # The first position k >= 2 whose probability is below every earlier one.
    k = next(i for i in range(2, len(probs)) if probs[i] < min(probs[:i]))
    threshold = (probs[k] + min(probs[:k])) / 2

    stopped = window(model.session(PROMPT, GREEDY), answer, 24, min_prob=threshold)
    assert_same(stopped, free[: k + 1])
    assert stopped[-1].top1_prob < threshold
    assert all(t.top1_prob >= threshold for t in stopped[:-1])
    oracle = ReferenceModel(llama_a).session(PROMPT, GREEDY)
    assert_same(stopped, window(oracle, answer, 24, min_prob=threshold))

    # Without `first`, an unsure first token is returned alone.
    assert free[0].top1_prob < 1.0
    assert len(window(model.session(PROMPT, GREEDY), answer, 24, min_prob=1.0)) == 1


def test_first_must_be_the_peek_of_the_same_answer(llama_a: Any) -> None:
    session = LocalModel(llama_a).session(PROMPT, GREEDY)
    oracle = ReferenceModel(llama_a).session(PROMPT, GREEDY)
    answer = " The capital"
    peeked = session.peek(answer)
    assert_same(peeked, oracle.peek(answer))

    with pytest.raises(ValueError, match="peek"):
        session.generate(answer + " of", 4, first=peeked)  # a different answer than the peek
    with pytest.raises(ValueError, match="peek"):
        LocalModel(llama_a).session(PROMPT, GREEDY).generate(answer, 4, first=peeked)  # no peek

    session.peek(answer)
    # min_prob=1.0 stops at any token, but never at `first`: it was already decided.
    tokens = window(session, answer, 8, min_prob=1.0, first=peeked)
    assert len(tokens) == 2
    assert tokens[0] == peeked
    assert_same(tokens, window(oracle, answer, 8, min_prob=1.0, first=peeked))


def test_first_is_accepted_after_a_memoised_peek(llama_a: Any) -> None:
    session = LocalModel(llama_a).session(PROMPT, GREEDY)
    oracle = ReferenceModel(llama_a).session(PROMPT, GREEDY)
    answer = " The capital"
    session.peek(answer)
    window(session, answer, 4)  # the cache now runs past `answer`
    peeked = session.peek(answer)  # the same answer: served from the memo
    tokens = window(session, answer, 4, first=peeked)
    assert_same(tokens, window(oracle, answer, 4, first=peeked))


# --- verifying a draft's word boundaries ---------------------------------------------------------


@pytest.mark.parametrize("loaded_name", ["llama_a", "gemma_b"])
def test_every_boundary_of_a_draft_is_verified_in_one_forward_pass(
    loaded_name: str, request: pytest.FixtureRequest
) -> None:
    loaded = request.getfixturevalue(loaded_name)
    session = LocalModel(loaded).session(PROMPT, GREEDY)
    oracle = ReferenceModel(loaded).session(PROMPT, GREEDY)
    session.peek(" Paris")  # the cache holds the prompt and an earlier answer
    draft = " Paris is the capital and largest city of France"
    words = draft.split(" ")
    answers = [" ".join(words[:i]) for i in range(2, len(words))]
    text = TokenizerText(loaded.tokenizer)
    longest = text.encode(PROMPT + answers[-1])
    for answer in answers:  # every boundary keeps its ids inside the longest answer's
        ids = text.encode(PROMPT + answer)
        assert longest[: len(ids)] == ids

    with recorded_inputs(loaded.model) as calls:
        tokens = list(session.peek_each(answers))
    assert len(calls) == 1  # one pass over the new words, whatever the number of boundaries
    assert len(calls[0]) < len(longest) // 2  # " Paris" was not read again
    assert len(tokens) == len(answers)
    for answer, token in zip(answers, tokens, strict=True):
        assert_same(token, oracle.peek(answer))

    # Everything verified is remembered: taking over at a middle boundary runs no new pass
    # for its first token, and the window continues exactly as the oracle's.
    middle = answers[2]
    reused = session.stats().choices_reused
    with recorded_inputs(loaded.model) as calls:
        again = list(session.peek_each([middle]))
    assert calls == []
    assert session.stats().choices_reused == reused + 1
    taken = window(session, middle, 6, first=again[0])
    assert_same(taken, window(oracle, middle, 6, first=again[0]))


@pytest.mark.parametrize("loaded_name", ["llama_a", "gemma_b"])
def test_a_draft_still_valid_next_round_is_reused_not_regenerated(
    loaded_name: str, request: pytest.FixtureRequest
) -> None:
    loaded = request.getfixturevalue(loaded_name)
    session = LocalModel(loaded).session(PROMPT, GREEDY)
    oracle = ReferenceModel(loaded).session(PROMPT, GREEDY)
    with recorded_inputs(loaded.model) as first_calls:
        draft = window(session, "", 16)
    assert len(draft) == 16
    assert not draft[-1].is_eos
    read = [i for call in first_calls for i in call]  # the prompt, then the draft's ids
    text = TokenizerText(loaded.tokenizer)
    prompt_length = len(text.encode(PROMPT))
    # The next round starts after some of the draft (its words were accepted, or the base
    # model wrote the same text): the longest such start whose text re-tokenizes to the ids
    # the draft was written with.
    cut = next(
        k
        for k in range(10, 0, -1)
        if text.encode(PROMPT + joined(draft[:k])) == read[: prompt_length + k]
    )
    rest = 16 - cut
    with recorded_inputs(loaded.model) as calls:
        again = window(session, joined(draft[:cut]), rest)
    assert calls == []  # every token was chosen by the first draft
    assert session.stats().choices_reused >= rest
    assert_same(again, draft[cut:])
    assert_same(again, window(oracle, joined(draft[:cut]), rest))


def test_a_boundary_that_tokenizes_differently_is_asked_on_its_own(llama_a: Any) -> None:
    session = LocalModel(llama_a).session(PROMPT, GREEDY)
    oracle = ReferenceModel(llama_a).session(PROMPT, GREEDY)
    answers = [" The cap", " The capital of", " The capital of France"]  # cap+ital merge
    text = TokenizerText(llama_a.tokenizer)
    longest = text.encode(PROMPT + answers[-1])
    assert longest[: len(text.encode(PROMPT + answers[0]))] != text.encode(PROMPT + answers[0])

    want = [oracle.peek(answer) for answer in answers]
    with recorded_inputs(llama_a.model) as calls:
        tokens = session.peek_each(answers)
        assert_same(next(tokens), want[0])
        assert len(calls) == 2  # the batch for the two that agree, then " The cap" alone
        assert_same(list(tokens), want[1:])
    assert len(calls) == 2  # the batch's answers outlive the detour through " The cap"


@pytest.mark.parametrize(
    ("loaded_name", "special"),
    [
        ("llama_a", "<|end_of_text|>"),
        ("llama_a", "<|pad|>"),
        ("gemma_b", "</s>"),
        ("gemma_b", "<|im_end|>"),
        ("gemma_b", "<|im_start|>"),
    ],
)
def test_a_special_token_ends_generation(
    loaded_name: str, special: str, request: pytest.FixtureRequest, forced_next: Any
) -> None:
    loaded = request.getfixturevalue(loaded_name)
    tokenizer = loaded.tokenizer
    last = TokenizerText(tokenizer).encode(PROMPT)[-1]
    word = tokenizer.convert_tokens_to_ids("Ġthe" if loaded_name == "llama_a" else "▁the")
    special_id = tokenizer.convert_tokens_to_ids(special)
    with forced_next(loaded, {last: word, word: special_id}):
        tokens = window(LocalModel(loaded).session(PROMPT, GREEDY), "", 10)
        assert [(t.text, t.is_eos) for t in tokens] == [(" the", False), ("", True)]
        assert tokens[1].top1_prob > 0.99
        assert_same(tokens, window(ReferenceModel(loaded).session(PROMPT, GREEDY), "", 10))
        peeked = LocalModel(loaded).session(PROMPT, GREEDY).peek(" the")
        assert (peeked.text, peeked.is_eos) == ("", True)


def _byte_token(tokenizer: Any, byte: int, byte_level: bool) -> int:
    if not byte_level:
        return tokenizer.convert_tokens_to_ids(f"<0x{byte:02X}>")
    # GPT-2's byte -> printable character table.
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    shifted = {b: chr(b) for b in printable}
    extra = (b for b in range(256) if b not in shifted)
    shifted.update({b: chr(256 + i) for i, b in enumerate(extra)})
    return tokenizer.convert_tokens_to_ids(shifted[byte])


@pytest.mark.parametrize("loaded_name", ["llama_a", "gemma_b"])
def test_a_split_character_arrives_with_its_last_byte(
    loaded_name: str, request: pytest.FixtureRequest, forced_next: Any
) -> None:
    loaded = request.getfixturevalue(loaded_name)
    tokenizer = loaded.tokenizer
    ids = [_byte_token(tokenizer, b, loaded_name == "llama_a") for b in "€".encode()]
    assert len(set(ids)) == 3
    assert tokenizer.unk_token_id not in ids
    script = dict(zip([TokenizerText(tokenizer).encode(PROMPT)[-1], *ids], ids, strict=False))
    script[ids[-1]] = tokenizer.eos_token_id
    with forced_next(loaded, script):
        tokens = window(LocalModel(loaded).session(PROMPT, GREEDY), "", 10)
        assert [t.text for t in tokens] == ["", "", "€", ""]
        assert [t.is_eos for t in tokens] == [False, False, False, True]
        assert_same(tokens, window(ReferenceModel(loaded).session(PROMPT, GREEDY), "", 10))


@pytest.mark.parametrize("loaded_name", ["llama_a", "gemma_b"])
def test_no_double_bos_when_the_prompt_starts_with_it(
    loaded_name: str, request: pytest.FixtureRequest
) -> None:
    loaded = request.getfixturevalue(loaded_name)
    bos, bos_id = loaded.tokenizer.bos_token, loaded.tokenizer.bos_token_id
    model = LocalModel(loaded)
    with recorded_inputs(loaded.model) as calls:
        with_bos = model.session(Prompt(bos + PROMPT, [(0, len(bos))]), GREEDY).peek("")
        plain = model.session(PROMPT, GREEDY).peek("")
        model.session(bos + PROMPT, GREEDY).peek("")
    assert len(calls) == 3
    for ids in calls[:2]:
        assert ids[0] == bos_id
        assert ids.count(bos_id) == 1
    # The BOS string in plain text is text: the tokenizer's own BOS, then the string's pieces.
    assert calls[2][0] == bos_id
    assert calls[2].count(bos_id) == 1
    assert len(calls[2]) > len(calls[1])
    if loaded_name == "llama_a":  # byte-level BPE: the text after the BOS tokenizes the same
        assert calls[0] == calls[1]
        assert_same(with_bos, plain)


def test_prompt_too_long_is_refused_when_the_session_opens(llama_a: Any) -> None:
    small = dataclasses.replace(llama_a, context_window=24)
    model = LocalModel(small)
    long_prompt = PROMPT * 3
    with pytest.raises(PromptTooLongError, match=small.name):
        model.session(long_prompt, GREEDY)
    assert model.live_sessions == 0
    with pytest.raises(PromptTooLongError):
        ReferenceModel(small).session(long_prompt, GREEDY)

    session = model.session("Question: hi\nAnswer:", GREEDY)
    session.peek(" ok")
    with pytest.raises(PromptTooLongError):
        session.peek(" and then" * 10)  # prompt + answer no longer fits
    session.close()
    assert model.live_sessions == 0


# --- sampling ------------------------------------------------------------------------------------


def test_sampling_is_seeded_and_confidence_is_the_raw_softmax(llama_a: Any) -> None:
    model = LocalModel(llama_a)
    hot = SamplingConfig(temperature=1.5, seed=7)
    with recorded_inputs(llama_a.model) as calls:
        tokens = window(model.session(PROMPT, hot), "", 16)
    assert len(tokens) == 16
    again = window(model.session(PROMPT, hot), "", 16)
    assert [(t.text, t.top1_prob) for t in again] == [(t.text, t.top1_prob) for t in tokens]
    other = window(model.session(PROMPT, SamplingConfig(temperature=1.5, seed=8)), "", 16)
    assert [t.text for t in other] != [t.text for t in tokens]

    # The forward passes show which ids were sampled; one uncached pass over them gives the
    # raw distributions the reported probabilities must come from.
    prompt_ids = calls[0]
    sampled = [ids[0] for ids in calls[1:]]
    with torch.inference_mode():
        logits = llama_a.model(input_ids=torch.tensor([prompt_ids + sampled])).logits[0]
    raw = torch.softmax(logits[len(prompt_ids) - 1 :], dim=-1)
    top = torch.topk(raw, 2, dim=-1)
    for k, token in enumerate(tokens):
        assert token.top1_prob == pytest.approx(top.values[k, 0].item(), abs=TOL)
        assert token.top2_prob == pytest.approx(top.values[k, 1].item(), abs=TOL)
    assert any(s != int(i) for s, i in zip(sampled, top.indices[:, 0], strict=False)), (
        "temperature 1.5 should pick a non-argmax token somewhere"
    )

    greedy = model.session(PROMPT, GREEDY).peek(" The")
    for sampling in (
        SamplingConfig(temperature=0.2, seed=1),
        SamplingConfig(temperature=5.0, seed=1),
        SamplingConfig(temperature=0.7, top_p=0.5, top_k=3, seed=1),
    ):
        peeked = model.session(PROMPT, sampling).peek(" The")
        assert peeked.top1_prob == pytest.approx(greedy.top1_prob, abs=TOL)
        assert peeked.top2_prob == pytest.approx(greedy.top2_prob, abs=TOL)


def test_the_session_uses_no_deprecated_model_argument(llama_a: Any) -> None:
    session = LocalModel(llama_a).session(PROMPT, GREEDY)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        window(session, " The", 3)


# --- sessions stepping together -----------------------------------------------------------------


@pytest.mark.parametrize("loaded_name", ["llama_a", "gemma_b"])
def test_sessions_stepping_together_get_the_logits_they_get_alone(
    loaded_name: str, gemma_window: int, request: pytest.FixtureRequest
) -> None:
    """Ragged prompts, one-token steps past Gemma's sliding window, a crop and a wide re-read
    in the middle: batched rows equal each session's rows alone; a batch of the same sessions
    stepping again reuses its cache, and stacks anew after a crop or mixed widths."""
    model = LocalModel(request.getfixturevalue(loaded_name))
    prompts = [PROMPT, "Hi", PROMPT + " Paris, I think."]
    together = [model.session(p, GREEDY) for p in prompts]
    alone = [model.session(p, GREEDY) for p in prompts]

    def step(new_ids: list[list[int]]) -> None:
        rows = forward_together(
            model,
            [Step(s.kv, ids, [len(ids) - 1]) for s, ids in zip(together, new_ids, strict=True)],
        )
        for session, ids, row in zip(alone, new_ids, rows, strict=True):
            (want,) = forward_together(model, [Step(session.kv, ids, [len(ids) - 1])])
            torch.testing.assert_close(row, want, atol=1e-4, rtol=0)

    def crop(sessions: list[LocalSession], tokens: int) -> None:
        for session in sessions:
            assert session.kv.cache is not None
            session.kv.cache.crop(-tokens)
            del session.kv.ids[-tokens:]

    step([model.text.encode(p) for p in prompts])
    assert model.last_batch is None  # mixed widths: rows hold padding between their tokens
    reused: list[bool] = []
    for k in range(gemma_window + 16):
        if k == 50:
            crop([together[2], alone[2]], 1)  # this step re-reads one id: all widths still 1
        before = model.last_batch
        step([[3 + (k * 7 + b) % 40] for b in range(len(prompts))])
        reused.append(before is not None and model.last_batch.cache is before.cache)
        if k == 30:
            crop([together[1], alone[1]], 3)
            step([[5], [6, 7, 8], [9]])  # a re-read of three ids beside one-token steps
            assert model.last_batch is None
    # Stacked: the first step, the one after the re-read, the one after the second crop.
    assert [k for k, r in enumerate(reused) if not r] == [0, 31, 50]
    assert all(len(s.kv.ids) > gemma_window for s in together)
    batch_cache = weakref.ref(model.last_batch.cache)
    del before
    together[0].close()
    assert model.last_batch is None  # a closed session's rows are not kept alive
    gc.collect()
    assert batch_cache() is None


# --- the model as a TextModel and a WorkRunner ---------------------------------------------------


class Recording:
    """A scheduler that runs each work at once, alone (as ``RUN_ALONE``), and keeps it."""

    def __init__(self) -> None:
        self.works: list[Work] = []

    def run(self, work: Work) -> Any:
        self.works.append(work)
        with work.runner.lock():
            return work.runner.run_together([work])[0]


def test_every_forward_pass_goes_through_the_sessions_scheduler(llama_a: Any) -> None:
    model = LocalModel(llama_a)
    scheduler = Recording()
    session = model.session(PROMPT, GREEDY, scheduler=scheduler)
    with recorded_inputs(llama_a.model) as calls:
        tokens = window(session, " The", 4)
        list(session.peek_each([" The capital of France", " The capital of France is"]))
    assert len(scheduler.works) == len(calls) == session.stats().forward_passes
    widths = [len(ids) for ids in calls]
    assert [w.runner for w in scheduler.works] == [model] * len(calls)
    assert [w.first for w in scheduler.works] == [True] + [False] * (len(calls) - 1)
    assert [w.group for w in scheduler.works] == [width_class(n) for n in widths]
    assert widths[0] > 16  # the prompt: a width class of its own
    assert widths[1:4] == [1, 1, 1]  # the window's steps
    assert_same(tokens, window(model.session(PROMPT, GREEDY), " The", 4))


def test_width_classes() -> None:
    widths = [1, 2, 16, 17, 64, 65, 256, 257, 1024, 1025]
    assert [width_class(n) for n in widths] == [0, 1, 1, 2, 2, 3, 3, 4, 4, 5]


def test_models_sharing_weights_share_one_forward_lock(llama_a: Any, gemma_b: Any) -> None:
    assert LocalModel(llama_a).lock() is LocalModel(llama_a).lock()
    assert LocalModel(llama_a).lock() is not LocalModel(gemma_b).lock()
    assert LocalModel(llama_a).batchable


def test_tokens_come_out_as_they_are_decided(llama_a: Any) -> None:
    """Reading a window's first token runs only the passes it needs; a window left early is
    continued later from what was chosen, running no pass twice."""
    session = LocalModel(llama_a).session(PROMPT, GREEDY)
    oracle = ReferenceModel(llama_a).session(PROMPT, GREEDY)
    whole = window(oracle, "", 8)
    tokens = session.generate("", 8)
    with recorded_inputs(llama_a.model) as calls:
        first = next(tokens)
        assert len(calls) == 1  # the prompt's pass, nothing more
        second = next(tokens)
        assert len(calls) == 2
    tokens.close()
    assert_same([first, second], whole[:2])
    with recorded_inputs(llama_a.model) as calls:
        again = window(session, "", 8)
    assert len(calls) == 8 - 2  # the first two tokens were chosen already
    assert_same(again, whole)


def test_session_stats(llama_a: Any) -> None:
    session = LocalModel(llama_a).session(PROMPT, GREEDY)
    assert session.stats() == SessionStats()
    with recorded_inputs(llama_a.model) as calls:
        window(session, "", 5)
        window(session, "", 5)  # every choice remembered
    stats = session.stats()
    assert stats.forward_passes == len(calls) == 5
    assert stats.tokens_processed == sum(len(ids) for ids in calls)
    assert stats.choices_reused == 5
    assert stats.grammar_masks == 0
    session.close()
    assert session.stats() == stats


def test_the_local_model_answers_token_questions_without_a_session(
    llama_a: Any, gemma_b: Any
) -> None:
    model = LocalModel(llama_a)
    assert model.capabilities.grammars
    assert model.capabilities.grammar_mass
    assert not model.capabilities.batches_itself
    assert model.chat_template is None  # tokenizer A has no chat template
    assert LocalModel(gemma_b).chat_template is not None
    text = TokenizerText(llama_a.tokenizer)
    assert model.prompt_tokens(PROMPT) == len(text.encode(PROMPT))
    assert model.token_ids(LONG_TEXT) == text.encode_plain(LONG_TEXT)
    assert model.counter().count(LONG_TEXT) == len(text.encode_plain(LONG_TEXT))
    assert model.truncate_tokens(LONG_TEXT, 5) == text.truncate(LONG_TEXT, 5)
    small = LocalModel(dataclasses.replace(llama_a, context_window=24))
    with pytest.raises(PromptTooLongError, match=llama_a.name):
        small.prompt_tokens(PROMPT * 3)
    session: TextSession = model.session(PROMPT, GREEDY)  # a TextSession, as typed
    assert model.live_sessions == 1
    session.close()
    assert model.live_sessions == 0


# --- closing -------------------------------------------------------------------------------------


def test_close_frees_the_cache_and_the_session(llama_a: Any) -> None:
    model = LocalModel(llama_a)
    first, second = model.session(PROMPT, GREEDY), model.session(PROMPT, GREEDY)
    assert model.live_sessions == 2
    window(first, " The", 4)
    cache = weakref.ref(first.kv.cache)
    first.close()
    gc.collect()
    assert cache() is None
    assert model.live_sessions == 1
    first.close()  # idempotent
    assert model.live_sessions == 1
    with pytest.raises(RuntimeError, match="closed"):
        first.peek(" The capital")
    with pytest.raises(RuntimeError, match="closed"):
        first.generate(" The", 4)
    second.close()
    assert model.live_sessions == 0


def test_a_closed_session_refuses_a_repeated_peek(llama_a: Any) -> None:
    session = LocalModel(llama_a).session(PROMPT, GREEDY)
    session.peek(" The")
    session.close()
    with pytest.raises(RuntimeError, match="closed"):
        session.peek(" The")


# --- nudging over cached sessions == the oracle ---------------------------------------------------

QUESTIONS = ["What is the capital of France?", "Why is the sky blue?", "Tell me a story."]


@pytest.mark.parametrize("windows", ["default", "short"])
@pytest.mark.parametrize("pair", ["cross-tokenizer", "same-tokenizer"])
@pytest.mark.parametrize("question", QUESTIONS)
def test_nudging_over_cached_sessions_equals_the_oracle(
    windows: str, pair: str, question: str, request: pytest.FixtureRequest
) -> None:
    base = request.getfixturevalue("llama_a" if pair == "cross-tokenizer" else "llama_b")
    nudging = request.getfixturevalue("gemma_b")
    base_model, nudging_model = LocalModel(base), LocalModel(nudging)
    prompts = render_prompts([ChatMessage("user", question)], nudging_model.chat_template)
    # Short windows put many chunk boundaries (re-read as text) inside base turns.
    sizes = {"draft_tokens": 5, "chunk_tokens": 3} if windows == "short" else {}
    config = NudgingConfig(gamma=0.4, max_tokens=40, stop=prompts.stop, **sizes)
    run = NudgingRun(
        base_model.session(prompts.base, config.base_sampling),
        nudging_model.session(prompts.nudging, config.nudging_sampling),
        config,
    )
    segments = list(run)
    base_ref, nudging_ref = ReferenceModel(base), ReferenceModel(nudging)
    oracle = reference_nudge(base_ref, nudging_ref, prompts.base, prompts.nudging, config)

    assert run.text == oracle.text
    assert "".join(s.text for s in segments) == run.text
    assert (run.finish_reason, run.rounds) == (oracle.finish_reason, oracle.rounds)
    assert {s.source for s in segments} == {"base", "nudge"}
    assert run.base.stats().tokens_processed < oracle.base.stats().tokens_processed


@settings(max_examples=60, deadline=None)
@given(steps=st.lists(st.tuples(st.integers(0, 40), st.text(max_size=30)), max_size=25))
@pytest.mark.parametrize("loaded_name", ["llama_a", "gemma_b"])
@pytest.mark.timeout(120)
def test_the_session_encoder_tokenizes_as_the_whole_text(
    loaded_name: str, steps: list[tuple[int, str]], request: pytest.FixtureRequest
) -> None:
    """Answers that grow, are cut back and rewritten: the incremental encoder gives the ids
    of the whole text every time (words and spaces weighted in, to cut at many places)."""
    loaded = request.getfixturevalue(loaded_name)
    text = TokenizerText(loaded.tokenizer)
    assert text.cuts_at_words
    rendered = "<|im_start|>user\nWhat is it?<|im_end|>\n<|im_start|>assistant\n"
    marks = [m.span() for m in re.finditer(r"<\|im_(start|end)\|>", rendered)]
    prompt = Prompt(rendered, marks)  # control tokens for tokenizer B, text for A
    encoder = text.encoder(prompt)
    answer = ""
    for keep, added in steps:
        answer = answer[: max(0, len(answer) - keep)] + " the quick fox " + added + " jumps"
        assert encoder.encode(answer) == text.encode(prompt, answer)
