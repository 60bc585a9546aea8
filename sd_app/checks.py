"""Checks of command-line options that run before any model loads, so a mistake costs a second, not a
generation: one line naming the option, exit status 2 (``sd-app`` turns the ValueError into that)."""

from __future__ import annotations

import os
from pathlib import Path


def check_output_folder(folder: Path, option: str = "--out") -> None:
    """``folder`` is a folder we can write in, or can be created where we can write; ValueError otherwise."""
    path = Path(folder).expanduser()
    if path.exists() and not path.is_dir():
        raise ValueError(f"{option} {folder}: exists and is not a folder")
    existing = path
    while not existing.exists():  # the nearest existing ancestor must let us create the rest
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"{option} {folder}: {existing} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{option} {folder}: no permission to write in {existing}")


def check_device(device: str | None, option: str = "--device") -> None:
    """``device`` names a device torch has here (cpu, cuda, cuda:N, mps); ValueError otherwise."""
    if device is None:
        return
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        raise ValueError(f"{option} {device!r}: not a device; use cpu, cuda, cuda:N or mps") from None
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"{option} {device}: no CUDA device is available on this machine; use cpu")
        if parsed.index is not None and parsed.index >= count:
            raise ValueError(f"{option} {device}: this machine has {count} CUDA device(s) (cuda:0..cuda:{count - 1})")
    elif parsed.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"{option} {device}: Apple's MPS is not available on this machine; use cpu")
    elif parsed.type != "cpu":
        raise ValueError(f"{option} {device}: sd-app runs on cpu, cuda or mps")
