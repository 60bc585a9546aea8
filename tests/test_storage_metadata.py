"""Output files: safe names, atomic writes, no overwrite, A1111 parameters round trip."""

from __future__ import annotations

from dataclasses import replace

import pytest
from PIL import Image

from pipelines.generation.request import GenerationRequest
from sd_app.metadata import format_parameters, parse_parameters, read_png_parameters, request_from_parameters
from sd_app.storage import save_png, slugify


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("a red circle on a blue background", "a_red_circle_on_a_blue_background"),
        ("../../etc/passwd", "etc_passwd"),
        ("a\x00b\nc\td", "a_b_c_d"),
        ("CON", "img_CON"),
        ("nul.txt", "img_nul.txt"),
        ("", "untitled"),
        ("(masterpiece:1.2), cat", "masterpiece_1.2_cat"),
        ("x" * 200, "x" * 60),
    ],
)
def test_slugify(prompt, expected):
    slug = slugify(prompt)
    assert slug == expected
    assert "/" not in slug and "\\" not in slug and len(slug) <= 60


def test_save_png_numbers_never_overwrite_and_keep_metadata(tmp_path):
    image = Image.new("RGB", (8, 8), "red")
    first = save_png(image, tmp_path / "out", 42, "a red square", "params one")
    second = save_png(image, tmp_path / "out", 42, "a red square", "params two")
    assert first.name == "00000-42-a_red_square.png" and second.name == "00001-42-a_red_square.png"
    assert read_png_parameters(Image.open(first)) == "params one"
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".tmp")]
    (tmp_path / "out" / "00005-1-x.png").write_bytes(b"someone else's")
    third = save_png(image, tmp_path / "out", 7, "x")
    assert third.name == "00006-7-x.png"
    assert (tmp_path / "out" / "00005-1-x.png").read_bytes() == b"someone else's"


def test_parameters_format_matches_a1111_and_round_trips():
    request = GenerationRequest(
        prompt="a red circle on a blue background", negative_prompt="blurry", steps=20,
        sampler="DPM++ 2M", cfg_scale=7, seed=1234,
    )  # A1111 1.9+: DPM++ 2M schedules with Karras unless told otherwise
    text = format_parameters(request, 1234, "shapes-tiny", "6ce0161689", {"CLIP score": "31.24", "Reranker": "x"})
    assert text == (
        "a red circle on a blue background\nNegative prompt: blurry\n"
        "Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1234, Size: 512x512, "
        "Model hash: 6ce0161689, Model: shapes-tiny, CLIP score: 31.24, Reranker: x, Version: sd-app 0.1.0"
    )
    parsed = parse_parameters(text)
    assert parsed["prompt"] == request.prompt and parsed["negative_prompt"] == "blurry"
    assert parsed["Seed"] == "1234" and parsed["CLIP score"] == "31.24"
    assert request_from_parameters(parsed) == request
    legacy = format_parameters(replace(request, sampler="DPM++ 2M Karras"), 1234, "shapes-tiny", "6ce0161689",
                               {"CLIP score": "31.24", "Reranker": "x"})
    assert legacy == text  # the pre-1.9 name means the same sampler and schedule
    uniform = format_parameters(replace(request, sampler="DPM++ 2M Uniform"), 1234, "shapes-tiny")
    assert "Sampler: DPM++ 2M, Schedule type: Uniform" in uniform
    assert request_from_parameters(parse_parameters(uniform)).sampler == "DPM++ 2M Uniform"


def test_values_with_commas_are_quoted_and_multiline_prompts_survive():
    request = GenerationRequest(prompt="line one\nline two, with comma", seed=5)
    text = format_parameters(request, 5, "my, model")
    assert 'Model: "my, model"' in text
    parsed = parse_parameters(text)
    assert parsed["Model"] == "my, model" and parsed["prompt"] == "line one\nline two, with comma"


def test_a1111_written_parameters_parse():
    text = (
        "masterpiece, 1girl\nNegative prompt: lowres, bad anatomy\n"
        "Steps: 28, Sampler: Euler a, CFG scale: 7.5, Seed: 3337, Size: 512x768, Model hash: 925997e9, "
        'Model: anything, Lora hashes: "x: 1, y: 2", Version: v1.9.4'
    )
    parsed = parse_parameters(text)
    assert parsed["Lora hashes"] == "x: 1, y: 2"
    request = request_from_parameters(parsed)
    assert (request.width, request.height, request.sampler, request.seed) == (512, 768, "Euler a", 3337)


def test_not_parameters_is_an_error():
    with pytest.raises(ValueError, match="fewer than 3"):
        parse_parameters("just a caption")


def test_accelerator_settings_are_recorded_and_reused():
    request = GenerationRequest(prompt="x", seed=3, cache_interval=3, guidance_cutoff=0.25)
    text = format_parameters(request, 3, "m")
    assert "DeepCache interval: 3, CFG cutoff: 0.25" in text
    assert request_from_parameters(parse_parameters(text)) == request
