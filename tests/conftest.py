"""Fixtures over the tiny real tokenizers and random-weight models of ``tiny_models``."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from tiny_models import GEMMA_WINDOW, build_gemma, build_llama, force_next, tokenizer_maker
from transformers import PreTrainedTokenizerFast

from langchain_nudging.models import LoadedModel

# Tiny models: one thread is fastest, and far faster than two when other processes share the
# cores (thread hand-offs dominate a forward pass of this size).
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def make_tokenizer() -> Callable[..., PreTrainedTokenizerFast]:
    """``make_tokenizer("byte" | "sp", chat_template=...)``: a fresh wrapper (safe to modify).

    ``chat_template`` defaults to none for "byte" and to ChatML for "sp"; pass ``None`` for none.
    """
    return tokenizer_maker()


@pytest.fixture(scope="session")
def byte_tokenizer(make_tokenizer: Callable[..., PreTrainedTokenizerFast]) -> Any:
    return make_tokenizer("byte")


@pytest.fixture(scope="session")
def sp_tokenizer(make_tokenizer: Callable[..., PreTrainedTokenizerFast]) -> Any:
    return make_tokenizer("sp")


@pytest.fixture(scope="session")
def llama_a(byte_tokenizer: Any) -> LoadedModel:
    """Llama with the byte-level tokenizer (the usual base model here)."""
    return build_llama(byte_tokenizer)


@pytest.fixture(scope="session")
def gemma_b(sp_tokenizer: Any) -> LoadedModel:
    """Gemma 3 (one sliding-window layer) with the SentencePiece-style ChatML tokenizer."""
    return build_gemma(sp_tokenizer)


@pytest.fixture(scope="session")
def llama_b(sp_tokenizer: Any) -> LoadedModel:
    """Llama with the same tokenizer as ``gemma_b`` (a same-tokenizer pair)."""
    return build_llama(sp_tokenizer, seed=2, name="tiny-llama-b")


@pytest.fixture(scope="session")
def forced_next() -> Callable[..., contextlib.AbstractContextManager[None]]:
    """``with forced_next(loaded, {last_id: next_id}):`` scripts a model (see ``force_next``)."""
    return force_next


BOOM = "<<boom>>"  # a stop string whose check throws once an answer has started


@pytest.fixture(scope="module")
def pair(llama_a: LoadedModel, gemma_b: LoadedModel) -> Any:
    from langchain_nudging.backends.registry import text_model
    from langchain_nudging.serving.generation import NudgingPair

    return NudgingPair(text_model(llama_a), text_model(gemma_b))


@pytest.fixture
def engine(pair: Any) -> Iterator[Any]:
    """An engine of its own over the tiny pair; it must shut down cleanly."""
    from langchain_nudging.serving.engine import NudgingEngine

    engine = NudgingEngine(pair)
    yield engine
    assert engine.shutdown(timeout=30)
    assert engine.live_requests == 0
    assert engine.live_sessions == 0


@pytest.fixture
def exploding_stop_check(monkeypatch: pytest.MonkeyPatch) -> str:
    """Requests with the returned stop string fail in their own thread, mid-answer."""
    from langchain_nudging.algorithm import AnswerWriter

    append = AnswerWriter.append

    def checked(self: AnswerWriter, segment: Any) -> Any:
        if BOOM in self._config.stop and self.answer:
            raise ValueError("stop check exploded")
        return append(self, segment)

    monkeypatch.setattr(AnswerWriter, "append", checked)
    return BOOM


@pytest.fixture(scope="session")
def gemma_window() -> int:
    """The sliding window of ``build_gemma``'s first layer, in tokens."""
    return GEMMA_WINDOW


@pytest.fixture(scope="session")
def build_model() -> Callable[..., LoadedModel]:
    """``build_model("gemma" | "llama", tokenizer, seed=..., name=...)``: a fresh tiny model."""

    def build(kind: str, tokenizer: Any, **options: Any) -> LoadedModel:
        return {"gemma": build_gemma, "llama": build_llama}[kind](tokenizer, **options)

    return build


@pytest.fixture
def no_hub(monkeypatch: pytest.MonkeyPatch) -> None:
    """A Hub that refuses connections at once (nothing listens on port 9), not offline mode."""
    import huggingface_hub.constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    for variable in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY", "all_proxy"):
        monkeypatch.delenv(variable, raising=False)


@pytest.fixture
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty Hugging Face cache folder, the one huggingface_hub and transformers read."""
    import huggingface_hub.constants

    folder = tmp_path / "hf-hub"
    folder.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(folder))
    return folder
