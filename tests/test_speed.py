"""Fast paths and accelerators: valid images in every mode, DeepCache exactness, the bf16 PSNR bound."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipelines.generation.request import GenerationRequest
from pipelines.models.loading import load_pipeline
from pipelines.speed.cpu_attention import FusedCpuAttnProcessor, onednn_graph_available
from pipelines.speed.deep_cache import DeepCacheRunner
from pipelines.speed.measure import psnr
from pipelines.speed.options import SpeedOptions, cpu_has_native_bf16


def test_deep_cache_full_step_equals_the_unet(tiny_pipe):
    unet = tiny_pipe.components.unet
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, 8, 8, generator=generator)
    states = torch.randn(2, 77, 32, generator=generator)
    t = torch.tensor(321)
    with torch.no_grad():
        expected = unet(sample, t, encoder_hidden_states=states).sample
        runner = DeepCacheRunner(unet, interval=3)
        full = runner(sample, t, states, 0)
        cached = runner(sample, t, states, 1)  # same input: reused deep features are exact
        moved = runner(sample + 0.5, t, states, 2)  # different input: only the shallow part updates
    assert torch.allclose(full, expected, atol=1e-6) and torch.allclose(cached, expected, atol=1e-6)
    assert not torch.allclose(moved, expected, atol=1e-3)
    assert (runner.full_steps, runner.cached_steps) == (1, 2)


@pytest.mark.parametrize(
    "changes",
    [{"cache_interval": 3}, {"guidance_cutoff": 0.5}, {"cache_interval": 2, "guidance_cutoff": 0.3}],
)
def test_accelerators_change_little_of_the_picture(tiny_pipe, changes):
    base = dict(prompt="a red circle", steps=6, width=64, height=64, seed=4, n=2, sampler="DPM++ 2M")
    reference = tiny_pipe(GenerationRequest(**base)).images
    unrelated = tiny_pipe(GenerationRequest(**{**base, "seed": 40})).images  # other seeds: about 12 dB
    fast = tiny_pipe(GenerationRequest(**base, **changes)).images
    for a, b, other in zip(reference, fast, unrelated):
        assert b.size == (64, 64) and b.mode == "RGB"
        assert psnr(a, other) < 20  # what "a different picture" scores on this model
        assert 30 <= psnr(a, b) < math.inf  # the same picture, and the accelerator did change something


def test_bf16_channels_last_mode_runs(tiny_model):
    pipe = load_pipeline(tiny_model, device="cpu", dtype=torch.bfloat16, speed=SpeedOptions(channels_last=True))
    assert pipe.components.unet.dtype == torch.bfloat16
    assert pipe.components.text_encoder.dtype == torch.float32
    image = pipe.generate("a star", seed=1, steps=3, width=64, height=64).images[0]
    assert image.size == (64, 64) and np.asarray(image).std() > 0


def test_bad_accelerator_settings_are_errors():
    with pytest.raises(ValueError, match="cache_interval"):
        GenerationRequest(cache_interval=0)
    with pytest.raises(ValueError, match="guidance_cutoff"):
        GenerationRequest(guidance_cutoff=1.0)


@pytest.mark.skipif(
    not cpu_has_native_bf16(),
    reason="this CPU has no native bf16: the default path is fp32 here, so there is no reduced precision to bound",
)
def test_default_fast_path_keeps_the_picture_on_the_embedded_model():
    """bf16 + channels_last + fused attention (the CPU default) stays within 25 dB PSNR of fp32, same seed;
    other seeds of the same prompt score 11-14 dB, so the bound tells the same picture from another."""
    reference = load_pipeline("embedded", device="cpu", dtype=torch.float32)
    fast = load_pipeline("embedded", device="cpu")
    assert fast.components.unet.dtype == torch.bfloat16 and fast.components.vae.dtype == torch.bfloat16
    images = {}
    for seed in (1, 2):
        request = GenerationRequest(prompt="a red circle on a blue background", seed=seed, steps=20)
        images[seed] = reference(request).images[0]
        assert psnr(images[seed], fast(request).images[0]) >= 25
    assert psnr(images[1], images[2]) < 20
    if onednn_graph_available():  # then the bound above was the fused kernels'
        processor = next(iter(fast.components.unet.attn_processors.values()))
        assert isinstance(processor, FusedCpuAttnProcessor) and processor.attention.fused_shapes() > 0


def test_gpu_fast_path_options_run_on_cpu(tiny_model, tiny_pipe):
    """Fused QKV projections (the GPU path's fusion) keep the picture; checked here on the CPU."""
    fused = load_pipeline(tiny_model, device="cpu", dtype=torch.float32, speed=SpeedOptions(fuse_qkv=True))
    request = GenerationRequest(prompt="a red circle", seed=3, steps=3, width=64, height=64)
    assert psnr(tiny_pipe(request).images[0], fused(request).images[0]) > 40


@pytest.mark.slow
def test_compiled_unet_gives_the_same_picture(tiny_model, tiny_pipe):
    compiled = load_pipeline(tiny_model, device="cpu", dtype=torch.float32, speed=SpeedOptions(compile=True))
    request = GenerationRequest(prompt="a red circle", seed=3, steps=2, width=64, height=64)
    assert psnr(tiny_pipe(request).images[0], compiled(request).images[0]) > 40


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_fast_path_with_cuda_graphs(tiny_model):
    options = SpeedOptions(channels_last=True, fuse_qkv=True, compile=True, compile_mode="reduce-overhead")
    pipe = load_pipeline(tiny_model, device="cuda", speed=options)
    reference = load_pipeline(tiny_model, device="cuda", dtype=torch.float32)
    request = GenerationRequest(prompt="a red circle", seed=3, steps=4, width=64, height=64)
    assert psnr(reference(request).images[0], pipe(request).images[0]) > 25
