"""One bundled pair, loaded once, and the bundled pair on llama.cpp servers, started once:
shared by the whole integration session."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from langchain_nudging import NudgingPair
from langchain_nudging.backends.llamacpp_runtime import LlamaCppServer, ServerSettings
from langchain_nudging.models import BUNDLED_BASE_ID, BUNDLED_NUDGING_ID
from langchain_nudging.models.bundled import bundled_gguf


@pytest.fixture(scope="session")
def pair() -> NudgingPair:
    torch.set_num_threads(2)
    return NudgingPair.load(dtype="float32", device="cpu")


@pytest.fixture(scope="session")
def llamacpp_servers() -> Iterator[tuple[LlamaCppServer, LlamaCppServer]]:
    """Real llama.cpp servers (xllamacpp) on 127.0.0.1 for the bundled GGUF files: the base
    model's and the nudging model's, one thread and four slots each."""
    settings = ServerSettings(threads=1)
    base = LlamaCppServer(bundled_gguf(BUNDLED_BASE_ID), settings)
    try:
        nudging = LlamaCppServer(bundled_gguf(BUNDLED_NUDGING_ID), settings)
    except BaseException:
        base.stop()
        raise
    yield base, nudging
    base.stop()
    nudging.stop()


@pytest.fixture(scope="session")
def server_pair(llamacpp_servers: tuple[LlamaCppServer, LlamaCppServer]) -> NudgingPair:
    base, nudging = llamacpp_servers
    return NudgingPair.load(base.url, nudging.url)
