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
    """``device`` names a device torch has here (cpu, cuda, cuda:N, mps); ValueError naming ``option`` otherwise."""
    if device is None:
        return
    from pipelines.speed.devices import checked_device

    checked_device(device, option)
