"""Which device a model runs on: a name torch knows and a device this machine has, checked before loading."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

FLOAT_DTYPES = ("float32", "float16", "bfloat16")  # what the U-Net, VAE and CLIP run in


def checked_device(device: str | torch.device, argument: str = "device") -> str:
    """``device`` (``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"mps"`` or a ``torch.device``) as a string, if this
    machine has it; ValueError naming ``argument`` and the value otherwise."""
    import torch

    if not isinstance(device, (str, torch.device)):
        raise ValueError(f"{argument} must be a string such as 'cpu' or 'cuda', or a torch.device, got {device!r}")
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        raise ValueError(f"{argument} {device!r}: not a device; use cpu, cuda, cuda:N or mps") from None
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"{argument} {device}: no CUDA device is available on this machine; use cpu")
        if parsed.index is not None and parsed.index >= count:
            raise ValueError(
                f"{argument} {device}: this machine has {count} CUDA device(s) (cuda:0..cuda:{count - 1})"
            )
    elif parsed.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"{argument} {device}: Apple's MPS is not available on this machine; use cpu")
    elif parsed.type != "cpu":
        raise ValueError(f"{argument} {device}: sd-app runs on cpu, cuda or mps")
    return str(parsed)


def checked_float_dtype(dtype: object, argument: str = "dtype") -> torch.dtype:
    """``dtype`` if it is torch.float32, torch.float16 or torch.bfloat16; ValueError naming ``argument``
    otherwise (a string such as ``"float16"`` gets the torch name to use)."""
    import torch

    allowed = ", ".join(f"torch.{name}" for name in FLOAT_DTYPES)
    if isinstance(dtype, str) and dtype.removeprefix("torch.") in FLOAT_DTYPES:
        raise ValueError(f"{argument} must be a torch.dtype, got the string {dtype!r}; "
                         f"use torch.{dtype.removeprefix('torch.')}")
    if not isinstance(dtype, torch.dtype) or str(dtype).removeprefix("torch.") not in FLOAT_DTYPES:
        raise ValueError(f"{argument} must be one of {allowed}, got {dtype!r}")
    return dtype
