"""One bundled pair, loaded once, shared by the whole integration session."""

from __future__ import annotations

import pytest
import torch

from langchain_nudging import NudgingPair


@pytest.fixture(scope="session")
def pair() -> NudgingPair:
    torch.set_num_threads(2)
    return NudgingPair.load(dtype="float32", device="cpu")
