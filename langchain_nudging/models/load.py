"""`load_model`: a bundled id, a local transformers folder, a `.gguf` file, a Hugging Face Hub
id, or an already-loaded model, loaded once per process for the same settings (through the
registry)."""

from __future__ import annotations

import os
import socket
import threading
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

    Weights must be safetensors: pickled weights (`pytorch_model.bin`, `*.pt`) can run code
    when loaded and are refused unless `allow_pickle=True`, for a source you trust.
    """
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
    if not isinstance(allow_pickle, bool):
        raise ModelLoadError(f"allow_pickle={_short(repr(allow_pickle), 60)} must be True or False")
    text = os.fspath(model)
    source, hub_gguf, prepare = _resolve_source(text, gguf_file, cache_dir, progress, allow_pickle)
    hub = not source.startswith("bundled:") and not Path(source).is_absolute()
    name = source if hub_gguf is None else f"{source} ({hub_gguf})"

    def load() -> LoadedModel:
        where = prepare()
        options: dict[str, Any] = {
            "gguf_file": hub_gguf, "dtype": torch_dtype, "trust": trust_remote_code,
            "device_map": device_map, "device": None if device_map is not None else placement,
            "progress": progress, "allow_pickle": allow_pickle,
        }  # fmt: skip
        try:
            if hub:
                cached = _cached_hub_weights(source, hub_gguf, allow_pickle)
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
            if isinstance(exc, OSError) and hub:
                raise ModelLoadError(
                    f"model={source!r} is neither a local path nor reachable on the Hugging Face "
                    f"Hub ({_short(exc)}); bundled models: " + ", ".join(_BUNDLED)
                ) from exc
            raise ModelLoadError(f"could not load model {name!r}: {_short(exc)}") from exc
        return _finish(net, tokenizer, name)

    key = (source, hub_gguf, str(torch_dtype), placement, trust_remote_code, allow_pickle)
    return _get_or_load(key, load)


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
    allow_pickle: bool = False,
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
    if not _in_hub_cache(text, gguf_file) and (reason := _hub_unreachable()):
        raise _hub_error(text, reason, "not in the Hugging Face cache")
    return text, gguf_file, lambda: text


def _valid_hub_id(text: str) -> bool:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(text)
    except HFValidationError:
        return False
    return True


def _in_hub_cache(repo_id: str, gguf_file: str | None) -> bool:
    """Whether the local Hugging Face cache holds the repo's config (or its GGUF file)."""
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id, gguf_file or "config.json")
    except Exception:  # a malformed cache entry counts as absent
        return False
    return isinstance(found, str)


_SAFE_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
_PICKLED_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")


def _cached_hub_weights(repo_id: str, gguf_file: str | None, allow_pickle: bool) -> bool | None:
    """Whether the Hugging Face cache holds weights of the repo that may be loaded: `None` when
    it holds only pickled ones and `allow_pickle` is off."""
    if gguf_file:
        return _in_hub_cache(repo_id, gguf_file)
    if any(_in_hub_cache(repo_id, name) for name in _SAFE_WEIGHTS):
        return True
    if any(_in_hub_cache(repo_id, name) for name in _PICKLED_WEIGHTS):
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


def _hub_error(repo_id: str, reason: str, cached: str) -> ModelLoadError:
    return ModelLoadError(
        f"model={repo_id!r} is neither a local path nor reachable on the Hugging Face Hub: it is "
        f"not a local folder or file, it is {cached}, and the Hub cannot be reached ({reason}); "
        f"check the spelling, or download it while online; bundled models: " + ", ".join(_BUNDLED)
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
    local_files_only: bool = False,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:  # fmt: skip
    """`from_pretrained` for the model and its tokenizer (tests wrap this to count loads).

    Weights load from safetensors only unless `allow_pickle`; `local_files_only` never touches
    the network."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    extra: dict[str, Any] = {"gguf_file": gguf_file} if gguf_file else {}
    if local_files_only:
        extra["local_files_only"] = True
    with _transformers_bars(progress):
        tokenizer = AutoTokenizer.from_pretrained(where, trust_remote_code=trust, **extra)
        if device_map is not None:
            extra["device_map"] = device_map
        if not gguf_file and not allow_pickle:
            extra["use_safetensors"] = True
        net = AutoModelForCausalLM.from_pretrained(
            where, dtype=dtype, trust_remote_code=trust, **extra
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
