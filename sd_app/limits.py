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

    def check_text(self, name: str, text: str, count_tokens: Callable[[str], TokenCount] | None = None) -> None:
        """Raise ValueError if the prompt ``text`` is longer than allowed: in characters first (cheap), then in
        CLIP tokens when ``count_tokens`` is given. For every served use of a prompt (generating, inspecting,
        ranking), since some of that work grows faster than the prompt."""
        if len(text) > self.max_prompt_chars:
            raise ValueError(
                f"{name} is {len(text)} characters long; this server accepts up to {self.max_prompt_chars}"
            )
        if count_tokens is not None:
            tokens = count_tokens(text).tokens
            if tokens > self.max_prompt_tokens:
                raise ValueError(f"{name} is {tokens} CLIP tokens; this server accepts up to {self.max_prompt_tokens}")

    def check(
        self, request: GenerationRequest, count_tokens: Callable[[str], TokenCount] | None, rounds: int = 1
    ) -> None:
        """Raise ValueError if ``request`` asks for more than these limits allow (``rounds``: the most rounds of
        candidates a minimum score may generate, each counted as work). Without ``count_tokens`` (no model at
        hand: a server refusing before it queues) prompts are checked in characters only."""
        for name in ("prompt", "negative_prompt"):
            self.check_text(name, getattr(request, name), count_tokens)
        # The hires fix's second pass denoises and decodes the upscaled cover of the first
        cover = request.hires.target_size(request.width, request.height)[0] if request.hires is not None else None
        sizes = [("", (request.width, request.height))] + ([("hires fix ", cover)] if cover is not None else [])
        for which, (width, height) in sizes:
            if width * height > self.max_image_pixels:
                raise ValueError(
                    f"{which}{width}x{height} is {width * height} pixels per image; this server accepts up to "
                    f"{self.max_image_pixels} ({_square(self.max_image_pixels)})"
                )
        hires_steps = request.total_steps - request.steps if cover is not None else 0
        second = cover[0] * cover[1] * hires_steps if cover is not None else 0
        work = (request.width * request.height * request.steps + second) * request.n * rounds
        if work <= self.max_pixel_steps:
            return
        shown = f"{request.width}x{request.height}x{request.steps}"
        formula = "width x height x steps"
        if second:
            shown = f"({shown} + {cover[0]}x{cover[1]}x{hires_steps})"
            formula = f"({formula} + the hires pass's)"
        shown, formula = f"{shown}x{request.n}", f"{formula} x images"
        if rounds > 1:
            raise ValueError(
                f"{formula} x rounds = {shown}x{rounds} = {work} (a minimum score may take {rounds} rounds) "
                f"exceeds this server's limit of {self.max_pixel_steps}; ask for fewer extra rounds, steps or images"
            )
        raise ValueError(
            f"{formula} = {shown} = {work} exceeds this server's limit of {self.max_pixel_steps}; ask for fewer "
            "steps or images"
        )


def _square(pixels: int) -> str:
    """A limit in pixels as the square it allows: ``e.g. 1024x1024``."""
    side = int(pixels**0.5) // 8 * 8
    return f"e.g. {side}x{side}"
