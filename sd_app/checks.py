"""Checks of command-line options that run before any model loads, so a mistake costs a second, not a
generation: one line naming the option, exit status 2 (``sd-app`` turns the ValueError into that)."""

from __future__ import annotations

import os
from pathlib import Path


def check_output_folder(folder: Path, option: str = "--out") -> None:
    """Create ``folder`` (parents too) and write a probe file in it, so that a folder that cannot be made or
    written (no permission, a read-only filesystem, a pseudo-filesystem like ``/proc``) is found before any
    model loads, not after the work; ValueError naming ``option`` otherwise. The folders it created are removed
    again (the run makes them when it writes), so a run that fails later leaves no empty folder behind."""
    import tempfile

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
    created = [path, *path.parents[: len(path.relative_to(existing).parts) - 1]] if path != existing else []
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ValueError(f"{option} {folder}: cannot create the folder ({error.strerror or error})") from None
    try:
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass  # removed on closing
    except OSError as error:
        raise ValueError(f"{option} {folder}: cannot write files in it ({error.strerror or error})") from None
    finally:
        for made in created:  # innermost first
            try:
                made.rmdir()
            except OSError:
                break  # no longer empty (another process writes there too): keep it and those above


def check_device(device: str | None, option: str = "--device") -> None:
    """``device`` names a device torch has here (cpu, cuda, cuda:N, mps); ValueError naming ``option`` otherwise."""
    if device is None:
        return
    from pipelines.speed.devices import checked_device

    checked_device(device, option)
