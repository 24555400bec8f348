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
    """`path` if it is a whole GGUF file: its header reads to the end and every tensor's data lies
    inside the file; else a `ModelLoadError` naming the file (and, for a truncated one, the
    sizes). Reads the header only; a file already checked unchanged is not read again."""
    if not path.is_file():
        raise ModelLoadError(f"GGUF file {str(path)!r} does not exist")
    with path.open("rb") as handle:
        if handle.read(4) != b"GGUF":
            raise ModelLoadError(
                f"{str(path)!r} is not a GGUF file (it does not start with b'GGUF'); "
                f"pass {_SOURCES_HELP}"
            )
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key not in _checked_ggufs:
        _check_gguf_layout(path, stat.st_size)
        _checked_ggufs.add(key)
    return path


_checked_ggufs: set[tuple[str, int, int]] = set()

# GGUF metadata value types (gguf.constants.GGUFValueType) of a fixed size, by struct code.
_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q",
                 11: "q", 12: "d"}  # fmt: skip
_GGUF_STRING, _GGUF_ARRAY = 8, 9
_GGUF_DEFAULT_ALIGNMENT = 32


class _TruncatedError(Exception):
    """The GGUF header runs past the end of the file."""


class _CorruptError(Exception):
    """The GGUF header holds something no writer writes."""


class _HeaderReader:
    """Reads a GGUF header from a memory map, little- or big-endian."""

    def __init__(self, data: Any, order: str) -> None:
        self.data, self.order, self.at = data, order, 0

    def take(self, code: str, count: int = 1) -> tuple[Any, ...]:
        import struct

        fmt = f"{self.order}{count}{code}"
        size = struct.calcsize(fmt)
        if self.at + size > len(self.data):
            raise _TruncatedError
        values = struct.unpack_from(fmt, self.data, self.at)
        self.at += size
        return values

    def skip(self, size: int) -> None:
        if self.at + size > len(self.data):
            raise _TruncatedError
        self.at += size

    def string(self) -> bytes:
        (length,) = self.take("Q")
        start = self.at
        self.skip(length)
        return bytes(self.data[start : self.at])

    def value(self, kind: int) -> Any:
        """One metadata value; arrays are skipped (``None``)."""
        if kind in _GGUF_SCALARS:
            return self.take(_GGUF_SCALARS[kind])[0]
        if kind == _GGUF_STRING:
            return self.string()
        if kind != _GGUF_ARRAY:
            raise _CorruptError(f"unknown metadata value type {kind}")
        item, count = self.take("I")[0], self.take("Q")[0]
        if item in _GGUF_SCALARS:
            import struct

            self.skip(count * struct.calcsize(self.order + _GGUF_SCALARS[item]))
        elif item == _GGUF_STRING:  # a vocabulary: up to hundreds of thousands of strings
            import struct

            length = struct.Struct(f"{self.order}Q").unpack_from
            data, at, end = self.data, self.at, len(self.data)
            for _ in range(count):
                if at + 8 > end:
                    raise _TruncatedError
                at += 8 + length(data, at)[0]
            if at > end:
                raise _TruncatedError
            self.at = at
        else:
            for _ in range(count):
                self.value(item)
        return None


def _check_gguf_layout(path: Path, size: int) -> None:
    """Raise a `ModelLoadError` when the file at `path` (of `size` bytes) ends before its header
    or its tensors' data do (an interrupted download or copy), or its header is malformed."""
    import mmap

    with path.open("rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
        try:
            need, tensors = _gguf_extent(data)
        except _TruncatedError:
            raise ModelLoadError(
                f"GGUF file {str(path)!r} is truncated: it ends ({_bytes(size)}) inside its own "
                "header; download or copy it again"
            ) from None
        except _CorruptError as exc:
            raise ModelLoadError(
                f"GGUF file {str(path)!r} is corrupt ({exc}); download or copy it again"
            ) from None
    if need > size:
        raise ModelLoadError(
            f"GGUF file {str(path)!r} is truncated: its header describes {tensors} tensors "
            f"whose data end at byte {need:,} ({_bytes(need)}), but the file holds {size:,} "
            f"bytes ({_bytes(size)}); download or copy it again"
        )


def _gguf_extent(data: Any) -> tuple[int, int]:
    """`(bytes the file must hold, tensor count)` by its GGUF header."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    order = "<"
    (version,) = _HeaderReader(data[4:8], "<").take("I")
    if version & 0xFFFF == 0:  # a big-endian file read as little-endian
        order = ">"
    reader = _HeaderReader(data, order)
    reader.skip(4)
    (version,) = reader.take("I")
    if version not in (2, 3):
        raise _CorruptError(f"GGUF version {version}; versions 2 and 3 are supported")
    tensor_count, kv_count = reader.take("Q", 2)
    if tensor_count > len(data) or kv_count > len(data):  # each needs a few bytes at least
        raise _TruncatedError
    alignment = _GGUF_DEFAULT_ALIGNMENT
    for _ in range(kv_count):
        key = reader.string()
        (kind,) = reader.take("I")
        value = reader.value(kind)
        if key == b"general.alignment" and isinstance(value, int):
            if value <= 0 or value & (value - 1):
                raise _CorruptError(f"general.alignment {value} is not a power of two")
            alignment = value
    extents = []
    for _ in range(tensor_count):
        name = reader.string()
        (n_dims,) = reader.take("I")
        if n_dims > 8:
            raise _CorruptError(f"tensor {name.decode(errors='replace')!r} has {n_dims} dimensions")
        dims = reader.take("Q", n_dims)
        kind, offset = reader.take("I")[0], reader.take("Q")[0]
        try:
            block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(kind)]
        except (ValueError, KeyError):
            continue  # a type this gguf package does not know: the loader reports it
        elements = 1
        for dim in dims:
            elements *= dim
        extents.append(offset + elements // block * type_size)
    start = -(-reader.at // alignment) * alignment  # the tensor data begin aligned
    return start + max(extents, default=0), tensor_count


def _bytes(size: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} bytes"


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
