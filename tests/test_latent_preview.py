"""Latent -> RGB previews: shapes, the SD 1.x map, and fitting a map for any VAE."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from pipelines.generation.previews import (
    SD1_LATENT_RGB,
    LatentRGBProjection,
    calibration_images,
    fit_latent_rgb_projection,
    preview,
    projection_for_vae,
)
from tests.clip_fixtures import torch_threads


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with torch_threads(1):
        yield


def test_preview_shapes_and_range():
    latents = torch.randn(3, 4, 64, 64)  # SD 1.x: 512x512 image
    images = preview(latents)
    assert len(images) == 3 and images[0].size == (64, 64) and images[0].mode == "RGB"
    small = preview(torch.randn(2, 4, 8, 12), size=48)
    assert [im.size for im in small] == [(48, 32), (48, 32)]


def test_preview_rejects_wrong_channels():
    with pytest.raises(ValueError, match=r"\[B, 4, h, w\]"):
        preview(torch.randn(1, 3, 8, 8))


def test_sd1_projection_is_linear_with_zero_bias():
    latents = torch.randn(1, 4, 2, 2)
    rgb = SD1_LATENT_RGB.apply(latents)
    expected = torch.einsum("bchw,cr->brhw", latents, torch.tensor(SD1_LATENT_RGB.weight))
    torch.testing.assert_close(rgb, expected)


class LinearVAE(torch.nn.Module):
    """Stands in for AutoencoderKL: 8x8 average pool, then a known invertible colour mix."""

    def __init__(self):
        super().__init__()
        self.mix = torch.nn.Parameter(
            torch.tensor([[1.0, 0.2, 0.0, 0.5], [0.0, 1.0, 0.3, -0.5], [0.4, 0.0, 1.0, 0.5]])
        )  # [3, 4]
        self.config = SimpleNamespace(scaling_factor=0.5, shift_factor=None)

    def encode(self, x):
        pooled = torch.nn.functional.avg_pool2d(x, 8)  # [B, 3, h, w]
        mean = torch.einsum("brhw,rc->bchw", pooled, self.mix) + 0.1  # [B, 4, h, w]
        return SimpleNamespace(latent_dist=SimpleNamespace(mean=mean))


def test_fit_recovers_a_linear_vae():
    vae = LinearVAE()
    projection = fit_latent_rgb_projection(vae)
    assert projection.channels == 4
    images = calibration_images(4, 32, seed=1)  # [4, 3, 32, 32], unseen colours
    latents = vae.encode(images).latent_dist.mean * 0.5  # [4, 4, 4, 4]
    rgb = projection.apply(latents)
    target = torch.nn.functional.avg_pool2d(images, 8)
    torch.testing.assert_close(rgb, target, atol=1e-4, rtol=0)


def test_fit_runs_on_a_diffusers_vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=(16, 16, 16, 16),
        layers_per_block=1,
        norm_num_groups=8,
        latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
    ).eval()
    projection = projection_for_vae(vae, n_images=10, size=32)  # not the SD 1.x VAE: fitted
    assert projection is not SD1_LATENT_RGB
    assert isinstance(projection, LatentRGBProjection)
    assert len(projection.weight) == 4 and len(projection.bias) == 3
    images = preview(torch.randn(1, 4, 4, 4), projection)
    assert images[0].size == (4, 4)


def test_projection_for_sd1_vae_uses_known_coefficients():
    sd1 = SimpleNamespace(
        config=SimpleNamespace(
            latent_channels=4, scaling_factor=0.18215, block_out_channels=[128, 256, 512, 512]
        )
    )
    assert projection_for_vae(sd1) is SD1_LATENT_RGB
