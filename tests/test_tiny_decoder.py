"""Tiny VAE decoders (TAESD): both file layouts load, the right one is found, and a request chooses it."""

from __future__ import annotations

import copy
import shutil

import numpy as np
import pytest
import torch
from diffusers.models.autoencoders.autoencoder_tiny import AutoencoderTiny
from safetensors.torch import save_file

from pipelines.generation.request import GenerationRequest
from pipelines.models.errors import ModelLoadError
from pipelines.models.loading import load_pipeline
from pipelines.models.tiny_decoder import (
    MODEL_SUBFOLDER,
    TAESD_CONFIG,
    TAESD_DECODER_FILE,
    find_tiny_decoder,
    load_tiny_decoder,
    save_tiny_decoder,
)

SMALL = {**TAESD_CONFIG, "decoder_block_out_channels": [8, 8, 8, 8], "num_decoder_blocks": [1, 1, 1, 0],
         "encoder_block_out_channels": [8, 8, 8, 8], "num_encoder_blocks": [1, 1, 1, 1]}


def random_tiny(config: dict, seed: int) -> AutoencoderTiny:
    torch.manual_seed(seed)
    return AutoencoderTiny.from_config(config).eval()


def taesd_layout(model: AutoencoderTiny) -> dict[str, torch.Tensor]:
    """The decoder's weights keyed as TAESD's own nn.Sequential (index 0 is its clamp)."""
    out = {}
    for key, value in model.decoder.state_dict().items():
        index, rest = key.removeprefix("layers.").split(".", 1)
        out[f"{int(index) + 1}.{rest}"] = value.contiguous()
    return out


def test_taesd_file_in_its_published_layout_decodes_as_the_module_it_came_from(tmp_path):
    source = random_tiny(TAESD_CONFIG, seed=3)
    path = tmp_path / TAESD_DECODER_FILE
    save_file(taesd_layout(source), str(path))
    assert "1.weight" in taesd_layout(source) and "3.conv.0.weight" in taesd_layout(source)  # TAESD's names
    loaded = load_tiny_decoder(path, torch.float32)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))  # [1, 4, h, w]
    with torch.no_grad():
        assert torch.equal(loaded.decode(latents).sample, source.decode(latents).sample)  # [1, 3, 8h, 8w]


def test_bad_tiny_decoder_files_get_a_clear_error(tmp_path):
    source = random_tiny(TAESD_CONFIG, seed=3)
    wrong_keys = tmp_path / "other.safetensors"
    save_file({f"decoder.{k}": v for k, v in taesd_layout(source).items()}, str(wrong_keys))
    with pytest.raises(ModelLoadError, match="not a TAESD decoder key"):
        load_tiny_decoder(wrong_keys, torch.float32)
    narrow = tmp_path / "narrow.safetensors"  # a decoder of another width in TAESD's file layout
    save_file(taesd_layout(random_tiny(SMALL, seed=1)), str(narrow))
    with pytest.raises(ModelLoadError, match="narrow.safetensors"):
        load_tiny_decoder(narrow, torch.float32)
    pickle = tmp_path / "taesd_decoder.pth"
    pickle.write_bytes(b"not read")
    with pytest.raises(ModelLoadError, match="pickles"):
        load_tiny_decoder(pickle, torch.float32)
    folder = save_tiny_decoder(random_tiny(SMALL, seed=1), tmp_path / "no-config")
    (folder / "config.json").unlink()
    with pytest.raises(ModelLoadError, match="config.json"):
        load_tiny_decoder(folder, torch.float32)


def test_a_model_folders_own_decoder_comes_first_then_taesd_for_sd_latents_only(tmp_path):
    model = tmp_path / "model"
    root = tmp_path / "models"
    (root / "vae_approx").mkdir(parents=True)
    (root / "vae_approx" / TAESD_DECODER_FILE).write_bytes(b"")
    assert find_tiny_decoder(model, [root], 0.18215) == root / "vae_approx" / TAESD_DECODER_FILE  # ComfyUI's folder
    (root / "VAE-approx").mkdir()
    (root / "VAE-approx" / TAESD_DECODER_FILE).write_bytes(b"")
    assert find_tiny_decoder(model, [root], 0.18215) == root / "VAE-approx" / TAESD_DECODER_FILE  # A1111's first
    assert find_tiny_decoder(model, [root], 0.6222) is None  # another latent space: TAESD would draw nonsense
    save_tiny_decoder(random_tiny(SMALL, seed=1), model / MODEL_SUBFOLDER)
    assert find_tiny_decoder(model, [root], 0.18215) == model / MODEL_SUBFOLDER
    assert find_tiny_decoder(model, [root], 0.6222) == model / MODEL_SUBFOLDER


@pytest.fixture(scope="module")
def model_with_tiny_decoder(tiny_model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("with-tiny") / "tiny-sd"
    shutil.copytree(tiny_model, folder)
    source = random_tiny(SMALL, seed=5)
    save_tiny_decoder(source, folder / MODEL_SUBFOLDER)
    return folder, source


def test_a_request_for_taesd_decodes_with_the_models_tiny_decoder(model_with_tiny_decoder):
    folder, source = model_with_tiny_decoder
    pipe = load_pipeline(folder, device="cpu", dtype=torch.float32)
    request = GenerationRequest(prompt="a red circle", seed=4, steps=2, width=64, height=64, vae_decoder="TAESD")
    with pipe.generating():
        run, _ = pipe.start(request)
        latents = run.run()  # [1, 4, 8, 8]
    with torch.no_grad():
        expected = copy.deepcopy(source).half().float().decode(latents).sample  # the saved fp16 weights, in fp32
    expected = ((expected / 2 + 0.5).clamp(0, 1)[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    tiny = np.asarray(pipe(request).images[0])
    full = np.asarray(pipe(GenerationRequest(**{**request.to_dict(), "vae_decoder": "Full"})).images[0])
    assert tiny.shape == full.shape == (64, 64, 3)
    assert np.abs(tiny.astype(int) - expected.astype(int)).max() <= 1  # rounding of the 8-bit conversion
    assert not np.array_equal(tiny, full)  # the full VAE decoder gives another picture


def test_taesd_without_a_tiny_decoder_is_refused_before_any_step(tiny_pipe):
    steps = []
    request = GenerationRequest(prompt="a red circle", seed=1, steps=2, width=64, height=64, vae_decoder="taesd")
    assert request.vae_decoder == "TAESD"  # A1111's name, any case
    with pytest.raises(ValueError, match="has no tiny decoder.*VAE-approx"):
        tiny_pipe(request, on_step=steps.append)
    assert steps == []


def test_vae_decoder_is_validated_and_kept_out_of_settings_at_its_default():
    with pytest.raises(ValueError, match="vae_decoder must be one of Full, TAESD, got 'fast'"):
        GenerationRequest(vae_decoder="fast")
    assert "vae_decoder" not in GenerationRequest().to_dict()  # batch job ids of earlier runs stay
    assert GenerationRequest(vae_decoder="TAESD").to_dict()["vae_decoder"] == "TAESD"


def test_png_parameters_and_http_overrides_carry_the_decoder():
    from sd_app.api import Txt2ImgRequest, to_generation_request
    from sd_app.metadata import format_parameters, parse_parameters, request_from_parameters

    request = GenerationRequest(prompt="a red circle", seed=3, vae_decoder="TAESD")
    text = format_parameters(request, 3, model_name="m")
    assert "VAE Decoder: TAESD" in text  # A1111's infotext key
    assert request_from_parameters(parse_parameters(text)).vae_decoder == "TAESD"
    assert "VAE Decoder" not in format_parameters(GenerationRequest(prompt="a", seed=3), 3, model_name="m")
    body = Txt2ImgRequest(prompt="a", override_settings={"sd_vae_decode_method": "TAESD"})
    assert to_generation_request(body).vae_decoder == "TAESD"
    assert to_generation_request(Txt2ImgRequest(prompt="a"), vae_decoder="TAESD").vae_decoder == "TAESD"  # default
    with pytest.raises(ValueError, match="sd_vae_decode_method must be one of Full, TAESD"):
        to_generation_request(Txt2ImgRequest(prompt="a", override_settings={"sd_vae_decode_method": "Fast"}))


def test_options_take_the_decoder_in_any_case_as_a_request_does():
    from sd_app.a1111_fields import check_options

    assert GenerationRequest(prompt="a", vae_decoder=" taesd").vae_decoder == "TAESD"
    assert check_options({"sd_vae_decode_method": "taesd"}, "options") == {"sd_vae_decode_method": "TAESD"}
    assert check_options({"sd_vae_decode_method": "FULL"}, "options") == {"sd_vae_decode_method": "Full"}
    with pytest.raises(ValueError, match="must be one of Full, TAESD, got 'fast'"):
        check_options({"sd_vae_decode_method": "fast"}, "options")


def test_trainer_starts_from_a_tiny_decoder_folder_and_scores_it_against_the_vae_pictures(tmp_path):
    from pipelines.training.common import Runtime
    from pipelines.training.generated_latents import generated_set
    from pipelines.training.tiny_decoder import generated_psnr, initial_decoder

    source = random_tiny(SMALL, seed=5)
    folder = save_tiny_decoder(source, tmp_path / MODEL_SUBFOLDER)
    start = initial_decoder(folder)  # trainable, every decoder weight from the folder (fp16 there)
    assert all(p.requires_grad for p in start.decoder.parameters())
    latents = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(1))  # (N, 4, h, w)
    with torch.no_grad():
        pictures = source.decoder(latents)  # (N, 3, 8h, 8w)
        assert torch.allclose(start.decoder(latents), pictures, atol=2e-2)
        pictures = pictures.clamp(-1, 1)
    as_uint8 = ((pictures / 2 + 0.5) * 255).round().byte().permute(0, 2, 3, 1).numpy()  # (N, 8h, 8w, 3)
    runtime = Runtime(device=torch.device("cpu"), bf16=False)
    assert generated_psnr(start.decoder, latents.numpy(), as_uint8, runtime) > 35  # fp16 weights, 8-bit target
    other = random_tiny(SMALL, seed=6)
    assert generated_psnr(other.decoder, latents.numpy(), as_uint8, runtime) < 25
    with pytest.raises(ValueError, match="multiple of 8"):
        generated_set(tmp_path, 12, seed=0)
