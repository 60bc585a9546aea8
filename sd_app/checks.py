"""Checks of command-line options that run before any model loads, so a mistake costs a second, not a
generation: one line naming the option, exit status 2 (``sd-app`` turns the ValueError into that)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipelines.models.network_checks import NetworkChecker
    from sd_app.engine import Engine


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


def check_selected_model(engine: Engine, clip_skip: int) -> tuple[int, NetworkChecker]:
    """What the selected checkpoint's config and the model folders tell before any model loads: ``--model`` and
    ``--vae`` found, and ``clip_skip`` within the text encoder's layers (ValueError naming ``--clip-skip``).
    Returns the layer count (the largest clip skip) and a checker of the LoRAs and embeddings a prompt names
    (``pipelines.models.network_checks``: the folders' listing and the files' headers, no weights read)."""
    from pipelines.generation.prompts import check_clip_skip
    from pipelines.models.loading import text_encoder_layers, text_encoder_width
    from pipelines.models.network_checks import NetworkChecker

    checkpoint = engine.selection()[0]
    layers = text_encoder_layers(checkpoint)
    check_clip_skip(clip_skip, layers, "--clip-skip")
    return layers, NetworkChecker(engine.library(), text_encoder_width(checkpoint))
