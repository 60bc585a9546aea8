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
        (chr(0x20000) * 100, chr(0x20000) * 45),  # 4 bytes each: 180 bytes, a name within 255 with room left
    ],
)
def test_slugify(prompt, expected):
    slug = slugify(prompt)
    assert slug == expected
    assert "/" not in slug and "\\" not in slug and len(slug) <= 60 and len(slug.encode()) <= 180


def test_a_long_prompt_of_wide_characters_is_written_and_files_follow_the_umask(tmp_path):
    import os
    import stat

    image = Image.new("RGB", (8, 8), "red")
    written = save_png(image, tmp_path, 4294967295, chr(0x20000) * 100)  # was: "File name too long"
    assert written.is_file() and len(written.name.encode()) <= 255
    previous = os.umask(0o027)
    try:
        mode = stat.S_IMODE(save_png(image, tmp_path, 1, "x").stat().st_mode)
    finally:
        os.umask(previous)
    assert mode == 0o640  # 0666 less the umask, as other tools write (mkstemp's 0600 kept them private)


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
        "Model hash: 6ce0161689, Model: shapes-tiny, RNG: CPU, CLIP score: 31.24, Reranker: x, Version: sd-app 0.1.0"
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


def test_an_empty_prompt_leaves_no_empty_first_line_as_in_a1111():
    text = format_parameters(GenerationRequest(prompt="", seed=5), 5, "m")
    assert text.startswith("Steps: 20, ") and parse_parameters(text)["prompt"] == ""
    text = format_parameters(GenerationRequest(prompt="", negative_prompt="blurry", seed=5), 5, "m")
    assert text.startswith("Negative prompt: blurry\nSteps: ")
    assert parse_parameters(text)["negative_prompt"] == "blurry" and parse_parameters(text)["prompt"] == ""


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


def test_hires_keys_are_written_as_a1111_and_read_back():
    from pipelines.generation.conditioning import HiresFix

    request = GenerationRequest(
        prompt="a red circle", steps=20, seed=7, hires=HiresFix(scale=1.5, upscaler="Lanczos", steps=10,
                                                                denoising_strength=0.55),
    )
    text = format_parameters(request, 7, "shapes-tiny", "abcdef1234")
    assert ("Size: 512x512, Denoising strength: 0.55, Hires upscale: 1.5, Hires steps: 10, "
            "Hires upscaler: Lanczos, Model hash") in text
    assert request_from_parameters(parse_parameters(text)) == request
    resized = replace(request, hires=HiresFix(resize_x=1024, resize_y=768))
    parsed = parse_parameters(format_parameters(resized, 7, "m"))
    assert parsed["Hires resize"] == "1024x768" and "Hires upscale" not in parsed and "Hires steps" not in parsed
    assert request_from_parameters(parsed) == resized
    # A1111's own infotext, as it writes it.
    a1111 = ("a cat\nSteps: 20, Sampler: Euler a, Schedule type: Automatic, CFG scale: 7, Seed: 1, Size: 512x512, "
             "Denoising strength: 0.7, Hires upscale: 2, Hires upscaler: Latent (bicubic antialiased)")
    assert request_from_parameters(parse_parameters(a1111)).hires == HiresFix(
        scale=2, upscaler="Latent (bicubic antialiased)", denoising_strength=0.7
    )


def test_img2img_and_inpaint_keys_are_written_and_read_back():
    from pipelines.generation.conditioning import ImageConditioning
    from sd_app.metadata import image_settings_from_parameters

    image = Image.new("RGB", (64, 64), "blue")
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (8, 8, 40, 40))
    settings = dict(strength=0.6, mask_blur=6, masked_content="latent noise", inpaint_full_res=True, padding=16,
                    invert_mask=True, resize_mode="crop and resize")
    request = GenerationRequest(prompt="a star", seed=3, width=64, height=64,
                                image=ImageConditioning(image, mask=mask, **settings))
    text = format_parameters(request, 3, "m")
    assert ("Denoising strength: 0.6, Resize mode: Crop and resize, Mask blur: 6, Masked content: latent noise, "
            "Mask mode: Inpaint not masked, Inpaint area: Only masked, Masked area padding: 16") in text
    params = parse_parameters(text)
    assert image_settings_from_parameters(params) == settings
    assert request_from_parameters(params).hires is None
    plain = format_parameters(GenerationRequest(prompt="x", seed=1, image=ImageConditioning(image)), 1, "m")
    assert image_settings_from_parameters(parse_parameters(plain)) == {
        "strength": 0.75, "invert_mask": False, "inpaint_full_res": False,
    }
    assert image_settings_from_parameters(parse_parameters(format_parameters(GenerationRequest(seed=1), 1, "m"))) == {}


def test_png_info_parameters_fill_in_what_a1111_fills_in():
    """``/sdapi/v1/png-info``'s parameters are A1111's parse_generation_parameters: a key the text lacks gets the
    value it had when the image was made (no Clip skip line: clip skip 1), and a key the text has keeps its value."""
    from sd_app.metadata import a1111_parameters

    plain = a1111_parameters("a cat\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 3, Size: 512x768")
    assert (plain["Prompt"], plain["Size-1"], plain["Size-2"], plain["Seed"]) == ("a cat", "512", "768", "3")
    assert (plain["Clip skip"], plain["RNG"], plain["Schedule type"], plain["VAE Decoder"]) == ("1", "GPU",
                                                                                                "Automatic", "Full")
    assert (plain["Hires resize-1"], plain["Hires resize-2"], plain["Masked area padding"]) == (0, 0, 32)
    assert plain["Hires sampler"] == "Use same sampler" and plain["Inpaint area"] == "Whole picture"
    given = a1111_parameters("a cat\nSteps: 20, Seed: 3, Clip skip: 2, RNG: CPU, Hires resize: 1024x640, "
                             "Schedule type: Karras, VAE Decoder: TAESD")
    assert (given["Clip skip"], given["RNG"], given["Schedule type"], given["VAE Decoder"]) == ("2", "CPU", "Karras",
                                                                                              "TAESD")
    assert (given["Hires resize-1"], given["Hires resize-2"]) == ("1024", "640")
    prompt_only = a1111_parameters("just a prompt, no settings")
    assert prompt_only["Prompt"] == "just a prompt, no settings" and prompt_only["Clip skip"] == "1"


@pytest.mark.parametrize(("first_pass", "size", "expected"), [
    ("640x384", "1280x768", (640, 384, 1280, 768)),
    ("0x0", "1024x1024", (512, 512, 1024, 1024)),  # 0x0: about 512x512 pixels, sides rounded up to 64
    ("0x0", "1536x768", (768, 384, 1536, 768)),
])
def test_an_old_hires_fix_first_pass_size_reads_as_a1111_reads_it(first_pass, size, expected):
    from sd_app.metadata import a1111_parameters

    parsed = a1111_parameters(f"a cat\nSteps: 20, Seed: 3, Size: {size}, First pass size: {first_pass}, "
                              "Denoising strength: 0.7")
    assert (parsed["Size-1"], parsed["Size-2"], parsed["Hires resize-1"], parsed["Hires resize-2"]) == expected
