"""Every bad setting raises ValueError naming the argument and its value."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest

from pipelines.generation.request import MAX_SEED, GenerationRequest
from pipelines.generation.schedulers import resolve_sampler


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("width", 500), ("width", 0), ("width", -8), ("width", 2056), ("height", 7), ("height", 4096),
        ("width", 512.0), ("steps", 0), ("steps", 151), ("steps", 2.5), ("cfg_scale", math.nan),
        ("cfg_scale", math.inf), ("cfg_scale", -1.0), ("cfg_scale", "7"), ("n", 0), ("n", 17),
        ("seed", -2), ("seed", MAX_SEED + 1), ("seed", 1.5), ("seed", True), ("seed", "12"),
        ("sampler", "Euler b"), ("prompt", None), ("prompt", "a \ud800 circle"), ("negative_prompt", "\udfff"),
    ],
)
def test_bad_values_name_the_argument(field, value):
    with pytest.raises(ValueError, match=field if field != "sampler" else "sampler") as error:
        GenerationRequest(**{field: value})
    assert repr(value)[:6] in str(error.value) or str(value)[:6] in str(error.value)


def test_good_edges_are_accepted():
    GenerationRequest(width=8, height=2048, steps=1, n=16, seed=0, cfg_scale=0)
    GenerationRequest(steps=150, seed=MAX_SEED, prompt="")


def test_random_seed_is_resolved_and_seeds_follow():
    request = GenerationRequest(seed=-1, n=3).resolved()
    assert 0 <= request.seed <= MAX_SEED
    assert request.seeds() == [request.seed, request.seed + 1, request.seed + 2]
    assert GenerationRequest(seed=7, n=2).resolved().seeds() == [7, 8]


def test_unknown_sampler_lists_choices():
    with pytest.raises(ValueError, match="Euler a.*UniPC|UniPC.*Euler a"):
        resolve_sampler("k_lms_v2")


def test_image_and_hires_settings_are_validated_and_counted():
    from PIL import Image

    from pipelines.generation.conditioning import HiresFix, ImageConditioning

    image = ImageConditioning(Image.new("RGB", (64, 64)), strength=0.55)
    with pytest.raises(ValueError, match="image must be an ImageConditioning, got str"):
        GenerationRequest(image="init.png")
    with pytest.raises(ValueError, match="hires must be a HiresFix, got float"):
        GenerationRequest(hires=2.0)
    with pytest.raises(ValueError, match="hires fix is for text-to-image"):
        GenerationRequest(image=image, hires=HiresFix())
    assert GenerationRequest(steps=20, image=image).total_steps == 11  # int(20 * 0.55)
    assert GenerationRequest(steps=1, image=image).total_steps == 1  # int(0.55) is 0: at least one step runs
    assert GenerationRequest(steps=4, image=replace(image, strength=0.2)).total_steps == 1
    assert GenerationRequest(steps=20, image=replace(image, strength=0.0)).total_steps == 0  # the init image as is
    assert GenerationRequest(steps=20, hires=HiresFix(steps=5)).total_steps == 25
    assert GenerationRequest(steps=20, hires=HiresFix(denoising_strength=0)).total_steps == 20
    assert GenerationRequest(steps=20).total_steps == 20
