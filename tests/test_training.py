"""Pieces of the embedded model's training: Min-SNR weights, weight-identified latent caches."""

from __future__ import annotations

import torch
from safetensors.torch import save_file

from pipelines.training.unet import SCHEDULE, min_snr_weights, weights_id


def test_min_snr_weights_cap_only_the_low_noise_steps():
    from diffusers import DDPMScheduler

    alphas = DDPMScheduler(**SCHEDULE).alphas_cumprod
    t = torch.tensor([0, 50, 500, 999])
    snr = alphas[t] / (1 - alphas[t])
    weights = min_snr_weights(alphas, t, gamma=5.0)
    assert torch.allclose(weights, torch.where(snr > 5, 5 / snr, torch.ones_like(snr)))
    assert weights[0] < 0.01 and weights[-1] == 1.0  # t=0 is almost noise-free: nearly no weight
    assert torch.equal(min_snr_weights(alphas, t, gamma=0.0), torch.ones(4))


def test_weights_id_names_the_exact_weights(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for folder, value in ((a, 1.0), (b, 2.0)):
        folder.mkdir()
        save_file({"w": torch.full((3,), value)}, str(folder / "diffusion_pytorch_model.safetensors"))
    assert weights_id(a) == weights_id(a) and weights_id(a) != weights_id(b) and len(weights_id(a)) == 10
