"""Model loading from local files: formats, refusals and clear errors that name the file."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from pipelines.models.errors import ModelLoadError
from pipelines.models.loading import load_pipeline
from pipelines.models.single_file import save_single_file


@pytest.fixture(scope="module")
def single_file(tiny_pipe, tmp_path_factory):
    return save_single_file(tiny_pipe.components, tmp_path_factory.mktemp("single") / "tiny.safetensors")


def _same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return set(sa) == set(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_single_file_round_trip_gives_the_same_model_and_image(tiny_pipe, single_file, tiny_config):
    loaded = load_pipeline(single_file, device="cpu", config=tiny_config, dtype=torch.float32)
    for name in ("unet", "vae", "text_encoder"):
        assert _same_weights(getattr(tiny_pipe.components, name), getattr(loaded.components, name)), name
    assert loaded.name == "tiny" and len(loaded.components.model_hash) == 10
    a = tiny_pipe.generate("a red circle", seed=3, steps=3, width=64, height=64).images[0]
    b = loaded.generate("a red circle", seed=3, steps=3, width=64, height=64).images[0]
    assert np.array_equal(np.asarray(a), np.asarray(b))


def test_separate_vae_file_replaces_the_models_vae(tiny_pipe, single_file, tiny_config, tmp_path):
    from safetensors.torch import load_file, save_file

    vae_only = {k.removeprefix("first_stage_model."): v for k, v in load_file(single_file).items()
                if k.startswith("first_stage_model.")}
    vae_only = {k: (v * 0 + 0.01 if k.endswith("conv_out.bias") else v) for k, v in vae_only.items()}
    save_file(vae_only, tmp_path / "vae.safetensors")
    vae_file = tmp_path / "vae.safetensors"
    loaded = load_pipeline(single_file, device="cpu", config=tiny_config, vae=vae_file, dtype=torch.float32)
    assert torch.allclose(loaded.components.vae.decoder.conv_out.bias, torch.full((3,), 0.01))
    from pipelines.models.hashing import file_hash

    # A1111's infotext names a separate VAE: "VAE hash" (AutoV2 of the file) and "VAE"
    extra = loaded.generate("a red circle", seed=3, steps=2, width=64, height=64).extra
    assert extra["VAE hash"] == file_hash(vae_file) and extra["VAE"] == "vae.safetensors"
    assert "VAE" not in tiny_pipe.generate("a red circle", seed=3, steps=2, width=64, height=64).extra


def test_older_key_layouts_load_as_a1111_loads_them(tiny_pipe, single_file, tiny_config, tmp_path):
    """CLIP keys without ``text_model.`` (transformers 3 era merges), a diffusers VAE with pre-0.14 attention
    names, and a diffusers VAE folder."""
    from safetensors.torch import load_file, save_file

    state = load_file(single_file)
    prefix = "cond_stage_model.transformer.text_model."
    old = {("cond_stage_model.transformer." + k[len(prefix):] if k.startswith(prefix) else k): v
           for k, v in state.items()}
    assert not any(k.startswith(prefix) for k in old)
    save_file(old, tmp_path / "old-text.safetensors")
    loaded = load_pipeline(tmp_path / "old-text.safetensors", device="cpu", config=tiny_config, dtype=torch.float32)
    assert _same_weights(loaded.components.text_encoder, tiny_pipe.components.text_encoder)
    vae = tiny_pipe.components.vae
    renames = {".to_q.": ".query.", ".to_k.": ".key.", ".to_v.": ".value.", ".to_out.0.": ".proj_attn."}
    deprecated = {}
    for key, value in vae.state_dict().items():
        for new, former in renames.items():
            key = key.replace(new, former) if ".attentions." in key else key
        deprecated[key] = value.float().contiguous()
    assert any(".query." in k for k in deprecated)
    save_file(deprecated, tmp_path / "vae-deprecated.safetensors")
    vae.save_pretrained(tmp_path / "vae-folder")
    for vae_file in (tmp_path / "vae-deprecated.safetensors", tmp_path / "vae-folder"):
        loaded = load_pipeline(single_file, device="cpu", config=tiny_config, vae=vae_file, dtype=torch.float32)
        assert _same_weights(loaded.components.vae, vae), vae_file


@pytest.mark.parametrize("suffix", [".ckpt", ".bin", ".pt", ".pth"])
def test_pickle_files_are_refused_with_advice(tmp_path, suffix):
    path = tmp_path / f"model{suffix}"
    path.write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(ModelLoadError, match=rf"model\{suffix}.*safetensors"):
        load_pipeline(path, device="cpu")


def test_folder_with_only_pickled_weights_is_refused(tiny_model, tmp_path):
    copy = shutil.copytree(tiny_model, tmp_path / "pickled")
    weights = copy / "unet" / "diffusion_pytorch_model.safetensors"
    weights.rename(copy / "unet" / "diffusion_pytorch_model.bin")
    with pytest.raises(ModelLoadError, match=r"diffusion_pytorch_model\.bin.*never loaded"):
        load_pipeline(copy, device="cpu")


def test_missing_path_and_not_a_model(tmp_path):
    with pytest.raises(ModelLoadError, match="not found.*nope"):
        load_pipeline(tmp_path / "nope", device="cpu")
    with pytest.raises(ModelLoadError, match="no model_index.json"):
        load_pipeline(tmp_path, device="cpu")
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(ModelLoadError, match="notes.txt"):
        load_pipeline(text, device="cpu")


def test_uncached_repo_id_is_not_downloaded():
    with pytest.raises(ModelLoadError, match="nothing is downloaded"):
        load_pipeline("someone/not-in-cache", device="cpu")


def test_truncated_file_is_a_clear_error(single_file, tmp_path, tiny_config):
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(single_file.read_bytes()[: single_file.stat().st_size // 2])
    with pytest.raises(ModelLoadError, match=r"cut\.safetensors.*not a valid or complete"):
        load_pipeline(cut, device="cpu", config=tiny_config, dtype=torch.float32)


def test_wrong_shapes_and_wrong_layout_name_the_file(single_file, tiny_model, tmp_path):
    from pipelines.models.loading import SD1_CONFIG_DIR  # noqa: F401 - the default config: SD 1.5 shapes

    with pytest.raises(ModelLoadError, match=r"tiny\.safetensors.*U-Net"):
        load_pipeline(single_file, device="cpu")  # tiny weights against SD 1.5 shapes
    diffusers_file = tiny_model / "unet" / "diffusion_pytorch_model.safetensors"
    with pytest.raises(ModelLoadError, match="not an SD 1.x checkpoint in the original layout"):
        load_pipeline(diffusers_file, device="cpu")


def test_missing_tensors_are_reported(single_file, tmp_path, tiny_config):
    from safetensors.torch import load_file, save_file

    state = load_file(single_file)
    del state["model.diffusion_model.out.2.weight"]
    save_file(state, tmp_path / "partial.safetensors")
    with pytest.raises(ModelLoadError, match=r"partial\.safetensors"):
        load_pipeline(tmp_path / "partial.safetensors", device="cpu", config=tiny_config, dtype=torch.float32)


@pytest.mark.slow
def test_full_size_sd15_random_weights_round_trip(tmp_path):
    """SD 1.5 shapes (860M U-Net): diffusers folder -> single file -> loader, with the shipped configs."""
    from pipelines.models.random_model import write_random_model
    from pipelines.models.shipped import SD1_CONFIG_DIR

    folder = write_random_model(SD1_CONFIG_DIR, tmp_path / "sd15")
    pipe = load_pipeline(folder, device="cpu", dtype=torch.float32)
    path = save_single_file(pipe.components, tmp_path / "sd15.safetensors")
    loaded = load_pipeline(path, device="cpu", dtype=torch.float32)
    for name in ("unet", "vae", "text_encoder"):
        assert _same_weights(getattr(pipe.components, name), getattr(loaded.components, name)), name
    assert tuple(loaded.encode_prompt("a cat", "", 1, guided=False).shape) == (1, 77, 768)


def test_scheduler_class_comes_from_model_index_when_its_config_lacks_it(tmp_path):
    """diffusers takes the scheduler class from model_index.json; so does the sampler the model ships with."""
    import json

    from pipelines.generation.schedulers import sampler_for_config
    from pipelines.models.shipped import read_scheduler_config

    (tmp_path / "scheduler").mkdir()
    schedule = {"num_train_timesteps": 1000, "algorithm_type": "dpmsolver++", "solver_order": 2}
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps(schedule))
    (tmp_path / "model_index.json").write_text(json.dumps({"scheduler": ["diffusers", "DPMSolverMultistepScheduler"]}))
    config = read_scheduler_config(tmp_path)
    assert config["_class_name"] == "DPMSolverMultistepScheduler"
    assert sampler_for_config(config) == "DPM++ 2M Uniform"  # no use_karras_sigmas: the model's own spacing
    (tmp_path / "model_index.json").write_text("{}")  # no class anywhere: the app's default sampler
    assert "_class_name" not in read_scheduler_config(tmp_path)


def test_single_file_inpainting_checkpoint_is_detected(tiny_inpainting_pipe, tmp_path, tiny_config):
    """An SD inpainting checkpoint (9-channel conv_in) loads with the SD 1.x configs' 4-channel U-Net config."""
    path = save_single_file(tiny_inpainting_pipe.components, tmp_path / "tiny-inpainting.safetensors")
    loaded = load_pipeline(path, device="cpu", config=tiny_config, dtype=torch.float32)
    assert loaded.components.unet.config.in_channels == 9 and loaded.inpainting_unet
    assert _same_weights(tiny_inpainting_pipe.components.unet, loaded.components.unet)


def test_a_diffusers_layout_vae_file_loads_in_bfloat16_without_a_spurious_warning(tiny_pipe, tiny_config, tmp_path,
                                                                                  diffusers_warnings):
    """diffusers 0.42's ModelMixin.to warns "should be kept in float32: []" on any dtype cast; the user sees
    nothing of it, and the VAE comes out in the asked dtype with the file's weights."""
    from safetensors.torch import save_file

    from pipelines.models.single_file import load_vae_file

    vae = tiny_pipe.components.vae
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, tmp_path / "vae.safetensors")
    loaded = load_vae_file(tmp_path / "vae.safetensors", tiny_config, torch.bfloat16)
    assert [r.getMessage() for r in diffusers_warnings] == []
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    assert torch.equal(loaded.decoder.conv_out.weight, vae.decoder.conv_out.weight.to(torch.bfloat16))
