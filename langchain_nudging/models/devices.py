"""Where a model runs: the device and the dtype a load asks for, validated."""

from __future__ import annotations

import torch

from .registry import ModelLoadError, _short

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
