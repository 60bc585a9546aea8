"""Pieces of the embedded model's training: Min-SNR weights, weight-identified latent caches."""

from __future__ import annotations

import pytest
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


def test_fine_tuned_unet_export_replaces_only_the_unet_of_the_model_it_started_from(tiny_model, tmp_path):
    import json
    import shutil

    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file

    from pipelines.training.export import export_unet_only
    from pipelines.training.unet import freeze_from_model

    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    frozen_provenance = {"clip_run": "runs/clip", "clip_step": 3, "vae_run": "runs/vae", "vae_step": 4}
    (model / "provenance.json").write_text(json.dumps({"unet": {"step": 11}, "frozen": frozen_provenance}))
    run = tmp_path / "run"
    freeze_from_model(model, run / "frozen")
    assert json.loads((run / "frozen" / "state.json").read_text())["unet_step"] == 11
    unet = UNet2DConditionModel.from_pretrained(str(model / "unet"))
    with torch.no_grad():
        for parameter in unet.parameters():
            parameter.add_(0.25)
    unet.save_pretrained(str(run / "ckpt" / "unet_ema"))
    (run / "ckpt" / "state.json").write_text(json.dumps({"step": 5}))
    others = {p: p.read_bytes() for p in model.rglob("*") if p.is_file() and "unet" not in p.parts}

    provenance = export_unet_only(run, model)

    exported = UNet2DConditionModel.from_pretrained(str(model / "unet"))
    for name, tensor in unet.state_dict().items():
        assert torch.equal(exported.state_dict()[name], tensor.half().float()), name
    assert all(p.read_bytes() == data for p, data in others.items() if p.name != "provenance.json")
    assert (provenance["unet"]["step"], provenance["unet_before_fine_tune"]["step"]) == (5, 11)

    vae_file = run / "frozen" / "vae" / "diffusion_pytorch_model.safetensors"
    vae = load_file(str(vae_file))
    first = sorted(vae)[0]
    save_file({**vae, first: vae[first] + 1}, str(vae_file))
    with pytest.raises(SystemExit, match="vae"):
        export_unet_only(run, model)


def test_a_whole_export_keeps_the_parts_trained_against_unchanged_weights(tmp_path):
    import json

    from pipelines.training.export import carry_dependent_parts

    def part(folder, name, value: float, config: str = "{}", metadata: dict | None = None) -> None:
        (folder / name).mkdir(parents=True)
        save_file({"w": torch.full((2, 2), value)}, str(folder / name / "model.safetensors"), metadata=metadata)
        (folder / name / "config.json").write_text(config)

    old, new = tmp_path / "old", tmp_path / "new"
    part(old, "vae", 1.0, '{"_diffusers_version": "0.41"}')
    part(old, "text_encoder", 2.0)
    part(old, "vae_decoder_tiny", 3.0)
    part(old, "clip_preview", 4.0)
    (old / "provenance.json").write_text(json.dumps({"vae_decoder_tiny": {"step": 7}, "clip_preview": {"step": 9}}))
    part(new, "vae", 1.0, '{"_diffusers_version": "0.42"}', {"format": "pt"})  # the same tensors, another writer
    part(new, "text_encoder", 2.5)  # retrained
    provenance: dict = {}
    dropped = carry_dependent_parts(old, new, provenance)
    assert (new / "vae_decoder_tiny" / "model.safetensors").read_bytes() == (
        old / "vae_decoder_tiny" / "model.safetensors").read_bytes()
    assert provenance == {"vae_decoder_tiny": {"step": 7}}
    assert not (new / "clip_preview").exists()
    assert len(dropped) == 1 and "clip_preview/" in dropped[0] and "previous text_encoder/" in dropped[0]


def test_candidate_cache_serves_a_longer_run_and_refuses_other_settings(tmp_path):
    import json

    from PIL import Image

    from pipelines.training.evaluate import CandidateCache

    settings = {"model": "m", "pairs": 96, "candidates": 4, "steps": 20}
    (tmp_path / "manifest.json").write_text(json.dumps(settings))  # as earlier versions wrote it
    CandidateCache(tmp_path, settings).put("fast", 3, 1, Image.new("RGB", (8, 8), (255, 0, 0)))
    longer = CandidateCache(tmp_path, {**settings, "pairs": 192})  # pair 3 is the same prompt and seeds
    assert longer.get("fast", 3, 1).getpixel((0, 0)) == (255, 0, 0)
    assert longer.get("fast", 100, 0) is None
    with pytest.raises(SystemExit, match="choose another"):
        CandidateCache(tmp_path, {**settings, "steps": 8})


def test_lcm_baseline_reads_the_embedded_models_20_step_candidates_and_refuses_others(tmp_path):
    import json

    from PIL import Image

    from pipelines.models.shipped import EMBEDDED_MODEL_DIR
    from pipelines.training.evaluate import CandidateCache
    from pipelines.training.evaluate_lcm import baseline_cache, cached_candidate

    settings = {"model": str(EMBEDDED_MODEL_DIR), "candidates": 4, "steps": 20, "cfg": 7.0,
                "sampler": "DPM++ 2M Uniform", "size": 512}
    CandidateCache(tmp_path, settings).put("taesd", 2, 3, Image.new("RGB", (8, 8), (0, 0, 255)))
    cache = baseline_cache(tmp_path, 20, 7.0, "DPM++ 2M Uniform", 4)
    assert cached_candidate(cache, "TAESD", 2, 3).getpixel((0, 0)) == (0, 0, 255)
    with pytest.raises(SystemExit, match="is missing"):
        cached_candidate(cache, "Full", 2, 3)  # the Full decoder's pictures are the "fast" mode's
    for other in ({"steps": 8}, {"candidates": 2}, {"model": "some/other/model"}, {"sampler": "Euler a"}):
        (tmp_path / "manifest.json").write_text(json.dumps({**settings, **other}))
        with pytest.raises(SystemExit, match="the baseline needs"):
            baseline_cache(tmp_path, 20, 7.0, "DPM++ 2M Uniform", 4)
