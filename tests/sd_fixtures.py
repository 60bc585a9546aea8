"""Tiny SD 1.x-topology models (same block layout as SD 1.5, a few channels wide) for fast tests."""

from __future__ import annotations

from pathlib import Path

from pipelines.models.random_model import write_config_dir, write_random_model

TINY_UNET = {
    "_class_name": "UNet2DConditionModel",
    "block_out_channels": [32, 32, 64, 64],
    "layers_per_block": 2,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "cross_attention_dim": 32,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
    "in_channels": 4,
    "out_channels": 4,
    "sample_size": 8,
}
TINY_VAE = {
    "_class_name": "AutoencoderKL",
    "block_out_channels": [32, 32, 32, 32],
    "layers_per_block": 1,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 64,
    "scaling_factor": 0.5,
}
TINY_TEXT = {
    "architectures": ["CLIPTextModel"],
    "model_type": "clip_text_model",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "max_position_embeddings": 77,
    "vocab_size": 49408,
    "bos_token_id": 49406,
    "eos_token_id": 49407,
    "pad_token_id": 49407,
    "hidden_act": "quick_gelu",
}


def tiny_config_dir(root: Path) -> Path:
    return write_config_dir(root / "tiny-config", TINY_UNET, TINY_VAE, TINY_TEXT)


def tiny_model_dir(root: Path, seed: int = 0) -> Path:
    return write_random_model(tiny_config_dir(root), root / "tiny-sd", seed=seed)


def tiny_inpainting_model_dir(root: Path, seed: int = 1) -> Path:
    """The tiny model with an SD inpainting U-Net: 9 input channels (latents, mask, masked-image latents)."""
    config = write_config_dir(root / "tiny-inpainting-config", {**TINY_UNET, "in_channels": 9}, TINY_VAE, TINY_TEXT)
    return write_random_model(config, root / "tiny-sd-inpainting", seed=seed)
