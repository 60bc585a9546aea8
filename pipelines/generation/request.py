"""What one generation is asked to do: a validated, immutable request with A1111-like defaults.

Every front end (CLI, UI, HTTP, batch) builds a ``GenerationRequest``; its ranges live here once.
"""

from __future__ import annotations

import math
import numbers
import secrets
from dataclasses import dataclass, fields, replace
from typing import Any

from pipelines.generation.conditioning import HiresFix, ImageConditioning
from pipelines.generation.schedulers import DEFAULT_SAMPLER, SAMPLERS, resolve_sampler

MAX_SEED = 2**32 - 1
RANDOM_SEED = -1
LIMITS: dict[str, tuple[float, float]] = {
    "width": (8, 2048),
    "height": (8, 2048),
    "steps": (1, 150),
    "n": (1, 16),
    "seed": (RANDOM_SEED, MAX_SEED),
    "cache_interval": (1, 10),
    "clip_skip": (1, 12),
}
VAE_DECODERS = ("Full", "TAESD")  # A1111's "VAE type for decode" (sd_vae_decode_method)
INTEGER_FIELDS = ("width", "height", "steps", "n", "seed", "cache_interval", "clip_skip", "prune_to", "prune_at")
REAL_FIELDS = ("cfg_scale", "guidance_cutoff", "eta")


def as_python_number(value: object) -> object:
    """A NumPy (or other ``numbers``) integer as ``int`` and real as ``float``, so scripts may pass
    ``np.int64`` seeds; bools and anything else unchanged, for validation to refuse."""
    if isinstance(value, bool) or isinstance(value, (int, float)):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    return value


def canonical_decoder(name: object) -> object:
    """A1111's spelling of a VAE decoder name given in any case (``"taesd"`` -> ``"TAESD"``); anything else
    unchanged, for validation to refuse."""
    if isinstance(name, str):
        return next((d for d in VAE_DECODERS if d.lower() == name.strip().lower()), name)
    return name


def _require_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    return value


def _check_range(name: str, value: int) -> None:
    low, high = LIMITS[name]
    if not low <= value <= high:
        raise ValueError(f"{name} must be between {low:g} and {high:g}, got {value!r}")


@dataclass(frozen=True)
class GenerationRequest:
    """Settings of one text-to-image request (A1111 defaults: 20 steps, CFG 7, 512x512).

    ``seed`` -1 means random; ``resolved()`` replaces it with the seed actually used.
    Opt-in accelerators that change the picture a little: ``cache_interval`` N > 1 reuses deep U-Net
    features for N-1 of every N steps (DeepCache); ``guidance_cutoff`` f drops classifier-free
    guidance for the last fraction f of the steps.
    Image ``i`` of the request uses seed ``seed + i`` (A1111's convention), each from its own
    CPU ``torch.Generator``, so a seed gives the same picture at any batch size, to the last bits of batched
    matrix products (an 8-bit level at most; tests/test_interruption.py).
    ``eta`` sets the fresh noise of a stochastic sampler's step: TCD's gamma (default 0.3, Zheng et al.
    2024), DDIM's eta (default 0).
    ``image`` makes it img2img or inpainting (``ImageConditioning``); ``hires`` adds A1111's hires fix
    to text-to-image (``HiresFix``); width and height are the size generated at (the first pass's).
    ``prune_to`` M and ``prune_at`` K (early pruning, ``pipelines.rerank.early_pruning``): all n
    candidates run K steps, the M whose predicted clean images score best are finished.
    ``vae_decoder`` "TAESD" decodes with the model's tiny decoder instead of the full VAE decoder
    (A1111's "VAE type for decode"): several times faster, slightly softer.
    """

    prompt: str = ""
    negative_prompt: str = ""
    steps: int = 20
    cfg_scale: float = 7.0
    seed: int = RANDOM_SEED
    width: int = 512
    height: int = 512
    n: int = 1
    clip_skip: int = 1  # A1111's "Clip skip": encode with the text encoder's N-th layer from the end
    sampler: str = DEFAULT_SAMPLER
    cache_interval: int = 1
    guidance_cutoff: float = 0.0
    image: ImageConditioning | None = None
    hires: HiresFix | None = None
    prune_to: int = 0  # early pruning: finish only the best M of the n candidates (0 = off)
    prune_at: int = 0  # ... scored on their predicted clean image after step K (1 <= K < steps)
    eta: float | None = None  # the sampler's step noise (TCD's gamma, DDIM's eta); None: the sampler's default
    vae_decoder: str = "Full"  # "TAESD": the model's tiny decoder (pipelines.models.tiny_decoder)

    def __post_init__(self) -> None:
        for name in INTEGER_FIELDS + REAL_FIELDS:
            object.__setattr__(self, name, as_python_number(getattr(self, name)))
        object.__setattr__(self, "vae_decoder", canonical_decoder(self.vae_decoder))
        self.validate()
        object.__setattr__(self, "sampler", resolve_sampler(self.sampler).label)  # "euler a" -> "Euler a"

    def validate(self) -> None:
        """Raise ValueError naming the first bad argument and its value."""
        for name in ("prompt", "negative_prompt"):
            text = getattr(self, name)
            if not isinstance(text, str):
                raise ValueError(f"{name} must be a string, got {text!r}")
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as error:  # a lone surrogate, e.g. a JSON "\ud800" or a mis-decoded file name
                raise ValueError(f"{name} is not valid Unicode: character {error.start} is a lone surrogate, "
                                 f"at the end of {text[max(error.start - 20, 0):error.start + 1]!r}") from None
        for name in ("width", "height"):
            value = _require_int(name, getattr(self, name))
            if value <= 0 or value % 8:
                raise ValueError(f"{name} must be a positive multiple of 8, got {value}")
            _check_range(name, value)
        for name in ("steps", "n", "cache_interval", "clip_skip"):
            _check_range(name, _require_int(name, getattr(self, name)))
        seed = _require_int("seed", self.seed)
        if seed < 0 and seed != RANDOM_SEED:
            raise ValueError(f"seed must be -1 (random) or between 0 and {MAX_SEED}, got {seed}")
        if seed > MAX_SEED:
            raise ValueError(f"seed must be -1 (random) or between 0 and {MAX_SEED}, got {seed}")
        cfg = self.cfg_scale
        if isinstance(cfg, bool) or not isinstance(cfg, (int, float)) or not math.isfinite(cfg) or cfg < 0:
            raise ValueError(f"cfg_scale must be a finite number >= 0, got {cfg!r}")
        cutoff = self.guidance_cutoff
        if isinstance(cutoff, bool) or not isinstance(cutoff, (int, float)) or not 0 <= cutoff < 1:
            raise ValueError(f"guidance_cutoff must be a fraction in [0, 1), got {cutoff!r}")
        sampler = resolve_sampler(self.sampler)
        if sampler.spec.few_step and self.steps > 50:
            raise ValueError(f"steps must be between 1 and 50 for the {sampler.name} sampler (its timesteps are the "
                             f"50 levels of the distillation grid), got {self.steps}")
        eta = self.eta
        if eta is not None and (isinstance(eta, bool) or not isinstance(eta, (int, float)) or not 0 <= eta <= 1):
            raise ValueError(f"eta must be a number in [0, 1] or None, got {eta!r}")
        if eta is not None and sampler.spec.eta is None:
            takes = ", ".join(spec.name for spec in SAMPLERS.values() if spec.eta is not None)
            raise ValueError(f"eta: the {sampler.name} sampler takes none (only {takes} do), got {eta!r}")
        if self.vae_decoder not in VAE_DECODERS:
            raise ValueError(f"vae_decoder must be one of {', '.join(VAE_DECODERS)}, got {self.vae_decoder!r}")
        if self.image is not None and not isinstance(self.image, ImageConditioning):
            raise ValueError(f"image must be an ImageConditioning, got {type(self.image).__name__}")
        if self.hires is not None:
            if not isinstance(self.hires, HiresFix):
                raise ValueError(f"hires must be a HiresFix, got {type(self.hires).__name__}")
            if self.image is not None:
                raise ValueError("hires fix is for text-to-image; run img2img at the size you want instead")
            self.hires.target_size(self.width, self.height)
        self.validate_pruning()

    def validate_pruning(self) -> None:
        """Early pruning: both or neither of prune_to (1 <= M < n) and prune_at (1 <= K < steps), text-to-image."""
        prune_to, prune_at = _require_int("prune_to", self.prune_to), _require_int("prune_at", self.prune_at)
        if prune_to == 0 and prune_at == 0:
            return
        if self.n < 2:
            raise ValueError(f"early pruning needs n >= 2 candidates, got n={self.n}")
        if not 1 <= prune_to < self.n:
            raise ValueError(
                f"prune_to must be between 1 and n - 1 = {self.n - 1} (finish fewer than the {self.n} candidates), "
                f"got {prune_to}"
            )
        if not 1 <= prune_at < self.steps:
            raise ValueError(f"prune_at must be a step between 1 and steps - 1 = {self.steps - 1}, got {prune_at}")
        if self.image is not None or self.hires is not None:
            raise ValueError("early pruning (prune_to) is for text-to-image without the hires fix")

    @property
    def total_steps(self) -> int:
        """Denoising steps actually run: img2img runs ``int(steps * strength)`` (diffusers' count), but at
        least one when the strength is above 0 (A1111 never runs none: its ``setup_img2img_steps`` and k-diffusion
        sigma slice run ``int(strength * steps) + 1``); the hires fix adds its second pass."""
        if self.image is not None:
            if self.image.strength <= 0:
                return 0  # the init image through the VAE
            return max(1, min(int(self.steps * self.image.strength), self.steps))
        if self.hires is not None and self.hires.denoising_strength > 0:
            return self.steps + (self.hires.steps or self.steps)
        return self.steps

    @property
    def mode(self) -> str:
        """``txt2img``, ``img2img`` or ``inpaint``."""
        if self.image is None:
            return "txt2img"
        return "inpaint" if self.image.inpainting else "img2img"

    def resolved(self) -> GenerationRequest:
        """The same request with a random seed drawn if ``seed`` is -1 (room left for ``n`` images)."""
        if self.seed != RANDOM_SEED:
            return self
        return replace(self, seed=secrets.randbelow(MAX_SEED - self.n + 2))

    def seeds(self) -> list[int]:
        """Seed of each image: ``seed + i``, wrapping around past 2^32 - 1."""
        if self.seed == RANDOM_SEED:
            raise ValueError("seed is -1: call resolved() first")
        return [(self.seed + index) % (MAX_SEED + 1) for index in range(self.n)]

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly settings; ``image`` and ``hires`` only when set (images by size and pixel digest)."""
        settings = {f.name: getattr(self, f.name) for f in fields(self)}
        if settings["eta"] is None:
            del settings["eta"]  # the sampler's default: settings read as they did before eta existed
        for name in ("image", "hires"):
            if settings[name] is None:
                del settings[name]  # text-to-image settings read as they always did (batch job ids)
            else:
                settings[name] = settings[name].to_dict()
        for name in ("prune_to", "prune_at"):
            if not settings[name]:
                del settings[name]  # likewise without early pruning
        if settings["vae_decoder"] == "Full":
            del settings["vae_decoder"]  # likewise with the full VAE decoder
        return settings


def require_request(request: object) -> GenerationRequest:
    """``request`` if it is a ``GenerationRequest``; ValueError otherwise (a dict of settings included:
    ``GenerationRequest(**settings)`` makes one)."""
    if not isinstance(request, GenerationRequest):
        hint = "; build one with GenerationRequest(**settings)" if isinstance(request, dict) else ""
        raise ValueError(f"request must be a GenerationRequest, got {type(request).__name__}{hint}")
    return request
