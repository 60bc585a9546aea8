"""What an image-conditioned request adds to a text prompt: an init image (img2img, inpaint) or a hires fix.

Both are small frozen dataclasses that a ``GenerationRequest`` holds (``image=`` / ``hires=``), validated
like the request itself: a ValueError naming the field and its value. The names and defaults are
AUTOMATIC1111's (``modules/processing.py``, ``/sdapi/v1/img2img``): ``denoising_strength`` 0.75 for
img2img and 0.7 for the hires fix, ``mask_blur`` 4, masked content "original", inpaint area "whole
picture", 32 px of padding around the mask, "Latent" hires upscaler at scale 2.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from PIL import Image

# A1111's resize modes (``resize_mode`` 0, 1, 2) -> diffusers' VaeImageProcessor resize modes.
RESIZE_MODES: dict[str, str] = {"just resize": "default", "crop and resize": "crop", "resize and fill": "fill"}
# A1111's masked content (``inpainting_fill`` 0-3): what the masked area starts from.
MASKED_CONTENT = ("fill", "original", "latent noise", "latent nothing")
# A1111's latent upscalers (``shared.latent_upscale_modes``): torch interpolate mode and antialias.
LATENT_UPSCALERS: dict[str, tuple[str, bool]] = {
    "Latent": ("bilinear", False),
    "Latent (antialiased)": ("bilinear", True),
    "Latent (bicubic)": ("bicubic", False),
    "Latent (bicubic antialiased)": ("bicubic", True),
    "Latent (nearest)": ("nearest", False),
    "Latent (nearest-exact)": ("nearest-exact", False),
}
# Pixel upscalers: decode, resize with PIL, encode again (A1111's "Lanczos" and "Nearest").
PIXEL_UPSCALERS: dict[str, str] = {"Lanczos": "LANCZOS", "Nearest": "NEAREST"}
MAX_SIDE = 2048
MAX_MASK_BLUR = 64
MAX_PADDING = 256


def _fraction(name: str, value: object, low: float = 0.0, high: float = 1.0) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a number between {low:g} and {high:g}, got {value!r}")
    if not low <= value <= high:
        raise ValueError(f"{name} must be between {low:g} and {high:g}, got {value!r}")
    return float(value)


def _whole(name: str, value: object, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{name} must be an integer between {low} and {high}, got {value!r}")
    return value


def _choice(name: str, value: object, choices: tuple[str, ...] | list[str]) -> str:
    """The canonical spelling of ``value`` among ``choices`` (case-insensitive)."""
    if isinstance(value, str):
        wanted = " ".join(value.split()).casefold()
        for choice in choices:
            if choice.casefold() == wanted:
                return choice
    raise ValueError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


def _is_image(value: object) -> bool:
    from PIL import Image

    return isinstance(value, Image.Image)


def image_digest(image: Image.Image) -> str:
    """A short stable name for an image's pixels (12 hex of SHA-256 over mode, size and bytes)."""
    digest = hashlib.sha256(f"{image.mode}{image.size}".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()[:12]


def mask_is_empty(mask: Image.Image, invert: bool) -> bool:
    """True when nothing would be repainted: an all-black mask (all-white when inverted)."""
    low, high = mask.convert("L").getextrema()
    return low == 255 if invert else high == 0


@dataclass(frozen=True)
class ImageConditioning:
    """img2img (SDEdit, Meng et al. 2022) and inpainting settings: the init image and optional mask.

    ``strength`` (A1111's ``denoising_strength``) is how far into the noise schedule the init image is
    pushed: 0 returns it through the VAE, 1 ignores it. ``mask`` (white = repaint) must have the init
    image's size; ``resize_mode`` fits the image to the request's width x height. ``inpaint_full_res``
    (A1111's "Only masked") generates the mask's box plus ``padding`` pixels at full size and pastes
    it back; the result then has the init image's size.
    """

    init_image: Image.Image
    strength: float = 0.75
    mask: Image.Image | None = None
    mask_blur: int = 4
    masked_content: str = "original"
    inpaint_full_res: bool = False
    padding: int = 32
    invert_mask: bool = False
    resize_mode: str = "just resize"

    def __post_init__(self) -> None:
        object.__setattr__(self, "masked_content", _choice("masked_content", self.masked_content, MASKED_CONTENT))
        object.__setattr__(self, "resize_mode", _choice("resize_mode", self.resize_mode, tuple(RESIZE_MODES)))
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first bad field and its value."""
        if not _is_image(self.init_image):
            raise ValueError(f"init_image must be a PIL image, got {type(self.init_image).__name__}")
        width, height = self.init_image.size
        if not (8 <= width <= MAX_SIDE and 8 <= height <= MAX_SIDE):
            raise ValueError(f"init_image must be between 8 and {MAX_SIDE} pixels a side, got {width}x{height}")
        _fraction("strength", self.strength)
        _whole("mask_blur", self.mask_blur, 0, MAX_MASK_BLUR)
        _whole("padding", self.padding, 0, MAX_PADDING)
        for name in ("inpaint_full_res", "invert_mask"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.mask is None:
            return
        if not _is_image(self.mask):
            raise ValueError(f"mask must be a PIL image, got {type(self.mask).__name__}")
        if self.mask.size != self.init_image.size:
            raise ValueError(
                f"mask is {self.mask.width}x{self.mask.height} but init_image is {width}x{height}; "
                "resize it first (pipelines.generation.masks.fit_mask)"
            )
        if mask_is_empty(self.mask, self.invert_mask):
            colour = "white (inverted: nothing outside it)" if self.invert_mask else "black"
            raise ValueError(f"mask is all {colour}: nothing to repaint")

    @property
    def inpainting(self) -> bool:
        return self.mask is not None

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly settings; images by size and pixel digest."""
        settings: dict[str, Any] = {
            "init_image": f"{self.init_image.width}x{self.init_image.height}:{image_digest(self.init_image)}",
            "strength": self.strength,
        }
        if self.mask is not None:
            settings["mask"] = f"{self.mask.width}x{self.mask.height}:{image_digest(self.mask)}"
            settings.update(
                mask_blur=self.mask_blur,
                masked_content=self.masked_content,
                inpaint_full_res=self.inpaint_full_res,
                padding=self.padding,
                invert_mask=self.invert_mask,
            )
        settings["resize_mode"] = self.resize_mode
        return settings


@dataclass(frozen=True)
class HiresFix:
    """A1111's hires fix: upscale the first pass, then an img2img second pass at the larger size.

    The target is ``scale`` times the request's size, or ``resize_x`` x ``resize_y`` (0 = keep the
    aspect ratio from the other one; both set: upscale to cover and crop the centre). ``upscaler`` is
    one of ``LATENT_UPSCALERS`` (interpolate the latents) or ``PIXEL_UPSCALERS`` (decode, resize,
    encode). ``steps`` 0 means as many as the first pass; ``denoising_strength`` 0 skips the second pass.
    """

    scale: float = 2.0
    upscaler: str = "Latent"
    steps: int = 0
    denoising_strength: float = 0.7
    resize_x: int = 0
    resize_y: int = 0

    def __post_init__(self) -> None:
        choices = (*LATENT_UPSCALERS, *PIXEL_UPSCALERS)
        object.__setattr__(self, "upscaler", _choice("hr_upscaler", self.upscaler, choices))
        self.validate()

    def validate(self) -> None:
        _fraction("hr_scale", self.scale, 1.0, 8.0)
        _whole("hr_second_pass_steps", self.steps, 0, 150)
        _fraction("denoising_strength", self.denoising_strength)
        for name in ("resize_x", "resize_y"):
            value = _whole(f"hr_{name}", getattr(self, name), 0, MAX_SIDE)
            if value % 8:
                raise ValueError(f"hr_{name} must be a multiple of 8 (0 = from hr_scale), got {value}")

    @property
    def latent(self) -> bool:
        return self.upscaler in LATENT_UPSCALERS

    def target_size(self, width: int, height: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """((cover width, cover height), (final width, final height)) for a first pass of ``width`` x ``height``.

        The first pair is what the first pass is upscaled to; the second, the same or a centre crop of it.
        Sizes are floored to multiples of 8 (the VAE's factor); ValueError if past ``MAX_SIDE``.
        """
        if self.resize_x == 0 and self.resize_y == 0:
            cover = final = (int(width * self.scale) // 8 * 8, int(height * self.scale) // 8 * 8)
        elif self.resize_y == 0:
            cover = final = (self.resize_x, self.resize_x * height // width // 8 * 8)
        elif self.resize_x == 0:
            cover = final = (self.resize_y * width // height // 8 * 8, self.resize_y)
        else:
            final = (self.resize_x, self.resize_y)
            if width / height < self.resize_x / self.resize_y:
                cover = (self.resize_x, -(-self.resize_x * height // width // 8) * 8)
            else:
                cover = (-(-self.resize_y * width // height // 8) * 8, self.resize_y)
        if max(*cover, *final) > MAX_SIDE or min(*cover, *final) < 8:
            raise ValueError(
                f"hires fix target {final[0]}x{final[1]} (from {width}x{height}) must be between 8 and {MAX_SIDE} px"
            )
        return cover, final

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)
