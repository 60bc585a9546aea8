"""The pipeline against diffusers' own StableDiffusionPipeline, seeds, batching, callbacks, cancel."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from pipelines.generation.request import GenerationRequest
from pipelines.generation.text_to_image import GenerationCancelled


def _pixels(image) -> np.ndarray:
    return np.asarray(image).astype(np.int16)


# The diffusers scheduler each A1111 sampler is, written from the diffusers documentation's table
# "A1111/k-diffusion -> diffusers", not from our mapping: (class, config options).
REFERENCE_SCHEDULERS = {
    "DPM++ 2M Karras": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "use_karras_sigmas": True}),
    "Euler a": ("EulerAncestralDiscreteScheduler", {}),
    "DDIM": ("DDIMScheduler", {}),
    "PLMS": ("PNDMScheduler", {"skip_prk_steps": True}),
    "Heun": ("HeunDiscreteScheduler", {}),
    "DPM++ SDE": ("DPMSolverSDEScheduler", {"use_karras_sigmas": True, "noise_sampler_seed": [11, 12]}),
}


@pytest.mark.parametrize("sampler", list(REFERENCE_SCHEDULERS))
def test_images_equal_diffusers_stable_diffusion_pipeline(tiny_model, tiny_pipe, sampler):
    import diffusers
    from diffusers import StableDiffusionPipeline

    reference = StableDiffusionPipeline.from_pretrained(
        tiny_model, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        local_files_only=True,
    )
    class_name, options = REFERENCE_SCHEDULERS[sampler]
    reference.scheduler = getattr(diffusers, class_name).from_config(dict(reference.scheduler.config), **options)
    reference.set_progress_bar_config(disable=True)
    seeds = [11, 12]
    expected = reference(
        "a red circle on a blue background",
        negative_prompt="blurry",
        num_inference_steps=5,
        guidance_scale=6.0,
        height=64,
        width=64,
        num_images_per_prompt=2,
        generator=[torch.Generator("cpu").manual_seed(s) for s in seeds],
    ).images
    ours = tiny_pipe(
        GenerationRequest(
            prompt="a red circle on a blue background", negative_prompt="blurry", steps=5, cfg_scale=6.0,
            seed=11, width=64, height=64, n=2, sampler=sampler,
        )
    )
    assert ours.seeds == seeds
    for mine, theirs in zip(ours.images, expected):
        assert np.abs(_pixels(mine) - _pixels(theirs)).max() <= 2


def test_same_seed_same_image_alone_or_in_a_batch(tiny_pipe):
    request = dict(prompt="a star", steps=4, width=64, height=64, sampler="Euler a")
    batch = tiny_pipe(GenerationRequest(seed=100, n=4, **request))
    alone = tiny_pipe(GenerationRequest(seed=102, n=1, **request))
    assert batch.seeds == [100, 101, 102, 103]
    assert np.abs(_pixels(batch.images[2]) - _pixels(alone.images[0])).max() <= 2
    assert np.abs(_pixels(batch.images[0]) - _pixels(batch.images[1])).max() > 10  # seeds differ


def test_random_seed_is_reported_and_reproduces(tiny_pipe):
    first = tiny_pipe(GenerationRequest(prompt="x", steps=2, width=64, height=64, seed=-1))
    assert 0 <= first.seeds[0] <= 2**32 - 1 and first.request.seed == first.seeds[0]
    again = tiny_pipe(GenerationRequest(prompt="x", steps=2, width=64, height=64, seed=first.seeds[0]))
    assert np.array_equal(_pixels(first.images[0]), _pixels(again.images[0]))


def test_step_callback_sees_every_step_and_cancel_stops(tiny_pipe):
    seen = []
    out = tiny_pipe(
        GenerationRequest(prompt="x", steps=3, width=64, height=64, seed=1, sampler="Euler"),
        on_step=lambda info: seen.append((info.step, info.total, tuple(info.latents.shape))),
    )
    assert seen == [(1, 3, (1, 4, 8, 8)), (2, 3, (1, 4, 8, 8)), (3, 3, (1, 4, 8, 8))]
    assert out.images[0].size == (64, 64) and out.images[0].mode == "RGB"

    cancel = threading.Event()
    steps = []

    def stop_after_first(info):
        steps.append(info.step)
        cancel.set()

    with pytest.raises(GenerationCancelled):
        tiny_pipe(
            GenerationRequest(prompt="x", steps=10, width=64, height=64, seed=1),
            on_step=stop_after_first,
            cancel=cancel,
        )
    assert steps == [1]


def test_empty_prompt_and_no_guidance_generate(tiny_pipe):
    out = tiny_pipe(GenerationRequest(prompt="", steps=2, width=64, height=128, seed=5, cfg_scale=1.0))
    assert out.images[0].size == (64, 128)


def test_long_prompt_uses_several_chunks(tiny_pipe):
    prompt = " ".join(["red circle"] * 60)  # 120 tokens -> 2 chunks
    assert tiny_pipe.count_tokens(prompt).chunks == 2
    states = tiny_pipe.encode_prompt(prompt, "", n=1, guided=True)
    assert tuple(states.shape) == (2, 154, 32)
