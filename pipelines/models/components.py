"""The parts of one Stable Diffusion 1.x model, as loaded."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from diffusers import AutoencoderKL, AutoencoderTiny, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer


@dataclass
class SDComponents:
    """The three models of SD 1.x plus tokenizer and the model's noise schedule (scheduler config)."""

    tokenizer: CLIPTokenizer
    text_encoder: CLIPTextModel
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    scheduler_config: dict[str, Any]
    name: str = "model"
    model_hash: str | None = None
    source: str = ""
    tiny_decoder: AutoencoderTiny | None = None  # A1111's "VAE type for decode: TAESD" (pipelines.models.tiny_decoder)
    vae_name: str | None = None  # a separate VAE file's name (None: the model's own VAE)
    vae_hash: str | None = None  # its AutoV2 short hash

    def vae_pairs(self) -> dict[str, str]:
        """A1111's infotext pairs for a separate VAE (``VAE hash``, ``VAE``); none for the model's own."""
        if self.vae_name is None:
            return {}
        return {**({"VAE hash": self.vae_hash} if self.vae_hash else {}), "VAE": self.vae_name}
