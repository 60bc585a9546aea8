"""Model loading errors, and the refusal of pickle-based weight files (they can run code when loaded)."""

from __future__ import annotations

from pathlib import Path

PICKLE_SUFFIXES = {".ckpt", ".bin", ".pt", ".pth", ".pkl", ".pickle"}


class ModelLoadError(ValueError):
    """A model could not be loaded; the message names the file or folder and what to do."""


class ModelNotFound(ModelLoadError):
    """No model file of that name (or the name is ambiguous) in the model folders."""


class IncompatibleModel(ModelLoadError):
    """A LoRA or embedding made for another base model (SD 2.x, SDXL) or width."""


def refuse_pickle(path: Path) -> None:
    """Raise for pickle-based weight files, which can run arbitrary code when loaded."""
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise ModelLoadError(
            f"{path}: '{path.suffix}' files are Python pickles and are never loaded (they can run code). "
            "Convert it to .safetensors first, e.g. with the safetensors convert tool "
            "(https://huggingface.co/spaces/safetensors/convert) on a trusted machine."
        )
