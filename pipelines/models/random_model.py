"""Randomly initialised SD-shaped models, saved in diffusers layout, for tests and benchmarks.

``write_random_model(SD1_CONFIG_DIR, out)`` gives a model with SD 1.5's exact shapes (860M-parameter
U-Net) whose timings reflect the real thing; tests pass small configs of the same topology.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from pipelines.models.shipped import CLIP_TOKENIZER_DIR


def write_config_dir(out: Path, unet: dict[str, Any], vae: dict[str, Any], text_encoder: dict[str, Any]) -> Path:
    """A diffusers config folder (no weights) from config dicts; SD 1.x scheduler and tokenizer."""
    from pipelines.models.shipped import SD1_CONFIG_DIR

    out.mkdir(parents=True, exist_ok=True)
    for name, config in (("unet", unet), ("vae", vae), ("text_encoder", text_encoder)):
        (out / name).mkdir(exist_ok=True)
        (out / name / "config.json").write_text(json.dumps(config, indent=2))
    shutil.copytree(SD1_CONFIG_DIR / "scheduler", out / "scheduler", dirs_exist_ok=True)
    shutil.copy(SD1_CONFIG_DIR / "model_index.json", out / "model_index.json")
    return out


def write_random_model(config_dir: Path, out: Path, seed: int = 0) -> Path:
    """Instantiate the configs in ``config_dir`` with seeded random weights and save a diffusers folder."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    out.mkdir(parents=True, exist_ok=True)
    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(config_dir / "unet"))
    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(config_dir / "vae"))
    text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(config_dir / "text_encoder"))
    unet.save_pretrained(out / "unet", safe_serialization=True)
    vae.save_pretrained(out / "vae", safe_serialization=True)
    text_encoder.save_pretrained(out / "text_encoder", safe_serialization=True)
    shutil.copytree(CLIP_TOKENIZER_DIR, out / "tokenizer", dirs_exist_ok=True)
    shutil.copytree(config_dir / "scheduler", out / "scheduler", dirs_exist_ok=True)
    shutil.copy(config_dir / "model_index.json", out / "model_index.json")
    return out
