"""One factory for every backend: a model spec becomes a :class:`~.base.TextModel`.

A spec is a bundled id, a Hugging Face Hub id, a model folder, a ``.gguf`` file, a
``LoadedModel``, a ``(model, tokenizer)`` tuple, or an object that already is a text model
(returned as it is). Each backend says which specs it claims; backends registered later are
asked first, and transformers in this process (:class:`~.local.LocalModel` over
:func:`~langchain_nudging.models.load_model`) takes every spec no other backend claims. A new
backend is one module that calls :func:`register_backend` once (docs/architecture.md).

The same spec with the same options gives the same text model while it is in use, so that
everything asking for one model (pairs, shared engines, chat models) shares it.
"""

from __future__ import annotations

import inspect
import os
import threading
import weakref
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any, TypeGuard

from typing_extensions import get_protocol_members

from ..models import (
    BUNDLED_BASE_ID,
    BUNDLED_NUDGING_ID,
    LoadedModel,
    ModelLoadError,
    check_model_kwargs,
    check_source,
    freeze,
    load_model,
    read_chat_template,
    unload_model,
)
from .base import TextModel
from .local import LocalModel

__all__ = [
    "BUNDLED_BASE_ID",
    "BUNDLED_NUDGING_ID",
    "HF_OPTIONS",
    "applies",
    "built_text_model",
    "check_model_kwargs",
    "check_spec",
    "read_chat_template",
    "register_backend",
    "register_runtime",
    "release_text_model",
    "runtimes",
    "spec_label",
    "text_model",
]


@dataclass(frozen=True)
class _Backend:
    name: str
    claims: Callable[[Any], bool]
    build: Callable[..., TextModel]
    options: frozenset[str] | None  # the options it takes (``None``: all); others are dropped

    def take(self, options: dict[str, Any]) -> dict[str, Any]:
        if self.options is None:
            return dict(options)
        return {k: v for k, v in options.items() if k in self.options}


_FALLBACK = "transformers"
_BACKENDS: tuple[_Backend, ...] = ()  # the order they are asked in: the latest first
_LOCK = threading.Lock()
_MODELS: weakref.WeakValueDictionary[Hashable, TextModel] = weakref.WeakValueDictionary()
_BUILDING: dict[Hashable, threading.Lock] = {}
_MEMBERS = frozenset(get_protocol_members(TextModel))
_RUNTIMES: dict[str, Callable[[Any, bool], str | None]] = {}

#: Options that only a model loaded with transformers in this process can use. Where the
#: backend of a spec takes none of them (a server, a model on a runtime's server, a text model
#: object), setting one is an error that names it, not an option silently dropped.
HF_OPTIONS = ("revision", "local_files_only", "model_kwargs", "chat_template")


def register_backend(
    name: str,
    claims: Callable[[Any], bool],
    build: Callable[..., TextModel],
    options: frozenset[str] | None = None,
) -> None:
    """Add a backend, asked before every backend registered earlier.

    ``claims(spec)`` says whether the backend serves ``spec``; ``build(spec, **options)`` makes
    its text model (which must take weak references, as instances of plain classes do).
    ``options`` names the options it takes: the others given to :func:`text_model` (those of
    the other model of a mixed pair) are not passed to it (``None``: every option).
    Registering a name again replaces that backend.
    """
    global _BACKENDS
    backend = _Backend(name, claims, build, None if options is None else frozenset(options))
    with _LOCK:
        _BACKENDS = (backend, *(b for b in _BACKENDS if b.name != name))


def text_model(spec: Any, **options: Any) -> TextModel:
    """The text model of ``spec``, built by the first backend that claims it.

    ``options`` go to the backend (transformers: :func:`~langchain_nudging.models.load_model`'s
    keywords, ``revision``, ``local_files_only``, ``model_kwargs`` and ``chat_template``
    included). Building happens once per spec and options while the result is in use; a spec
    that cannot be served raises the backend's error (``ModelLoadError`` for transformers).
    Options a backend does not take are dropped (they belong to the other model of a mixed
    pair), except the Hugging Face options (``HF_OPTIONS``): one of those set for a backend
    that cannot use it (a server, a runtime's server, a text model object) is a
    ``ValueError`` naming it.
    """
    if _is_text_model(spec):
        _refuse_hf_options(spec, options, "it is a text model object")
        return spec
    given = spec
    spec, options = _on_runtime(spec, options)
    backend, taken, key = _resolve(spec, options, given)
    return _once(key, lambda: backend.build(spec, **taken))


def built_text_model(spec: Any, **options: Any) -> TextModel | None:
    """The text model :func:`text_model` would return for ``spec`` and ``options`` if it is
    built already, else ``None``: nothing is loaded (an event loop may ask)."""
    if _is_text_model(spec):
        _refuse_hf_options(spec, options, "it is a text model object")
        return spec
    given = spec
    spec, options = _on_runtime(spec, options, start=False)
    if spec is None:
        return None  # its server is not started yet: text_model starts it
    key = _resolve(spec, options, given)[2]
    with _LOCK:
        return _MODELS.get(key)


def _resolve(
    spec: Any, options: dict[str, Any], given: Any = None
) -> tuple[_Backend, dict[str, Any], Hashable]:
    """The backend that claims ``spec``, the options it takes, and the registry key."""
    backend = next(b for b in _BACKENDS if b.claims(spec))
    taken = backend.take(options)
    served = spec if given is None or given is spec else f"{spec_label(given)} (on {spec})"
    _refuse_hf_options(
        spec, {k: v for k, v in options.items() if k not in taken},
        f"it is served by the {backend.name!r} backend: {_short(spec_label(served))}",
    )  # fmt: skip
    return backend, taken, (backend.name, _spec_key(spec), _frozen(taken))


def _refuse_hf_options(spec: Any, options: dict[str, Any], why: str) -> None:
    """A ``ValueError`` naming the Hugging Face loading options set in ``options``, which
    ``spec`` cannot use."""
    refused = [name for name in HF_OPTIONS if options.get(name)]
    if refused:
        raise ValueError(
            f"{', '.join(refused)}: option(s) of models loaded with transformers in this "
            f"process, which this model cannot use ({why}); leave them unset for it"
        )


def applies(spec: Any, option: str, runtime: str | None = None) -> bool:
    """Whether the backend that would serve ``spec`` (on ``runtime``) takes ``option``:
    a chat model gives each model of a mixed pair only the options it can use."""
    if _is_text_model(spec):
        return False
    backend = next(b for b in _BACKENDS if b.claims(spec))
    if backend.name == _FALLBACK and runtime not in (None, _FALLBACK):
        return False  # it runs on a server the runtime starts
    return backend.options is None or option in backend.options


def release_text_model(model: TextModel, weights: bool = True) -> bool:
    """Forget ``model`` in the factory and drop its model from the model registry: with
    ``weights``, every entry holding the same torch model; without, that entry only (another
    entry shares the weights). Returns whether anything was dropped. A later
    :func:`text_model` builds (loads) it again."""
    with _LOCK:
        keys = [key for key, held in _MODELS.items() if held is model]
        for key in keys:
            del _MODELS[key]
    loaded = getattr(model, "loaded", None)
    unloaded = isinstance(loaded, LoadedModel) and unload_model(loaded, variants=weights)
    return bool(keys) or unloaded


def _short(text: str, limit: int = 120) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def register_runtime(name: str, serve: Callable[[Any, bool], str | None]) -> None:
    """Add a runtime: ``serve(spec, start)`` is the URL of a server it runs for ``spec`` (the
    server started when ``start``, else ``None`` when it is not running), or raises a
    ``ValueError`` for a spec it cannot serve. ``runtime=name`` then picks it."""
    _RUNTIMES[name] = serve


def runtimes() -> tuple[str, ...]:
    return (_FALLBACK, *_RUNTIMES)


def _on_runtime(
    spec: Any, options: dict[str, Any], start: bool = True
) -> tuple[Any, dict[str, Any]]:
    """``spec`` as the chosen runtime serves it: with ``runtime="llamacpp"`` a GGUF model
    becomes the URL of a llama.cpp server started for it (a server URL stays as it is)."""
    options = dict(options)
    runtime = options.pop("runtime", None) or _FALLBACK
    if runtime != _FALLBACK and runtime not in _RUNTIMES:
        raise ValueError(f"runtime: expected one of {runtimes()}, got {runtime!r}")
    if runtime == _FALLBACK or any(b.claims(spec) for b in _BACKENDS if b.name != _FALLBACK):
        return spec, options
    return _RUNTIMES[runtime](spec, start), options


def check_spec(value: Any, field: str, *, deep: bool = False) -> Any:
    """``value`` if it can be a model spec, checked without loading anything; else a
    ``ValueError`` naming ``field``.

    A text model, a spec another backend claims, a ``LoadedModel`` and a ``(model, tokenizer)``
    tuple pass as they are; a path is returned as a string. Without ``deep`` a string is only
    checked for its shape (no disk, no network: a constructor can afford it). With ``deep`` it
    is checked as loading would check it (:func:`~langchain_nudging.models.check_source`: the
    path exists and holds a model or a GGUF file, the weights are not pickles, a Hub id is in the
    cache or the Hub is reachable), raising ``ModelLoadError``.
    """
    if _is_text_model(value) or any(b.claims(value) for b in _BACKENDS if b.name != _FALLBACK):
        return value
    if isinstance(value, LoadedModel) or (isinstance(value, tuple) and len(value) == 2):
        return value
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if deep and isinstance(value, str):
        try:
            check_source(value)
        except ModelLoadError as exc:
            raise ModelLoadError(f"{field}: {exc}") from None
        return value
    if not isinstance(value, str) or not value.strip():
        raise ValueError(
            f"{field}: expected a bundled id, a Hugging Face Hub id, a model folder, a .gguf "
            f"file, a LoadedModel or a (model, tokenizer) tuple, got {value!r}"
        )
    bundled = (BUNDLED_BASE_ID, BUNDLED_NUDGING_ID)
    if value.startswith("bundled:") and value not in bundled:
        raise ValueError(f"{field}: unknown bundled model {value!r}; use one of {bundled}")
    return value


def spec_label(value: Any) -> str:
    """A short name of a spec for metadata: a path or id as given, a model's own name,
    ``"custom"`` for a ``(model, tokenizer)`` tuple, else the type's name."""
    if isinstance(value, str | os.PathLike):
        return os.fspath(value)
    if isinstance(value, tuple):
        return "custom"
    if isinstance(value, LoadedModel) or _is_text_model(value):
        return value.name
    return type(value).__name__  # not a spec: validation reports it


def _is_text_model(value: object) -> TypeGuard[TextModel]:
    return all(hasattr(value, member) for member in _MEMBERS)


def _spec_key(spec: Any) -> Hashable:
    """What identifies a spec: a path or id by its text, an object by its identity (the text
    model built from it holds it, so the identity is not reused while the entry lives)."""
    if isinstance(spec, str | os.PathLike):
        return ("text", os.fspath(spec))
    if isinstance(spec, tuple):
        return ("tuple", *map(id, spec))
    return ("object", id(spec))


def _frozen(value: Any) -> Hashable:
    """Options as a hashable value, equal for equal settings (a device map and
    ``model_kwargs`` are dicts; a quantization config is compared by its ``to_dict()``)."""
    frozen: Hashable = freeze(value)
    return frozen


def _once(key: Hashable, build: Callable[[], TextModel]) -> TextModel:
    """The live model under ``key``, else ``build()``'s, built once even when threads ask at
    the same time (other keys build in parallel)."""
    with _LOCK:
        model = _MODELS.get(key)
        if model is not None:
            return model
        building = _BUILDING.setdefault(key, threading.Lock())
    with building:
        with _LOCK:
            model = _MODELS.get(key)
        if model is None:
            model = build()
            with _LOCK:
                _MODELS[key] = model
                _BUILDING.pop(key, None)
    return model


def _transformers(spec: Any, **options: Any) -> TextModel:
    """A :class:`~.local.LocalModel` per loaded model (specs loading the same weights with
    equivalent settings share it)."""
    loaded = load_model(spec, **options)
    return _once(("loaded", id(loaded)), lambda: LocalModel(loaded))


# transformers takes load_model's keywords; a server model's options (api_key, timeout, ...)
# given for the other model of a mixed pair do not reach it.
_LOAD_OPTIONS = frozenset(list(inspect.signature(load_model).parameters)[1:])
register_backend(_FALLBACK, lambda spec: True, _transformers, options=_LOAD_OPTIONS)
# Serving engines: any server URL; each engine's dialect is one module (llamacpp.py registers
# itself with http.py when imported). Registered after the fallback: asked first.
from . import http, llamacpp, llamacpp_runtime, sglang, vllm, vllm_runtime  # noqa: E402, F401

register_backend("server", http.is_server, http.server_model, options=http.SERVER_OPTIONS)
register_runtime("llamacpp", llamacpp_runtime.serve_gguf)
register_runtime("vllm", vllm_runtime.serve_folder)
