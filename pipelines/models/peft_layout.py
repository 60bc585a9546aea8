"""Which folders are PEFT adapters: what ``PeftModel.save_pretrained`` writes, found without reading any tensor.

PEFT (``peft/peft_model.py``, ``save_pretrained``) writes ``adapter_config.json`` (the ``LoraConfig`` as JSON) and
``adapter_model.safetensors`` (keys ``base_model.model.<module path>.lora_A.weight`` / ``.lora_B.weight``) into one
folder per model; training scripts that adapt both SD models save one such folder each under one output folder,
named by the pipeline component (``unet/``, ``text_encoder/``: PEFT's Stable Diffusion DreamBooth example,
invoke-training's multi-model checkpoints). A folder is an adapter when it holds both files itself, or when its
``unet/`` or ``text_encoder/`` does. With ``safe_serialization=False`` PEFT writes ``adapter_model.bin``, a pickle:
such a folder is an adapter that is refused, never opened.
"""

from __future__ import annotations

from pathlib import Path

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_PICKLE = "adapter_model.bin"
MODEL_PREFIX = "base_model.model."  # PeftModel's own prefix, kept in the keys it saves
COMPONENT_FOLDERS = ("unet", "text_encoder")  # the SD 1.x pipeline components an adapter part may be for
OTHER_BASE_FOLDERS = ("text_encoder_1", "text_encoder_2", "transformer")  # SDXL's two text encoders, DiT models


def _holds(folder: Path, weights: str) -> bool:
    return (folder / ADAPTER_CONFIG).is_file() and (folder / weights).is_file()


def adapter_parts(folder: Path) -> dict[str | None, Path]:
    """The adapter folders making up ``folder``: {None: folder} when it holds an adapter itself, else
    {"unet": folder/unet, "text_encoder": folder/text_encoder} for those of its component folders that hold one
    ({} when ``folder`` is no adapter). Pickled adapters (``adapter_model.bin``) count: reading them is refused."""
    for weights in (ADAPTER_WEIGHTS, ADAPTER_PICKLE):
        if _holds(folder, weights):
            return {None: folder}
    parts: dict[str | None, Path] = {}
    for component in (*COMPONENT_FOLDERS, *OTHER_BASE_FOLDERS):
        part = folder / component
        if any(_holds(part, weights) for weights in (ADAPTER_WEIGHTS, ADAPTER_PICKLE)):
            parts[component] = part
    return parts


def is_adapter(folder: Path) -> bool:
    """Whether ``folder`` is a PEFT adapter (itself, or by its ``unet/`` / ``text_encoder/`` folders)."""
    return folder.is_dir() and bool(adapter_parts(folder))


def pickled_part(folder: Path) -> Path | None:
    """The first ``adapter_model.bin`` of an adapter with no ``adapter_model.safetensors`` beside it, or None."""
    for part in adapter_parts(folder).values():
        if not (part / ADAPTER_WEIGHTS).is_file():
            return part / ADAPTER_PICKLE
    return None


def adapter_files(folder: Path) -> list[Path]:
    """Every file an adapter is made of (each part's weights and config), in a fixed order: the U-Net's first."""
    files: list[Path] = []
    for part in adapter_parts(folder).values():
        weights = part / ADAPTER_WEIGHTS
        files += [weights if weights.is_file() else part / ADAPTER_PICKLE, part / ADAPTER_CONFIG]
    return files


def adapter_weights(folder: Path) -> list[Path]:
    """The ``adapter_model.safetensors`` files of an adapter (the U-Net's first)."""
    return [path for path in adapter_files(folder) if path.name == ADAPTER_WEIGHTS]
