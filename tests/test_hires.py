"""The hires fix as A1111 runs it, checked against diffusers' img2img pipeline given the same upscaled input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from pipelines.generation.conditioning import HiresFix
from pipelines.generation.hires import second_pass_schedule
from pipelines.generation.request import GenerationRequest

PROMPT = "a red circle on a blue background"


def _pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB")).astype(np.int16)


def _generators(seeds):
    return [torch.Generator("cpu").manual_seed(s) for s in seeds]


@pytest.fixture(scope="module")
def references(tiny_model):
    """diffusers' text-to-image and img2img pipelines on the tiny model, Euler (deterministic), channels_last."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionImg2ImgPipeline, StableDiffusionPipeline

    pipes = []
    for pipeline_class in (StableDiffusionPipeline, StableDiffusionImg2ImgPipeline):
        pipe = pipeline_class.from_pretrained(
            tiny_model, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
            local_files_only=True,
        )
        pipe.scheduler = EulerDiscreteScheduler.from_config(dict(pipe.scheduler.config))
        pipe.unet.to(memory_format=torch.channels_last)  # as our CPU pipeline: compare algorithms, not layouts
        pipe.vae.to(memory_format=torch.channels_last)
        pipe.set_progress_bar_config(disable=True)
        pipes.append(pipe)
    return pipes


def test_schedule_is_a1111s():
    assert second_pass_schedule(10, 0.7) == (14, 10)  # int(10 / 0.7)
    assert second_pass_schedule(20, 0.5) == (40, 20)
    assert second_pass_schedule(20, 1.0) == (20, 20)  # int(20 / 0.999) = 20
    assert second_pass_schedule(20, 0.0) == (0, 0)


def _second_pass_strength(steps: int, schedule: int) -> float:
    """The diffusers img2img strength that runs the last ``steps`` of ``schedule``: int(schedule * s) = steps."""
    return (steps + 0.5) / schedule


@pytest.mark.parametrize("upscaler", ["Latent", "Latent (bicubic antialiased)", "Lanczos"])
def test_hires_equals_diffusers_img2img_on_the_upscaled_first_pass(tiny_pipe, references, upscaler):
    """First pass -> upscale -> img2img over the last 4 of int(4 / 0.6) = 6 steps, fresh noise from the seeds."""
    from pipelines.generation.conditioning import LATENT_UPSCALERS

    text_to_image, image_to_image = references
    seeds, steps, denoise = [7, 8], 4, 0.6
    schedule, run = second_pass_schedule(steps, denoise)
    common = dict(num_images_per_prompt=2, guidance_scale=6.0, negative_prompt="blurry")
    first = text_to_image(PROMPT, num_inference_steps=steps, height=64, width=64, generator=_generators(seeds),
                          output_type="latent" if upscaler != "Lanczos" else "pil", **common).images
    if upscaler in LATENT_UPSCALERS:
        mode, antialias = LATENT_UPSCALERS[upscaler]
        init = F.interpolate(first, size=(12, 12), mode=mode, antialias=antialias)  # 64 -> 96 px
    else:
        init = [image.resize((96, 96), Image.Resampling.LANCZOS) for image in first]
    expected = image_to_image(PROMPT, image=init, strength=_second_pass_strength(run, schedule),
                              num_inference_steps=schedule, generator=_generators(seeds), **common).images
    ours = tiny_pipe(
        GenerationRequest(
            prompt=PROMPT, negative_prompt="blurry", steps=steps, cfg_scale=6.0, seed=7, n=2, width=64, height=64,
            sampler="Euler", hires=HiresFix(scale=1.5, upscaler=upscaler, denoising_strength=denoise),
        )
    )
    for mine, theirs in zip(ours.images, expected):
        assert mine.size == (96, 96)
        assert np.abs(_pixels(mine) - _pixels(theirs)).max() <= 2


def test_hires_seed_alone_or_in_a_batch_and_progress_counts_both_passes(tiny_pipe):
    hires = HiresFix(scale=2, upscaler="Latent", steps=3, denoising_strength=0.5)
    settings = dict(prompt=PROMPT, steps=4, width=64, height=64, sampler="Euler a", hires=hires)
    seen = []
    batch = tiny_pipe(GenerationRequest(seed=40, n=2, **settings))
    alone = tiny_pipe(GenerationRequest(seed=41, **settings), on_step=lambda info: seen.append((info.step, info.total)))
    assert batch.images[1].size == (128, 128)
    assert np.abs(_pixels(batch.images[1]) - _pixels(alone.images[0])).max() <= 2
    assert seen == [(k, 7) for k in range(1, 8)]  # 4 first-pass steps, then the 3 of the second pass


def test_hires_resize_to_a_size_keeps_the_aspect_or_crops():
    assert HiresFix(resize_x=128).target_size(64, 32) == ((128, 64), (128, 64))
    assert HiresFix(resize_y=96).target_size(64, 32) == ((192, 96), (192, 96))
    assert HiresFix(resize_x=128, resize_y=128).target_size(64, 32) == ((256, 128), (128, 128))  # cover, then crop
    assert HiresFix(scale=1.5).target_size(512, 512) == ((768, 768), (768, 768))


def test_hires_strength_zero_is_the_upscale_alone(tiny_pipe):
    request = dict(prompt=PROMPT, steps=3, seed=1, width=64, height=64)
    seen = []
    out = tiny_pipe(GenerationRequest(**request, hires=HiresFix(scale=2, denoising_strength=0.0)),
                    on_step=lambda info: seen.append(info.step))
    assert out.images[0].size == (128, 128) and seen == [1, 2, 3]


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"scale": 0.5}, "hr_scale must be between 1 and 8, got 0.5"),
        ({"upscaler": "ESRGAN_4x"}, "hr_upscaler must be one of Latent, Latent (antialiased)"),
        ({"denoising_strength": 2}, "denoising_strength must be between 0 and 1, got 2"),
        ({"resize_x": 100}, "hr_resize_x must be a multiple of 8"),
        ({"steps": -1}, "hr_second_pass_steps must be an integer between 0 and 150, got -1"),
    ],
)
def test_bad_hires_settings_name_the_field(settings, message):
    with pytest.raises(ValueError) as raised:
        HiresFix(**settings)
    assert message in str(raised.value)


def test_hires_target_past_the_limit_is_refused():
    with pytest.raises(ValueError, match="hires fix target 4096x4096"):
        GenerationRequest(width=1024, height=1024, hires=HiresFix(scale=4))
