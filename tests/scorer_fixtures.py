"""Small preference-scorer files in the real formats: LAION's aesthetic head (its key names, any widths)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

LAION_WIDTHS = (768, 1024, 128, 64, 16, 1)  # sac+logos+ava1-l14-linearMSE
TINY_WIDTHS = (16, 32, 8, 8, 4, 1)  # on the tiny test CLIP's 16-wide projection


def laion_head_state(widths: tuple[int, ...] = TINY_WIDTHS, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights under LAION's key names: layers.0/2/4/6/7 Linear (1/3/5 are Dropouts)."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for index, (fan_in, fan_out) in zip((0, 2, 4, 6, 7), zip(widths, widths[1:]), strict=True):
        state[f"layers.{index}.weight"] = torch.randn(fan_out, fan_in, generator=generator) / fan_in**0.5
        state[f"layers.{index}.bias"] = torch.randn(fan_out, generator=generator) * 0.1
    return state


def write_aesthetic_head(path: Path, widths: tuple[int, ...] = TINY_WIDTHS, seed: int = 0) -> Path:
    save_file(laion_head_state(widths, seed), str(path))
    return path
