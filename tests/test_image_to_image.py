"""img2img and inpainting against diffusers' own pipelines on the tiny random models; seeds, edges, masks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from pipelines.generation.conditioning import ImageConditioning
from pipelines.generation.request import GenerationRequest

PROMPT = "a red circle on a blue background"
SIZE = 64


def _pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB")).astype(np.int16)


def _max_diff(a, b) -> int:
    return int(np.abs(_pixels(a) - _pixels(b)).max())


def drawing(size: int = SIZE) -> Image.Image:
    image = Image.new("RGB", (size, size), (40, 80, 220))
    ImageDraw.Draw(image).ellipse((size // 4, size // 4, 3 * size // 4, 3 * size // 4), fill=(220, 40, 40))
    return image


def box_mask(size: int = SIZE, box: tuple[int, int, int, int] = (16, 16, 48, 48)) -> Image.Image:
    mask = Image.new("L", (size, size), 0)
    ImageDraw.Draw(mask).rectangle(box, fill=255)
    return mask


def _reference(pipeline_class, model, sampler_class, options):
    import diffusers

    reference = pipeline_class.from_pretrained(
        model, safety_checker=None, feature_extractor=None, requires_safety_checker=False, local_files_only=True
    )
    reference.scheduler = getattr(diffusers, sampler_class).from_config(dict(reference.scheduler.config), **options)
    reference.set_progress_bar_config(disable=True)
    # Our CPU pipeline keeps the U-Net and VAE channels_last; the reference does too, so that the
    # comparison is of algorithms (convolution rounding in the other layout moves Heun's pixels by ~4/255).
    reference.unet.to(memory_format=torch.channels_last)
    reference.vae.to(memory_format=torch.channels_last)
    return reference


def _generators(seeds):
    return [torch.Generator("cpu").manual_seed(s) for s in seeds]


# The diffusers scheduler each A1111 sampler is (the diffusers documentation's table, as in test_text_to_image).
SAMPLERS = {
    "Euler a": ("EulerAncestralDiscreteScheduler", {}),
    "Euler": ("EulerDiscreteScheduler", {}),
    "DPM++ 2M Karras": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "use_karras_sigmas": True}),
    "DDIM": ("DDIMScheduler", {}),
    "Heun": ("HeunDiscreteScheduler", {}),
}


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_img2img_equals_diffusers_img2img_pipeline(tiny_model, tiny_pipe, sampler):
    from diffusers import StableDiffusionImg2ImgPipeline

    reference = _reference(StableDiffusionImg2ImgPipeline, tiny_model, *SAMPLERS[sampler])
    seeds = [21, 22]
    expected = reference(
        PROMPT, image=drawing(), strength=0.6, negative_prompt="blurry", num_inference_steps=10, guidance_scale=6.0,
        num_images_per_prompt=2, generator=_generators(seeds),
    ).images
    ours = tiny_pipe(
        GenerationRequest(
            prompt=PROMPT, negative_prompt="blurry", steps=10, cfg_scale=6.0, seed=21, n=2, width=SIZE, height=SIZE,
            sampler=sampler, image=ImageConditioning(drawing(), strength=0.6),
        )
    )
    assert ours.seeds == seeds
    for mine, theirs in zip(ours.images, expected):
        assert _max_diff(mine, theirs) <= 2


def test_img2img_seed_gives_the_same_image_alone_or_in_a_batch(tiny_pipe):
    settings = dict(prompt=PROMPT, steps=6, width=SIZE, height=SIZE, sampler="Euler a")
    image = ImageConditioning(drawing(), strength=0.7)
    batch = tiny_pipe(GenerationRequest(seed=300, n=3, image=image, **settings))
    alone = tiny_pipe(GenerationRequest(seed=302, n=1, image=image, **settings))
    assert _max_diff(batch.images[2], alone.images[0]) <= 2
    assert _max_diff(batch.images[0], batch.images[1]) > 10


def test_strength_one_ignores_the_init_image_and_equals_text_to_image(tiny_pipe):
    settings = dict(prompt=PROMPT, steps=5, seed=4, width=SIZE, height=SIZE, sampler="DPM++ 2M")
    text_only = tiny_pipe(GenerationRequest(**settings)).images[0]
    for init in (drawing(), Image.new("RGB", (SIZE, SIZE), (250, 250, 0))):
        out = tiny_pipe(GenerationRequest(**settings, image=ImageConditioning(init, strength=1.0))).images[0]
        assert _max_diff(out, text_only) <= 2


def test_strength_zero_returns_the_init_image_through_the_vae(tiny_pipe):
    from diffusers.image_processor import VaeImageProcessor

    steps = []
    out = tiny_pipe(
        GenerationRequest(prompt=PROMPT, steps=10, seed=8, width=SIZE, height=SIZE,
                          image=ImageConditioning(drawing(), strength=0.0)),
        on_step=lambda info: steps.append(info.step),
    ).images[0]
    assert steps == []  # no denoising step
    vae, processor = tiny_pipe.components.vae, VaeImageProcessor()
    posterior = vae.encode(processor.preprocess(drawing())).latent_dist
    with torch.no_grad():
        decoded = vae.decode(posterior.sample(generator=torch.Generator().manual_seed(8))).sample
    assert _max_diff(out, processor.postprocess(decoded)[0]) <= 2


def test_img2img_step_count_follows_strength(tiny_pipe):
    seen = []
    tiny_pipe(
        GenerationRequest(prompt="x", steps=10, seed=1, width=SIZE, height=SIZE, sampler="Euler",
                          image=ImageConditioning(drawing(), strength=0.55)),
        on_step=lambda info: seen.append((info.step, info.total)),
    )
    assert seen == [(k, 5) for k in range(1, 6)]  # int(10 * 0.55) = 5, as diffusers counts (A1111 runs one more)


@pytest.mark.parametrize(("sampler", "steps", "strength", "mask"),
                         [("Euler", 1, 0.75, False), ("LCM", 4, 0.2, False), ("DPM++ 2M", 2, 0.3, True)])
def test_a_strength_above_zero_runs_at_least_one_step(tiny_pipe, sampler, steps, strength, mask):
    """int(steps * strength) rounds to 0 here; A1111 still denoises (t_enc + 1 steps), so sd-app runs one
    step rather than returning the init image through the VAE while the infotext says it was denoised."""

    def run(value: float) -> tuple[Image.Image, list]:
        seen = []
        image = ImageConditioning(drawing(), strength=value, mask=box_mask() if mask else None, mask_blur=0)
        request = GenerationRequest(prompt=PROMPT, steps=steps, cfg_scale=1.5, seed=3, width=SIZE, height=SIZE,
                                    sampler=sampler, image=image)
        out = tiny_pipe(request, on_step=lambda info: seen.append((info.step, info.total)))
        assert out.request.total_steps == len(seen)
        return out.images[0], seen

    denoised, seen = run(strength)
    unchanged, none = run(0.0)
    assert int(steps * strength) == 0 and seen == [(1, 1)] and none == []
    assert _max_diff(denoised, unchanged) > 2  # the step changed the picture


# ---- inpainting -------------------------------------------------------------------------------


@pytest.mark.parametrize(("sampler", "strength"), [("Euler", 1.0), ("DPM++ 2M Karras", 0.7), ("DDIM", 1.0)])
def test_inpainting_4_channel_equals_diffusers_inpaint_pipeline(tiny_model, tiny_pipe, sampler, strength):
    from diffusers import StableDiffusionInpaintPipeline

    reference = _reference(StableDiffusionInpaintPipeline, tiny_model, *SAMPLERS[sampler])
    for seed in (5, 6):  # diffusers encodes the image once with the first generator: compare one image at a time
        expected = reference(
            PROMPT, image=drawing(), mask_image=box_mask(), strength=strength, num_inference_steps=8,
            guidance_scale=6.0, height=SIZE, width=SIZE, generator=_generators([seed]),
        ).images[0]
        expected = reference.image_processor.apply_overlay(box_mask(), drawing(), expected)  # A1111's paste-back
        ours = tiny_pipe(
            GenerationRequest(
                prompt=PROMPT, steps=8, cfg_scale=6.0, seed=seed, width=SIZE, height=SIZE, sampler=sampler,
                image=ImageConditioning(drawing(), strength=strength, mask=box_mask(), mask_blur=0),
            )
        ).images[0]
        assert _max_diff(ours, expected) <= 2


@pytest.mark.parametrize(("sampler", "strength"), [("Euler a", 1.0), ("DPM++ 2M Karras", 0.75)])
def test_inpainting_9_channel_unet_equals_diffusers_inpaint_pipeline(
    tiny_inpainting_model, tiny_inpainting_pipe, sampler, strength
):
    from diffusers import StableDiffusionInpaintPipeline

    assert tiny_inpainting_pipe.inpainting_unet
    reference = _reference(StableDiffusionInpaintPipeline, tiny_inpainting_model, *SAMPLERS[sampler])
    expected = reference(
        PROMPT, image=drawing(), mask_image=box_mask(), strength=strength, num_inference_steps=8, guidance_scale=6.0,
        height=SIZE, width=SIZE, generator=_generators([9]),
    ).images[0]
    expected = reference.image_processor.apply_overlay(box_mask(), drawing(), expected)
    ours = tiny_inpainting_pipe(
        GenerationRequest(
            prompt=PROMPT, steps=8, cfg_scale=6.0, seed=9, width=SIZE, height=SIZE, sampler=sampler,
            image=ImageConditioning(drawing(), strength=strength, mask=box_mask(), mask_blur=0),
        )
    ).images[0]
    assert _max_diff(ours, expected) <= 2


def test_inpainting_unet_also_runs_text_to_image_and_img2img(tiny_inpainting_pipe):
    txt = tiny_inpainting_pipe(GenerationRequest(prompt=PROMPT, steps=2, seed=1, width=SIZE, height=96))
    assert txt.images[0].size == (SIZE, 96)
    img = tiny_inpainting_pipe(
        GenerationRequest(prompt=PROMPT, steps=4, seed=1, width=SIZE, height=SIZE, image=ImageConditioning(drawing()))
    )
    assert img.images[0].size == (SIZE, SIZE)


@pytest.mark.parametrize("full_res", [False, True])
def test_inpainting_keeps_the_original_outside_the_blurred_mask(tiny_pipe, full_res):
    init = drawing(96)
    mask = box_mask(96, (40, 30, 60, 56))
    out = tiny_pipe(
        GenerationRequest(
            prompt=PROMPT, steps=4, seed=3, n=2, width=SIZE, height=SIZE, sampler="Euler a",
            image=ImageConditioning(init, strength=0.9, mask=mask, mask_blur=4, inpaint_full_res=full_res, padding=8)
            if full_res else ImageConditioning(init.resize((SIZE, SIZE)), strength=0.9,
                                               mask=mask.resize((SIZE, SIZE)), mask_blur=4),
        )
    )
    from pipelines.generation.masks import processed_mask

    reference = init if full_res else init.resize((SIZE, SIZE))
    blurred = np.asarray(processed_mask(mask if full_res else mask.resize((SIZE, SIZE)), False, 4))
    outside, inside = blurred == 0, blurred > 200
    for image in out.images:
        assert image.size == reference.size  # only-masked pastes into the full-size init image
        diff = np.abs(_pixels(image) - _pixels(reference)).max(-1)
        assert diff[outside].max() == 0  # the original, pixel for pixel
        assert diff[inside].mean() > 5  # and something new inside


def test_inpainting_seed_gives_the_same_image_alone_or_in_a_batch(tiny_pipe):
    image = ImageConditioning(drawing(), mask=box_mask(), masked_content="latent noise")
    settings = dict(prompt=PROMPT, steps=4, width=SIZE, height=SIZE, sampler="Euler a")
    batch = tiny_pipe(GenerationRequest(seed=50, n=2, image=image, **settings))
    alone = tiny_pipe(GenerationRequest(seed=51, image=image, **settings))
    assert _max_diff(batch.images[1], alone.images[0]) <= 2


def test_masked_content_and_invert(tiny_pipe):
    settings = dict(prompt=PROMPT, steps=4, seed=2, width=SIZE, height=SIZE, sampler="Euler")

    def run(**image_settings):
        return tiny_pipe(GenerationRequest(**settings, image=ImageConditioning(drawing(), strength=0.6,
                                                                              **image_settings))).images[0]

    outputs = {content: run(mask=box_mask(), masked_content=content) for content in
               ("fill", "original", "latent noise", "latent nothing")}
    contents = list(outputs)
    for i, a in enumerate(contents):
        for b in contents[i + 1 :]:
            assert _max_diff(outputs[a], outputs[b]) > 2, (a, b)
    inverted = Image.eval(box_mask(), lambda v: 255 - v)
    assert _max_diff(run(mask=box_mask(), invert_mask=True), run(mask=inverted)) == 0


def test_fill_paints_the_masked_area_with_the_surrounding_colours():
    from pipelines.generation.masks import fill_masked

    image = Image.new("RGB", (64, 64), (40, 80, 220))
    ImageDraw.Draw(image).rectangle((20, 20, 44, 44), fill=(250, 250, 0))  # a yellow square to hide
    filled = np.asarray(fill_masked(image, box_mask(64, (16, 16, 48, 48))))
    assert np.abs(filled.astype(int) - (40, 80, 220)).max() <= 2  # all blue, the square gone


def test_outpaint_canvas_pads_and_masks_the_new_border():
    from pipelines.generation.masks import outpaint_canvas

    canvas, mask = outpaint_canvas(drawing(), left=16, top=8)
    assert canvas.size == (80, 72) and mask.size == (80, 72)
    m = np.asarray(mask)
    assert m[:8].min() == 255 and m[:, :16].min() == 255 and m[8:, 16:].max() == 0
    assert np.array_equal(np.asarray(canvas)[8:, 16:], np.asarray(drawing()))
    assert np.array_equal(np.asarray(canvas)[0, 16:], np.asarray(drawing())[0])  # edge pixels stretched
    with pytest.raises(ValueError, match="outpaint needs at least one side"):
        outpaint_canvas(drawing())


def test_resize_modes_as_a1111():
    from pipelines.generation.masks import prepare_image

    bands = Image.new("RGB", (128, 64))
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]
    for i, colour in enumerate(colours):
        ImageDraw.Draw(bands).rectangle((32 * i, 0, 32 * i + 31, 63), fill=colour)

    def seen(mode):
        image = prepare_image(ImageConditioning(bands, resize_mode=mode), 64, 64).image
        row = np.asarray(image)[32]
        return {tuple(int(v) for v in row[x]) for x in (4, 20, 36, 60)}, np.asarray(image)

    squeezed, _ = seen("just resize")
    assert squeezed == set(colours)  # all four bands, 16 px each
    cropped, _ = seen("crop and resize")
    assert cropped == {(0, 255, 0), (0, 0, 255)}  # the middle two; the outer bands cut away
    filled, pixels = seen("resize and fill")
    assert filled == set(colours)
    assert np.array_equal(pixels[0], pixels[16]) and np.array_equal(pixels[63], pixels[48])  # stretched edges


# ---- bad input --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"strength": 1.5}, "strength must be between 0 and 1, got 1.5"),
        ({"strength": float("nan")}, "strength must be a number between 0 and 1"),
        ({"mask": Image.new("L", (SIZE, SIZE), 0)}, "mask is all black: nothing to repaint"),
        ({"mask": Image.new("L", (SIZE, SIZE), 255), "invert_mask": True}, "mask is all white"),
        ({"mask": Image.new("L", (32, 32), 255)}, "mask is 32x32 but init_image is 64x64"),
        ({"masked_content": "blur"}, "masked_content must be one of fill, original, latent noise"),
        ({"resize_mode": "stretch"}, "resize_mode must be one of just resize, crop and resize"),
        ({"mask_blur": -1}, "mask_blur must be an integer between 0 and 64, got -1"),
        ({"init_image": "file.png"}, "init_image must be a PIL image, got str"),
    ],
)
def test_bad_image_settings_name_the_field(settings, message):
    with pytest.raises(ValueError, match=None) as raised:
        ImageConditioning(**{"init_image": drawing(), **settings})
    assert message in str(raised.value)


def test_fit_mask_resizes_and_says_so():
    from pipelines.generation.masks import fit_mask

    mask, note = fit_mask(Image.new("RGB", (32, 16), (255, 255, 255)), drawing())
    assert mask.size == (SIZE, SIZE) and mask.mode == "L" and note == "mask 32x16 resized to the init image's 64x64"
    assert fit_mask(box_mask(), drawing())[1] is None


def test_request_to_dict_names_images_by_digest():
    request = GenerationRequest(prompt="x", image=ImageConditioning(drawing(), mask=box_mask()))
    settings = request.to_dict()
    assert settings["image"]["init_image"].startswith("64x64:") and settings["image"]["mask"].startswith("64x64:")
    assert "image" not in GenerationRequest(prompt="x").to_dict()
    assert request.mode == "inpaint" and GenerationRequest().mode == "txt2img"
