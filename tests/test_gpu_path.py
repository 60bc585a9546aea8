"""The GPU default path's logic, checked on the CPU: device defaults, the VAE's fp32 rules, previews
without a per-step host sync. The ``-m gpu`` tests at the end run the same on CUDA (skipped without one)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL

from pipelines.generation.previews import LatentCopy, PreviewStream
from pipelines.generation.request import GenerationRequest
from pipelines.models.loading import load_pipeline
from pipelines.speed.measure import psnr
from pipelines.speed.options import default_speed_options
from pipelines.speed.vae_precision import NonFiniteDecode, upcast_to_fp32, vae_needs_fp32
from tests.sd_fixtures import TINY_VAE

REQUEST = GenerationRequest(prompt="a red circle", steps=3, width=64, height=64, seed=7, sampler="Euler a")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_default_options_per_device():
    gpu, cpu = default_speed_options("cuda"), default_speed_options("cpu")
    assert gpu.channels_last and gpu.fuse_qkv and gpu.sdpa and not gpu.compile
    assert cpu.channels_last and cpu.prepack_convolutions and cpu.fused_cpu_attention and not cpu.fuse_qkv


def test_cuda_default_options_keep_the_picture_on_cpu(tiny_model, tiny_pipe):
    """Fused QKV + channels_last (what CUDA gets by default) draw the same picture as the plain path."""
    pipe = load_pipeline(tiny_model, device="cpu", dtype=torch.float32, speed=default_speed_options("cuda"))
    processor = next(iter(pipe.components.unet.attn_processors.values()))
    assert type(processor).__name__ == "FusedAttnProcessor2_0"
    assert psnr(tiny_pipe(REQUEST).images[0], pipe(REQUEST).images[0]) > 40


def test_force_upcast_keeps_an_fp16_vae_in_fp32_but_not_a_bf16_one(tiny_model):
    half = load_pipeline(tiny_model, device="cpu", dtype=torch.float16)
    assert half.components.unet.dtype == torch.float16 and half.components.vae.dtype == torch.float32
    bf16 = load_pipeline(tiny_model, device="cpu", dtype=torch.bfloat16)
    assert bf16.components.vae.dtype == torch.bfloat16  # bf16 has fp32's range: no upcast needed
    allowed = AutoencoderKL.from_config({**TINY_VAE, "force_upcast": False}).to(torch.float16)
    assert not vae_needs_fp32(allowed) and vae_needs_fp32(AutoencoderKL.from_config(TINY_VAE).half())


def test_the_fp32_vae_casts_log_no_diffusers_warning(tiny_model, diffusers_warnings):
    """diffusers 0.42 warns "should be kept in float32: []" on any ``ModelMixin.to(dtype)``: the fp16 load's
    force_upcast and the fp32 retry cast the VAE without it (the user would see it on every GPU load)."""
    half = load_pipeline(tiny_model, device="cpu", dtype=torch.float16)
    assert half.components.vae.dtype == torch.float32
    bf16 = load_pipeline(tiny_model, device="cpu", dtype=torch.bfloat16)
    upcast_to_fp32(bf16.components.vae)
    assert bf16.components.vae.dtype == torch.float32
    assert [r.getMessage() for r in diffusers_warnings] == []


def _nan_below_fp32(module, inputs, output):
    """A decoder that overflows in reduced precision, as SD VAEs do in fp16 on some latents."""
    return output if output.dtype == torch.float32 else torch.full_like(output, float("nan"))


def test_a_nan_decode_is_redone_in_fp32_never_a_black_image(tiny_model, caplog):
    broken = load_pipeline(tiny_model, device="cpu", dtype=torch.bfloat16)
    reference = load_pipeline(tiny_model, device="cpu", dtype=torch.bfloat16)
    upcast_to_fp32(reference.components.vae)  # what the retry should amount to
    hook = broken.components.vae.decoder.register_forward_hook(_nan_below_fp32)
    try:
        with caplog.at_level(logging.WARNING, logger="pipelines.speed.vae_precision"):
            image = broken(REQUEST).images[0]
    finally:
        hook.remove()
    assert np.asarray(image).max() > 0  # not black
    assert np.array_equal(np.asarray(image), np.asarray(reference(REQUEST).images[0]))
    assert broken.components.vae.dtype == torch.float32  # and it stays in fp32
    assert "NaN/inf" in caplog.text


def test_a_decode_that_is_not_finite_even_in_fp32_is_an_error(tiny_model):
    pipe = load_pipeline(tiny_model, device="cpu", dtype=torch.bfloat16)
    hook = pipe.components.vae.decoder.register_forward_hook(lambda m, i, out: torch.full_like(out, float("inf")))
    try:
        with pytest.raises(NonFiniteDecode, match="fp32"):
            pipe(REQUEST)
    finally:
        hook.remove()


class _PendingEvent:
    """A CUDA event stand-in whose copy has not arrived until ``done`` is set."""

    def __init__(self) -> None:
        self.done = False

    def query(self) -> bool:
        return self.done

    def synchronize(self) -> None:
        self.done = True


def test_preview_stream_hands_out_the_newest_arrived_copy_without_waiting():
    stream = PreviewStream()
    latents = [torch.full((1, 4, 2, 2), float(step)) for step in range(4)]
    stream.push(latents[1], 1)
    stream.push(latents[2], 2)
    newest = stream.latest()
    assert newest is not None and newest.step == 2 and torch.equal(newest.wait(), latents[2])
    assert stream.latest() is None  # nothing new
    stream.push(latents[3], 3)
    event = _PendingEvent()
    stream._pending[-1]._event = event  # step 3's copy still in flight
    assert stream.latest() is None  # does not wait for it
    event.done = True
    assert stream.latest().step == 3


def test_latent_copy_is_a_copy():
    latents = torch.zeros(1, 4, 2, 2)
    copy = LatentCopy(latents, 1)
    latents.add_(1)
    assert copy.ready() and copy.wait().sum() == 0


# ---- on a GPU: `pytest -m gpu` (scripts/gpu_check.sh runs these first) ------------------------------------


@pytest.mark.gpu
@cuda
def test_cuda_default_path_fp16_fused_sdpa_and_an_fp32_vae(tiny_model):
    pipe = load_pipeline(tiny_model, device="cuda")
    c = pipe.components
    assert c.unet.dtype == torch.float16 and c.vae.dtype == torch.float32  # the tiny VAE says force_upcast
    assert type(next(iter(c.unet.attn_processors.values()))).__name__ == "FusedAttnProcessor2_0"
    assert c.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    reference = load_pipeline(tiny_model, device="cuda", dtype=torch.float32)
    assert psnr(reference(REQUEST).images[0], pipe(REQUEST).images[0]) > 25


@pytest.mark.gpu
@cuda
def test_cuda_fp16_nan_decode_is_redone_in_fp32(tiny_model):
    from pipelines.speed.options import SpeedOptions

    pipe = load_pipeline(tiny_model, device="cuda")
    pipe.components.vae.half()  # as if the config allowed fp16
    hook = pipe.components.vae.decoder.register_forward_hook(_nan_below_fp32)
    try:
        image = pipe(REQUEST).images[0]
    finally:
        hook.remove()
    assert np.asarray(image).max() > 0 and pipe.components.vae.dtype == torch.float32
    assert SpeedOptions().sdpa


@pytest.mark.gpu
@cuda
def test_cuda_previews_arrive_without_a_per_step_sync(tiny_model):
    pipe = load_pipeline(tiny_model, device="cuda")
    stream, seen = PreviewStream(), []

    def on_step(info):
        stream.push(info.latents, info.step)
        arrived = stream.latest()
        if arrived is not None:
            seen.append((arrived.step, pipe.preview_latents(arrived.wait())[0].size))

    pipe(GenerationRequest(prompt="a red circle", steps=6, width=64, height=64, seed=1), on_step=on_step)
    torch.cuda.synchronize()
    assert seen and all(size == (8, 8) for _, size in seen)
    assert [step for step, _ in seen] == sorted({step for step, _ in seen})
