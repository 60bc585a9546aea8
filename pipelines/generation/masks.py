"""Inpainting masks and their images, as AUTOMATIC1111 prepares them (``modules/processing.py``, ``masking.py``).

White = repaint. The mask is inverted if asked, blurred (Gaussian, sigma = ``mask_blur`` px), and
either resized with the image to the generation size ("whole picture") or used to crop the image to
the mask's box plus padding, grown to the generation's aspect ratio ("only masked"). After
generation the original pixels are laid back over the result through the blurred mask, so outside the
mask the picture is the original, pixel for pixel. Resizing, cropping, blurring and the paste-back are
diffusers' ``VaeImageProcessor`` methods (its ``get_crop_region`` and ``apply_overlay`` follow A1111).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from pipelines.generation.conditioning import RESIZE_MODES, ImageConditioning

if TYPE_CHECKING:
    from PIL import Image

FILL_RADII = (64, 16, 4, 1)  # coarse to fine Gaussian sigmas of the "fill" masked content


def _processor(vae_scale_factor: int = 8):  # noqa: ANN202 - diffusers' VaeImageProcessor
    from diffusers.image_processor import VaeImageProcessor

    return VaeImageProcessor(vae_scale_factor=vae_scale_factor)


def resize_image(image: Image.Image, width: int, height: int, resize_mode: str) -> Image.Image:
    """``image`` at ``width`` x ``height`` by an A1111 resize mode (Lanczos, as A1111 and diffusers resize)."""
    if image.size == (width, height):
        return image.copy()
    mode = RESIZE_MODES[resize_mode]
    resized = _processor().resize(image, height=height, width=width, resize_mode=mode)
    return resized.convert(image.mode)


def fit_mask(mask: Image.Image, image: Image.Image) -> tuple[Image.Image, str | None]:
    """The mask as 8-bit grey at the image's size, and a note saying so when it had to be resized."""
    grey = mask.convert("L")
    if grey.size == image.size:
        return grey, None
    note = f"mask {grey.width}x{grey.height} resized to the init image's {image.width}x{image.height}"
    return grey.resize(image.size, resample=_lanczos()), note


def _lanczos() -> int:
    from PIL import Image

    return Image.Resampling.LANCZOS


def processed_mask(mask: Image.Image, invert: bool, blur: int) -> Image.Image:
    """Grey mask, inverted if asked (A1111 "Inpaint not masked"), then Gaussian-blurred by ``blur`` px."""
    from PIL import ImageOps

    grey = mask.convert("L")
    if invert:
        grey = ImageOps.invert(grey)
    return _processor().blur(grey, blur) if blur > 0 else grey


def fill_masked(image: Image.Image, mask: Image.Image) -> Image.Image:
    """A1111's "fill" masked content: the masked area painted with the colours around it.

    Normalised convolution: Gaussian-blurred known pixels divided by the blurred known-pixel weight,
    coarse radii first and finer ones over them wherever enough known pixels are near.
    """
    from PIL import Image
    from scipy import ndimage

    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)  # [H, W, 3]
    known = (np.asarray(mask.convert("L")) < 128).astype(np.float32)  # [H, W], 1 = keep
    if known.sum() == 0:
        return Image.new("RGB", image.size, (127, 127, 127))
    filled = np.broadcast_to(pixels[known > 0].mean(0), pixels.shape).copy()  # [H, W, 3] mean known colour
    for sigma in FILL_RADII:
        weight = ndimage.gaussian_filter(known, sigma)  # [H, W]
        near = weight > 1e-3
        for channel in range(3):
            blurred = ndimage.gaussian_filter(pixels[..., channel] * known, sigma)
            filled[..., channel][near] = blurred[near] / weight[near]
    out = np.where(known[..., None] > 0, pixels, filled)
    return Image.fromarray(np.clip(out + 0.5, 0, 255).astype(np.uint8))


def outpaint_canvas(
    image: Image.Image, left: int = 0, right: int = 0, top: int = 0, bottom: int = 0
) -> tuple[Image.Image, Image.Image]:
    """Outpainting: the image padded on each side (edge pixels stretched) and a mask of the new border."""
    from PIL import Image

    for name, value in (("left", left), ("right", right), ("top", top), ("bottom", bottom)):
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 1024:
            raise ValueError(f"outpaint {name} must be an integer between 0 and 1024 pixels, got {value!r}")
    if left + right + top + bottom == 0:
        raise ValueError("outpaint needs at least one side with pixels > 0")
    pixels = np.asarray(image.convert("RGB"))  # [H, W, 3]
    padded = np.pad(pixels, ((top, bottom), (left, right), (0, 0)), mode="edge")  # [H + t + b, W + l + r, 3]
    mask = np.full(padded.shape[:2], 255, dtype=np.uint8)
    mask[top : top + pixels.shape[0], left : left + pixels.shape[1]] = 0
    return Image.fromarray(padded), Image.fromarray(mask, mode="L")


@dataclass(frozen=True)
class PreparedImage:
    """The init image and mask at the generation size, and what the paste-back needs.

    ``image``/``mask`` are what the model sees (``width`` x ``height``); ``base`` and ``overlay_mask``
    are the picture the result is pasted into and the mask it is pasted through; ``crop_box`` is the
    region of ``base`` the result goes to (None: all of it).
    """

    image: Image.Image  # RGB, width x height
    mask: Image.Image | None  # L, width x height, blurred; None for plain img2img
    base: Image.Image  # RGB, the output size
    overlay_mask: Image.Image | None  # L, the output size
    crop_box: tuple[int, int, int, int] | None  # (x1, y1, x2, y2) in base

    def paste_back(self, result: Image.Image) -> Image.Image:
        """The generated picture laid into ``base`` through the blurred mask (original pixels outside it)."""
        if self.overlay_mask is None:
            return result
        return _processor().apply_overlay(self.overlay_mask, self.base, result, self.crop_box)


def prepare_image(settings: ImageConditioning, width: int, height: int) -> PreparedImage:
    """The init image and mask of ``settings`` ready for a ``width`` x ``height`` generation (see module doc)."""
    init = settings.init_image.convert("RGB")
    if settings.mask is None:
        image = resize_image(init, width, height, settings.resize_mode)
        return PreparedImage(image, None, image, None, None)
    mask = processed_mask(settings.mask, settings.invert_mask, settings.mask_blur)  # L, init image size
    if settings.inpaint_full_res:
        box = _processor().get_crop_region(mask, width, height, pad=settings.padding)
        image = resize_image(init.crop(box), width, height, "resize and fill")
        cropped_mask = resize_image(mask.crop(box), width, height, "resize and fill")
        return PreparedImage(image, cropped_mask, init, mask, box)
    image = resize_image(init, width, height, settings.resize_mode)
    mask = resize_image(mask, width, height, settings.resize_mode)
    overlay = mask.point(lambda value: min(2 * value, 255))  # A1111: the blurred edge's inner half is all new
    return PreparedImage(image, mask, image, overlay, None)


def generation_size(image: Image.Image) -> tuple[int, int]:
    """A generation size for an init image: its own, floored to multiples of 8 (at least 8, at most 2048)."""
    return tuple(min(max(side // 8 * 8, 8), 2048) for side in image.size)  # type: ignore[return-value]


def image_conditioning(
    init_image: Image.Image,
    mask: Image.Image | None = None,
    *,
    outpaint: dict[str, int] | None = None,
    **settings: object,
) -> tuple[ImageConditioning, list[str]]:
    """Settings for an init image and optional mask as a user gives them, with notes on what was adjusted.

    A mask of another size is resized to the image (and a note says so); ``outpaint`` ({"left": px, ...})
    pads the image and makes the mask of the new border (combined with ``mask`` if one is given), with
    "fill" as the default masked content. Every front end (CLI, API, UI) builds its settings here.
    """
    notes: list[str] = []
    if mask is not None:
        mask, note = fit_mask(mask, init_image)
        if note:
            notes.append(note)
    if outpaint:
        canvas, border = outpaint_canvas(init_image, **outpaint)
        if mask is not None:
            from PIL import Image as PILImage
            from PIL import ImageChops

            padded = PILImage.new("L", border.size, 0)
            padded.paste(mask, (outpaint.get("left", 0), outpaint.get("top", 0)))
            border = ImageChops.lighter(border, padded)
        init_image, mask = canvas, border
        settings = {"masked_content": "fill", **settings}
        notes.append(f"outpainting: canvas {canvas.width}x{canvas.height}")
    return ImageConditioning(init_image, mask=mask, **settings), notes  # type: ignore[arg-type]

