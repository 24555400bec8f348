"""Every answer makes progress and ends (docs/algorithm.md, rule 7 and "Termination").

The tiny models are scripted (``forced_next``) to write a character that takes several byte
tokens, over and over: a window or draft of one token then holds only part of a character.
Before windows carried on to the end of a character, such an answer never ended.
"""

from __future__ import annotations

from typing import Any

import pytest

from langchain_nudging.backends.hf import TokenizerText
from langchain_nudging.backends.local import LocalModel
from langchain_nudging.config import NudgingConfig, SamplingConfig
from langchain_nudging.prompts import ChatMessage, render_prompts
from langchain_nudging.reference import ReferenceModel
from langchain_nudging.request import Mode, Request
from langchain_nudging.serving.generation import NudgingPair

GREEDY = SamplingConfig()
PROMPT = "Question: Repeat exactly: coffee coffee coffee\nAnswer:"
CUP = "☕"  # 3 bytes; neither tiny tokenizer has it, so it is written byte by byte


def byte_ids(tokenizer: Any, text: str, byte_level: bool) -> list[int]:
    if not byte_level:
        return [tokenizer.convert_tokens_to_ids(f"<0x{b:02X}>") for b in text.encode()]
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    shifted = {b: chr(b) for b in printable}
    extra = (b for b in range(256) if b not in shifted)
    shifted.update({b: chr(256 + i) for i, b in enumerate(extra)})
    return [tokenizer.convert_tokens_to_ids(shifted[b]) for b in text.encode()]


def cup_script(loaded: Any, byte_level: bool, starts: list[int]) -> dict[int, int]:
    """A bigram script writing cups forever after any of the ``starts`` ids."""
    ids = byte_ids(loaded.tokenizer, CUP, byte_level)
    assert len(set(ids)) == 3
    script = dict.fromkeys(starts, ids[0])
    script.update({ids[0]: ids[1], ids[1]: ids[2], ids[2]: ids[0]})
    return script


@pytest.mark.parametrize("loaded_name", ["llama_a", "gemma_b"])
@pytest.mark.parametrize("size", [1, 2, 4])
def test_a_window_goes_on_to_the_end_of_its_character(
    loaded_name: str, size: int, request: pytest.FixtureRequest, forced_next: Any
) -> None:
    loaded = request.getfixturevalue(loaded_name)
    last = TokenizerText(loaded.tokenizer).encode(PROMPT)[-1]
    with forced_next(loaded, cup_script(loaded, loaded_name == "llama_a", [last])):
        tokens = list(LocalModel(loaded).session(PROMPT, GREEDY).generate("", size))
        reference = list(ReferenceModel(loaded).session(PROMPT, GREEDY).generate("", size))
    whole = -(-size // 3) * 3  # the window's size, rounded up to whole cups
    assert len(tokens) == whole
    assert "".join(t.text for t in tokens) == CUP * (whole // 3)
    assert [t.text for t in reference] == [t.text for t in tokens]


@pytest.mark.parametrize("loaded_name", ["llama_a", "gemma_b"])
def test_a_window_ends_at_a_stop_string(
    loaded_name: str, request: pytest.FixtureRequest, forced_next: Any
) -> None:
    loaded = request.getfixturevalue(loaded_name)
    last = TokenizerText(loaded.tokenizer).encode(PROMPT)[-1]
    with forced_next(loaded, cup_script(loaded, loaded_name == "llama_a", [last])):
        session = LocalModel(loaded).session(PROMPT, GREEDY)
        tokens = list(session.generate("", 40, stop=[CUP * 2]))
        oracle = ReferenceModel(loaded).session(PROMPT, GREEDY)
        reference = list(oracle.generate("", 40, stop=[CUP * 2]))
        # An occurrence inside the answer already written does not count; one that ends in
        # the new text does, even if it starts in the answer.
        later = list(session.generate(CUP * 2, 40, stop=[CUP * 2]))
        apart = list(session.generate(CUP * 2, 40, stop=[CUP * 2 + "x"]))
    assert "".join(t.text for t in tokens) == CUP * 2
    assert [t.text for t in reference] == [t.text for t in tokens]
    assert "".join(t.text for t in later) == CUP
    assert len(apart) == 40 + 2  # no stop: a full window, carried to the end of a cup


@pytest.fixture
def cup_pair(llama_a: Any, gemma_b: Any, forced_next: Any) -> Any:
    """The tiny pair, both models writing cups after any prompt's last id."""
    pair = NudgingPair(LocalModel(llama_a), LocalModel(gemma_b))
    messages = [ChatMessage("user", "Repeat exactly: coffee"), ChatMessage("assistant", "")]
    prompts = render_prompts(messages, pair.nudging.chat_template)
    starts = {
        "base": TokenizerText(llama_a.tokenizer).encode(prompts.base)[-1],
        "nudging": TokenizerText(gemma_b.tokenizer).encode(prompts.nudging)[-1],
    }
    with (
        forced_next(llama_a, cup_script(llama_a, True, [starts["base"]])),
        forced_next(gemma_b, cup_script(gemma_b, False, [starts["nudging"]])),
    ):
        yield pair, messages


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", ["nudged", "base", "nudging"])
@pytest.mark.parametrize(("chunk", "draft"), [(1, 1), (1, 16), (16, 1), (2, 2)])
def test_one_token_windows_on_split_characters_end(
    cup_pair: Any, mode: Mode, chunk: int, draft: int
) -> None:
    pair, messages = cup_pair
    config = NudgingConfig(chunk_tokens=chunk, draft_tokens=draft, max_tokens=12)
    generation = pair.generate(Request(messages, config, mode))
    streamed = "".join(segment.text for segment in generation)
    assert streamed
    assert set(streamed) == {CUP}
    assert generation.stats.finish_reason in ("length", "repetition")
    passes = sum(generation.stats.forward_passes.values())
    assert passes < 200, generation.stats


@pytest.mark.timeout(60)
def test_a_base_window_asks_only_for_the_tokens_the_budget_has_left(llama_a: Any) -> None:
    model = LocalModel(llama_a)
    pair = NudgingPair(model, model)
    config = NudgingConfig(max_tokens=4, chunk_tokens=96, min_repeat_chars=1000)
    generation = pair.generate(Request([ChatMessage("user", "Tell me a story.")], config, "base"))
    list(generation)
    assert generation.stats.finish_reason in ("length", "stop")
    # 4 tokens (+3 to finish a character at most), not a 96-token window cut to 4.
    assert generation.stats.forward_passes["base"] <= 7, generation.stats
