"""What ships inside the package: the embedded model, SD 1.x configs and the CLIP tokenizer, so that
nothing is ever downloaded; and reading a model's noise schedule with SD 1.x's as the fallback."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipelines.models.errors import ModelLoadError

PACKAGE_DIR = Path(__file__).resolve().parent.parent
EMBEDDED_MODEL_DIR = PACKAGE_DIR / "embedded" / "shapes-tiny"
SD1_CONFIG_DIR = PACKAGE_DIR / "models" / "configs" / "sd1"
CLIP_TOKENIZER_DIR = PACKAGE_DIR / "models" / "configs" / "clip-tokenizer"


def read_scheduler_config(path: Path) -> dict[str, Any]:
    """The model's noise schedule (scheduler/scheduler_config.json), SD 1.x's when absent.

    A config without ``_class_name`` gets the scheduler class from model_index.json, as diffusers'
    ``from_pretrained`` takes it, so ``sampler_for_config`` names the scheduler the model ships with.
    """
    file = path / "scheduler" / "scheduler_config.json"
    if not file.is_file():
        file = SD1_CONFIG_DIR / "scheduler" / "scheduler_config.json"
    try:
        config = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ModelLoadError(f"{file}: unreadable scheduler config: {error}") from error
    if "_class_name" not in config and file.parent.parent == path:
        try:
            index = json.loads((path / "model_index.json").read_text())
        except (OSError, json.JSONDecodeError):
            index = {}
        entry = index.get("scheduler") if isinstance(index, dict) else None
        if isinstance(entry, list) and len(entry) == 2 and isinstance(entry[1], str):
            config["_class_name"] = entry[1]
    return config
