"""How much one served request may ask for, so that one client cannot hold a small machine for hours.

The work of a request grows with pixels x steps x images (each U-Net step touches every latent pixel
of every image); the defaults keep a request on a 2-core CPU to minutes with the embedded model and
below what runs out of memory (a single image is capped at 1024x1024 here, though the library
accepts up to 2048). Prompts are bounded in characters (checked before tokenizing, which is slow for
megabytes of text) and in CLIP tokens. ``sd-app serve`` sets them (``--max-*`` options).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipelines.generation.prompts import TokenCount
    from pipelines.generation.request import GenerationRequest


@dataclass(frozen=True)
class RequestLimits:
    """Bounds a served request must keep; ``check`` raises ValueError naming the one it breaks."""

    max_prompt_chars: int = 20_000
    max_prompt_tokens: int = 600  # 8 chunks of 75
    max_image_pixels: int = 1024 * 1024
    max_pixel_steps: int = 1024 * 1024 * 50 * 4  # e.g. 4 images at 1024x1024 x 50 steps, 16 at 512x512 x 50

    def __post_init__(self) -> None:
        for name in ("max_prompt_chars", "max_prompt_tokens", "max_image_pixels", "max_pixel_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")

    def check(self, request: GenerationRequest, count_tokens: Callable[[str], TokenCount], rounds: int = 1) -> None:
        """Raise ValueError if ``request`` asks for more than these limits allow (``rounds``: the most rounds of
        candidates a minimum score may generate, each counted as work)."""
        for name in ("prompt", "negative_prompt"):
            text = getattr(request, name)
            if len(text) > self.max_prompt_chars:
                raise ValueError(
                    f"{name} is {len(text)} characters long; this server accepts up to {self.max_prompt_chars}"
                )
            tokens = count_tokens(text).tokens
            if tokens > self.max_prompt_tokens:
                raise ValueError(f"{name} is {tokens} CLIP tokens; this server accepts up to {self.max_prompt_tokens}")
        pixels = request.width * request.height
        if pixels > self.max_image_pixels:
            raise ValueError(
                f"{request.width}x{request.height} is {pixels} pixels per image; this server accepts up to "
                f"{self.max_image_pixels} (e.g. 1024x1024)"
            )
        work = pixels * request.steps * request.n * rounds
        if work > self.max_pixel_steps:
            shown = f"{request.width}x{request.height}x{request.steps}x{request.n}"
            if rounds > 1:
                raise ValueError(
                    f"width x height x steps x images x rounds = {shown}x{rounds} = {work} (a minimum score may "
                    f"take {rounds} rounds) exceeds this server's limit of {self.max_pixel_steps}; ask for fewer "
                    "extra rounds, steps or images"
                )
            raise ValueError(
                f"width x height x steps x images = {shown} "
                f"= {work} exceeds this server's limit of {self.max_pixel_steps}; ask for fewer steps or images"
            )
