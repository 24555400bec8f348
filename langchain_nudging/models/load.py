"""`load_model`: a bundled id, a local transformers folder, a `.gguf` file, a Hugging Face Hub
id, or an already-loaded model, loaded once per process for the same settings (through the
registry)."""

from __future__ import annotations

import copy
import os
import socket
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .bundled import _bundled_spec, bundled_model_dir
from .devices import resolve_device, resolve_dtype
from .gguf import _check_gguf, _converted_user_gguf, _transformers_bars
from .registry import _BUNDLED, _SOURCES_HELP, LoadedModel, ModelLoadError, _get_or_load, _short

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

_PICKLED = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")  # weights that load through pickle
HUB_PROBE_TIMEOUT = 3.0  # seconds the one connection probe to the Hub may take

#: Keys of `model_kwargs` the library passes to `from_pretrained` itself, with what sets them.
RESERVED_MODEL_KWARGS = {
    "dtype": "dtype=", "torch_dtype": "dtype=", "device_map": "device_map=",
    "trust_remote_code": "trust_remote_code=", "gguf_file": "gguf_file=",
    "revision": "revision=", "local_files_only": "local_files_only=",
    "use_safetensors": "allow_pickle=", "cache_dir": "$HF_HUB_CACHE",
    "pretrained_model_name_or_path": "the model spec",
}  # fmt: skip


def load_model(
    model: str | os.PathLike | LoadedModel | tuple[PreTrainedModel, PreTrainedTokenizerBase],
    *,
    gguf_file: str | None = None,
    dtype: str | torch.dtype = "auto",
    device: str | None = None,
    device_map: str | dict | None = None,
    trust_remote_code: bool = False,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
    allow_pickle: bool = False,
    revision: str | None = None,
    local_files_only: bool = False,
    model_kwargs: dict[str, Any] | None = None,
    chat_template: str | os.PathLike | None = None,
) -> LoadedModel:
    """Load a causal LM and its tokenizer, once per process for the same settings.

    `model` is a bundled id (`BUNDLED_BASE_ID`, `BUNDLED_NUDGING_ID`), a local transformers folder,
    a `.gguf` file (or a folder and `gguf_file=`), a Hub id (passed to `from_pretrained`, with
    `gguf_file` if given), a `LoadedModel` (returned as it is) or a `(model, tokenizer)` tuple
    (wrapped, put in eval mode with gradients off, its dtype and device left alone).

    A local `.gguf` file is converted once into the cache, keyed by its absolute path, size and
    mtime, so the next load of it is fast. With `device_map` the model is placed by accelerate in
    `from_pretrained`; otherwise it is moved to `device`. Every problem raises `ModelLoadError`;
    the source is validated before anything is written to the cache.

    A spec that looks like a path (absolute, `./`, `~`, more than one `/`, a `.gguf` name, or
    not a valid Hub id) and does not exist fails at once. A Hub id is loaded from the local
    Hugging Face cache when it is there (no network); otherwise from the Hub, unless the Hub
    cannot be reached (`HF_HUB_OFFLINE` set, or one connection probe of `HUB_PROBE_TIMEOUT`
    seconds fails), which fails at once instead of retrying.

    `revision` (a branch, tag or commit) picks the version of a Hub id; local folders, files
    and bundled ids have none and ignore it, as `from_pretrained` does. `local_files_only=True`
    never touches the network: a Hub id that is not in the Hugging Face cache fails at once.
    `model_kwargs` go to the model's `from_pretrained` (e.g. `quantization_config`,
    `attn_implementation`); the keys the library sets itself (`RESERVED_MODEL_KWARGS`) are
    refused. `chat_template` (a Jinja string, or the path of a file holding one) replaces the
    tokenizer's chat template; the weights are shared with the same model without it.

    Weights must be safetensors: pickled weights (`pytorch_model.bin`, `*.pt`) can run code
    when loaded and are refused unless `allow_pickle=True`, for a source you trust.
    """
    template = read_chat_template(chat_template)
    if template is not None:
        plain = load_model(
            model, gguf_file=gguf_file, dtype=dtype, device=device, device_map=device_map,
            trust_remote_code=trust_remote_code, cache_dir=cache_dir, progress=progress,
            allow_pickle=allow_pickle, revision=revision, local_files_only=local_files_only,
            model_kwargs=model_kwargs,
        )  # fmt: skip
        templated = (*_keys_of(plain), ("chat_template", template))
        return _get_or_load(templated, lambda: _with_template(plain, template))
    if isinstance(model, LoadedModel):
        return model
    if isinstance(model, tuple):
        return _register_custom(model)
    if not isinstance(model, (str, os.PathLike)):
        raise ModelLoadError(
            f"model={_short(repr(model), 60)} is not supported; pass {_SOURCES_HELP}, "
            "a LoadedModel or a (model, tokenizer) tuple"
        )
    torch_dtype = resolve_dtype(dtype, device)
    if device_map is None:
        placement: Any = resolve_device(device)
    elif isinstance(device_map, dict):
        placement = tuple(sorted((str(k), str(v)) for k, v in device_map.items()))
    else:
        placement = str(device_map)
    for flag, value in (("allow_pickle", allow_pickle), ("local_files_only", local_files_only)):
        if not isinstance(value, bool):
            raise ModelLoadError(f"{flag}={_short(repr(value), 60)} must be True or False")
    if revision is not None and (not isinstance(revision, str) or not revision.strip()):
        raise ModelLoadError(f"revision={_short(repr(revision), 60)}: expected a branch, tag or "
                             "commit of the Hub repo, or None")  # fmt: skip
    extra = check_model_kwargs(model_kwargs)
    text = os.fspath(model)
    source, hub_gguf, prepare = _resolve_source(
        text, gguf_file, cache_dir, progress, allow_pickle, revision, local_files_only
    )
    hub = not source.startswith("bundled:") and not Path(source).is_absolute()
    name = source if hub_gguf is None else f"{source} ({hub_gguf})"
    if not hub:
        revision = None  # local folders and files have no revisions (from_pretrained ignores it)
    if revision is not None:
        name = f"{name}@{revision}"

    def load() -> LoadedModel:
        where = prepare()
        options: dict[str, Any] = {
            "gguf_file": hub_gguf, "dtype": torch_dtype, "trust": trust_remote_code,
            "device_map": device_map, "device": None if device_map is not None else placement,
            "progress": progress, "allow_pickle": allow_pickle, "revision": revision,
            "model_kwargs": extra,
        }  # fmt: skip
        try:
            if hub and local_files_only:
                net, tokenizer = _load_pretrained(where, local_files_only=True, **options)
                return _finish(net, tokenizer, name)
            if hub:
                cached = _cached_hub_weights(source, hub_gguf, allow_pickle, revision)
                if cached:
                    try:  # all of it may be in the cache already: no network at all
                        net, tokenizer = _load_pretrained(where, local_files_only=True, **options)
                        return _finish(net, tokenizer, name)
                    except OSError:
                        pass  # a part is missing from the cache: the Hub has it
                if reason := _hub_unreachable():
                    if cached is None:
                        raise _pickle_error(name)
                    raise _hub_error(source, reason, "only partly in the Hugging Face cache")
            net, tokenizer = _load_pretrained(where, **options)
        except ModelLoadError:
            raise
        except Exception as exc:
            if _pickle_refused(exc) and not allow_pickle:
                raise _pickle_error(name) from exc
            if isinstance(exc, OSError) and hub and local_files_only:
                raise _hub_error(source, "local_files_only=True", "not (fully) in the Hugging "
                                 "Face cache", revision) from exc  # fmt: skip
            if isinstance(exc, OSError) and hub:
                raise ModelLoadError(
                    f"model={source!r} is neither a local path nor reachable on the Hugging Face "
                    f"Hub ({_short(exc)}); bundled models: " + ", ".join(_BUNDLED)
                ) from exc
            raise ModelLoadError(f"could not load model {name!r}: {_short(exc)}") from exc
        return _finish(net, tokenizer, name)

    # local_files_only changes where the files come from, not which weights: not in the key.
    key: tuple[Any, ...] = (
        source,
        hub_gguf,
        str(torch_dtype),
        placement,
        trust_remote_code,
        allow_pickle,
    )
    if revision is not None or extra:
        key = (*key, revision, freeze(extra))
    return _get_or_load(key, load)


def check_model_kwargs(model_kwargs: Any) -> dict[str, Any]:
    """`model_kwargs` as a dict (`{}` for `None`), or a `ModelLoadError` for anything but a dict
    with string keys, or for a key the library sets itself (it names the option to use)."""
    if model_kwargs is None:
        return {}
    if not isinstance(model_kwargs, dict) or not all(isinstance(k, str) for k in model_kwargs):
        raise ModelLoadError(
            f"model_kwargs={_short(repr(model_kwargs), 60)}: expected a dict of keyword "
            "arguments for the model's from_pretrained (e.g. {'attn_implementation': 'sdpa'})"
        )
    reserved = sorted(k for k in model_kwargs if k in RESERVED_MODEL_KWARGS)
    if reserved:
        instead = "; ".join(f"{k!r}: use {RESERVED_MODEL_KWARGS[k]}" for k in reserved)
        raise ModelLoadError(
            f"model_kwargs: {reserved} set by langchain-nudging itself, not through "
            f"model_kwargs ({instead})"
        )
    return dict(model_kwargs)


def read_chat_template(template: str | os.PathLike | None) -> str | None:
    """A chat template override as Jinja text: the string itself when it holds Jinja syntax,
    else the contents of the file it names; `ModelLoadError` for a missing file, an empty
    template or a Jinja syntax error."""
    if template is None:
        return None
    if not isinstance(template, (str, os.PathLike)):
        raise ModelLoadError(
            f"chat_template={_short(repr(template), 60)}: expected a Jinja string or a file path"
        )
    text = os.fspath(template)
    if isinstance(template, os.PathLike) or not any(m in text for m in ("{{", "{%")):
        path = Path(text).expanduser()
        if not path.is_file():
            raise ModelLoadError(
                f"chat_template={_short(repr(text), 80)} is neither a Jinja template (no '{{{{' "
                "or '{%') nor an existing file"
            )
        text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise ModelLoadError("chat_template is empty")
    import jinja2

    try:
        jinja2.Environment().parse(text)
    except jinja2.TemplateSyntaxError as exc:
        raise ModelLoadError(
            f"chat_template: Jinja syntax error on line {exc.lineno}: {_short(exc.message)}"
        ) from None
    return text


def freeze(value: Any) -> Any:
    """`value` as a hashable value that is equal for equal settings: dicts by their items,
    a configuration object (a quantization config) by its class and `to_dict()`."""
    if isinstance(value, dict):
        return ("dict", tuple(sorted((str(k), freeze(v)) for k, v in value.items())))
    if isinstance(value, list | tuple | set | frozenset):
        items = tuple(freeze(v) for v in value)
        return (
            items if isinstance(value, list | tuple) else ("set", tuple(sorted(map(repr, items))))
        )
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, torch.dtype):
        return str(value)
    to_dict = getattr(value, "to_dict", None)
    if callable(to_dict) and not isinstance(value, type):
        return (type(value).__qualname__, freeze(to_dict()))
    try:
        hash(value)
    except TypeError:
        return (type(value).__qualname__, id(value))
    return value


def _keys_of(loaded: LoadedModel) -> tuple[Any, ...]:
    """The registry key `loaded` is held under (its identity when it is not held)."""
    from .registry import _registry, _registry_lock

    with _registry_lock:
        for key, held in _registry.items():
            if held is loaded:
                return key
    return ("object", id(loaded))


def _with_template(loaded: LoadedModel, template: str) -> LoadedModel:
    """`loaded` with a tokenizer whose chat template is `template` (the weights are shared)."""
    tokenizer = copy.copy(loaded.tokenizer)
    tokenizer.chat_template = template
    return LoadedModel(loaded.model, tokenizer, loaded.name, loaded.context_window)


def check_source(
    model: str | os.PathLike, *, gguf_file: str | None = None, allow_pickle: bool = False
) -> str:
    """Validate a model source without loading or converting anything; returns its registry
    name. Raises `ModelLoadError` as `load_model` would for a missing path, a file that is not
    GGUF, an unknown bundled id, pickled weights, or a Hub id that is neither in the local
    cache nor reachable."""
    if not isinstance(model, (str, os.PathLike)):
        raise ModelLoadError(
            f"model={_short(repr(model), 60)} is not supported; pass {_SOURCES_HELP}"
        )
    return _resolve_source(os.fspath(model), gguf_file, None, False, allow_pickle)[0]


def _resolve_source(
    text: str, gguf_file: str | None, root: str | os.PathLike | None, progress: bool,
    allow_pickle: bool = False, revision: str | None = None, local_files_only: bool = False,
) -> tuple[str, str | None, Callable[[], str]]:  # fmt: skip
    """Validate a source: `(registry name, gguf_file for the Hub, () -> from_pretrained path)`."""
    if text.startswith("bundled:"):
        _bundled_spec(text)
        return text, None, lambda: str(bundled_model_dir(text, root, progress))
    if not text.strip():
        raise ModelLoadError(f"model={text!r} is empty; pass {_SOURCES_HELP}")
    path = Path(text).expanduser()
    if path.exists():
        if gguf_file is not None and not path.is_dir():
            raise ModelLoadError(f"gguf_file={gguf_file!r} needs `model` to be a folder")
        path = (path if gguf_file is None else path / gguf_file).resolve()
        if gguf_file is not None or path.is_file():
            _check_gguf(path)
            return str(path), None, lambda: str(_converted_user_gguf(path, root, progress))
        if (path / "config.json").is_file():
            if not allow_pickle:
                _check_no_pickles(path)
            return str(path), None, lambda: str(path)
        ggufs = sorted(p.name for p in path.glob("*.gguf"))[:5]
        hint = f"; to load a GGUF file in it, pass gguf_file= one of {ggufs}" if ggufs else ""
        raise ModelLoadError(
            f"{str(path)!r} is not a model folder (no config.json); pass {_SOURCES_HELP}{hint}"
        )
    # Hub ids are "name" or "owner/name"; anything else shaped like a path is a missing path.
    if (
        path.is_absolute() or text.startswith(("~", ".")) or text.count("/") > 1 or "\\" in text
        or text.lower().endswith(".gguf") or not _valid_hub_id(text)
    ):  # fmt: skip
        raise ModelLoadError(f"model path {text!r} does not exist; pass {_SOURCES_HELP}")
    if not _in_hub_cache(text, gguf_file, revision):
        reason = "local_files_only=True" if local_files_only else _hub_unreachable()
        if reason:
            raise _hub_error(text, reason, "not in the Hugging Face cache", revision)
    return text, gguf_file, lambda: text


def _valid_hub_id(text: str) -> bool:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(text)
    except HFValidationError:
        return False
    return True


def _in_hub_cache(repo_id: str, gguf_file: str | None, revision: str | None = None) -> bool:
    """Whether the local Hugging Face cache holds the repo's config (or its GGUF file)."""
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id, gguf_file or "config.json", revision=revision)
    except Exception:  # a malformed cache entry counts as absent
        return False
    return isinstance(found, str)


_SAFE_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
_PICKLED_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")


def _cached_hub_weights(
    repo_id: str, gguf_file: str | None, allow_pickle: bool, revision: str | None = None
) -> bool | None:
    """Whether the Hugging Face cache holds weights of the repo that may be loaded: `None` when
    it holds only pickled ones and `allow_pickle` is off."""
    if gguf_file:
        return _in_hub_cache(repo_id, gguf_file, revision)
    if any(_in_hub_cache(repo_id, name, revision) for name in _SAFE_WEIGHTS):
        return True
    if any(_in_hub_cache(repo_id, name, revision) for name in _PICKLED_WEIGHTS):
        return True if allow_pickle else None
    return False


def _hub_unreachable() -> str | None:
    """Why the Hugging Face Hub cannot be reached now, or `None` when one connection to it (or
    to the HTTPS proxy) opens within `HUB_PROBE_TIMEOUT` seconds."""
    from huggingface_hub import constants

    for variable in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(variable, "").strip().upper() in ("1", "ON", "YES", "TRUE"):
            return f"{variable} is set"
    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    target = urllib.request.getproxies().get("https") or constants.ENDPOINT
    parsed = urllib.parse.urlsplit(target if "//" in target else "//" + target)
    host = parsed.hostname or "huggingface.co"
    port = parsed.port or (80 if parsed.scheme == "http" else 443)
    # A failed probe is remembered for a while: the two models of a pair wait for one probe.
    failed = _FAILED_PROBES.get((host, port))
    if failed is not None and time.monotonic() - failed[0] < HUB_PROBE_MEMORY:
        return failed[1]
    reason = _probe(host, port)
    if reason is None:
        _FAILED_PROBES.pop((host, port), None)
    else:
        _FAILED_PROBES[(host, port)] = (time.monotonic(), reason)
    return reason


HUB_PROBE_MEMORY = 30.0  # seconds a failed probe stands for the next ones
_FAILED_PROBES: dict[tuple[str, int], tuple[float, str]] = {}


def _probe(host: str, port: int) -> str | None:
    outcome: list[BaseException | None] = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=HUB_PROBE_TIMEOUT).close()
            outcome.append(None)
        except BaseException as exc:  # reported below
            outcome.append(exc)

    worker = threading.Thread(target=probe, name="hub-probe", daemon=True)
    worker.start()
    worker.join(HUB_PROBE_TIMEOUT)  # name resolution is not bound by the socket's timeout
    if not outcome:
        return f"no answer from {host}:{port} within {HUB_PROBE_TIMEOUT:g} s"
    if outcome[0] is not None:
        return f"no connection to {host}:{port}: {_short(outcome[0], 120)}"
    return None


def _hub_error(
    repo_id: str, reason: str, cached: str, revision: str | None = None
) -> ModelLoadError:
    at = f" at revision {revision!r}" if revision else ""
    return ModelLoadError(
        f"model={repo_id!r} is neither a local path nor reachable on the Hugging Face Hub: it is "
        f"not a local folder or file, it is {cached}{at}, and the Hub cannot be reached "
        f"({reason}); check the spelling, or download it while online (`hf download "
        f"{repo_id}`); bundled models: " + ", ".join(_BUNDLED)
    )


def _check_no_pickles(folder: Path) -> None:
    """Refuse a model folder whose only weights are pickles."""
    if any(folder.glob("*.safetensors")) or any(folder.glob("*.safetensors.index.json")):
        return
    pickled = sorted({p.name for pattern in _PICKLED for p in folder.glob(pattern)})
    if pickled:
        raise _pickle_error(str(folder), pickled[:3])


def _pickle_refused(exc: BaseException) -> bool:
    """Whether transformers refused a Hub repo for having no safetensors weights."""
    return isinstance(exc, OSError) and "cannot be loaded with `safetensors`" in str(exc)


def _pickle_error(name: str, files: list[str] | None = None) -> ModelLoadError:
    held = f" ({', '.join(files)})" if files else ""
    return ModelLoadError(
        f"model {name!r} has pickled weights{held} and no safetensors; loading a pickle can run "
        "arbitrary code, so it is refused. Convert the weights to safetensors, or pass "
        "allow_pickle=True (NudgedChatModel(allow_pickle=True)) for a source you trust"
    )


def _load_pretrained(
    where: str, *, gguf_file: str | None, dtype: torch.dtype, trust: bool, device_map: Any,
    device: str | None, progress: bool, allow_pickle: bool = False,
    local_files_only: bool = False, revision: str | None = None,
    model_kwargs: dict[str, Any] | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:  # fmt: skip
    """`from_pretrained` for the model and its tokenizer (tests wrap this to count loads).

    Weights load from safetensors only unless `allow_pickle`; `local_files_only` never touches
    the network."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    extra: dict[str, Any] = {"gguf_file": gguf_file} if gguf_file else {}
    if local_files_only:
        extra["local_files_only"] = True
    if revision is not None:
        extra["revision"] = revision
    with _transformers_bars(progress):
        tokenizer = AutoTokenizer.from_pretrained(where, trust_remote_code=trust, **extra)
        if device_map is not None:
            extra["device_map"] = device_map
        if not gguf_file and not allow_pickle:
            extra["use_safetensors"] = True
        net = AutoModelForCausalLM.from_pretrained(
            where, dtype=dtype, trust_remote_code=trust, **extra, **(model_kwargs or {})
        )
    # transformers types `to` through a decorator that mypy reads as taking the model first.
    return (net if device is None else net.to(device)), tokenizer  # type: ignore[arg-type]


def _finish(net: Any, tokenizer: Any, name: str) -> LoadedModel:
    net.eval()
    net.requires_grad_(False)
    config = net.config.get_text_config() if hasattr(net.config, "get_text_config") else net.config
    window = None
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        if isinstance(getattr(config, attr, None), int):
            window = getattr(config, attr)
            break
    return LoadedModel(net, tokenizer, name, window)


def _register_custom(pair: tuple) -> LoadedModel:
    if len(pair) != 2 or not isinstance(pair[0], torch.nn.Module) or not callable(pair[1]):
        raise ModelLoadError("model=(model, tokenizer) needs a torch model and a tokenizer")
    key = ("custom", id(pair[0]), id(pair[1]))  # the registry keeps both alive: ids stay unique
    return _get_or_load(key, lambda: _finish(pair[0], pair[1], "custom"))
