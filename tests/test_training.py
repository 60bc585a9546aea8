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


def test_lora_trainer_layers_save_a_kohya_file_our_merge_reproduces(tiny_model, tmp_path):
    """What the trainer's LoRA layers compute (base + up(down(x)) * alpha / rank) is what merging its saved
    kohya file into the plain model computes."""
    import copy

    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    from pipelines.generation.extra_networks import NetworkTag
    from pipelines.models.library import ModelLibrary
    from pipelines.models.loading import load_pipeline
    from pipelines.speed.options import SpeedOptions
    from pipelines.training.lora import TE_TARGETS, UNET_TARGETS, inject, lora_state

    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_pretrained(tiny_model, subfolder="unet")
    text_encoder = CLIPTextModel.from_pretrained(tiny_model, subfolder="text_encoder")
    trained_unet, trained_te = copy.deepcopy(unet), copy.deepcopy(text_encoder)
    layers = inject(trained_unet, "unet", UNET_TARGETS, rank=4, conv_rank=2, alpha=2.0)
    layers.update(inject(trained_te, "text_encoder", TE_TARGETS, rank=4, conv_rank=0, alpha=2.0))
    ids = torch.tensor([[49406, 320, 736, 49407] + [49407] * 73])
    latents, t = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([500])
    with torch.no_grad():
        assert torch.equal(trained_te(ids)[0], text_encoder(ids)[0])  # up starts at zero: the base model
        torch.manual_seed(0)
        for layer in layers.values():
            layer.up.weight.normal_(0, 0.05)  # as if trained
        states = trained_te(ids)[0]
        expected = trained_unet(latents, t, encoder_hidden_states=states).sample
    assert any(k.startswith("lora_te_text_model_encoder_layers_0_self_attn_q_proj.") for k in lora_state(layers))
    assert any(k.startswith("lora_unet_down_blocks_0_resnets_0_conv1.") for k in lora_state(layers))  # LoCon
    (tmp_path / "Lora").mkdir()
    save_file(lora_state(layers), str(tmp_path / "Lora" / "trained.safetensors"))
    pipe = load_pipeline(tiny_model, device="cpu", dtype=torch.float32, library=ModelLibrary([tmp_path], shipped=False),
                         speed=SpeedOptions(channels_last=False))  # the trainer's memory format: same float sums
    pipe.extra_networks.activate([NetworkTag("trained")])
    c = pipe.components
    with torch.no_grad():
        merged = c.unet(latents, t, encoder_hidden_states=c.text_encoder(ids)[0]).sample
    assert torch.allclose(merged, expected, atol=1e-4), (merged - expected).abs().max()
    with torch.no_grad():
        base = unet(latents, t, encoder_hidden_states=text_encoder(ids)[0]).sample
    assert not torch.allclose(merged, base, atol=1e-2)  # the LoRA does change the output
