"""GGUF conversion, and the cache it writes into.

transformers dequantises a GGUF file on every load (tens of seconds), so GGUF files are converted
once into a safetensors folder under `cache_dir()`, which then loads in a few seconds. Conversions
are atomic: written into a temporary sibling folder and renamed into place, so an interrupted run
never leaves a half-written model behind, and the next run cleans up and starts over.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

try:
    import fcntl
except ImportError:  # Windows: conversions are then only serialised within one process
    fcntl = None  # type: ignore[assignment]

from .registry import _SOURCES_HELP, ModelLoadError, _short

CACHE_ENV_VAR = "LANGCHAIN_NUDGING_CACHE"
_CONVERSION_FORMAT = 1  # bump when converted folders change: older ones are then ignored
_MARKER = "langchain_nudging_conversion.json"  # written last: a folder without it is unfinished
_CONVERT_STAGES = ["dequantise weights", "read tokenizer", "write safetensors", "finish"]


def cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where converted models live: the argument, else `$LANGCHAIN_NUDGING_CACHE`, else the
    platform's user cache folder for `langchain-nudging`."""
    chosen = cache_dir if cache_dir is not None else os.environ.get(CACHE_ENV_VAR)
    if chosen:
        return Path(chosen).expanduser().absolute()
    import platformdirs

    return Path(platformdirs.user_cache_dir("langchain-nudging"))


_cache_root = cache_dir  # `load_model` and `bundled_model_dir` have a parameter of that name


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
        net.hf_quantizer = None  # type: ignore[assignment]  # nn.Module's __setattr__ typing
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
