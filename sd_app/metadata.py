"""AUTOMATIC1111's PNG ``parameters`` text: write it for our images, parse it from anyone's.

Format: the prompt (one or more lines), an optional ``Negative prompt: ...`` line, then a last line of
``Key: value`` pairs joined by ", " where values containing ``,``, ``:`` or newlines are JSON-quoted.
"""

from __future__ import annotations

import json
import math
import re
from typing import TYPE_CHECKING, Any

from pipelines.generation.conditioning import HiresFix
from pipelines.generation.request import GenerationRequest
from pipelines.generation.schedulers import resolve_sampler

if TYPE_CHECKING:
    from pipelines.models.library import ModelLibrary

VERSION = "sd-app 0.1.0"
NEGATIVE_PREFIX = "Negative prompt:"
_PAIR_RE = re.compile(r'\s*([\w ().+-]+):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')


def _quote(value: object) -> str:
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ',:\n"') else text


def format_parameters(
    request: GenerationRequest,
    seed: int,
    model_name: str,
    model_hash: str | None = None,
    extra: dict[str, Any] | None = None,
) -> str:
    """The ``parameters`` text for one image of ``request`` made with ``seed``."""
    spec = resolve_sampler(request.sampler)
    pairs: dict[str, Any] = {
        "Steps": request.steps,
        "Sampler": spec.name,
        "Schedule type": spec.schedule,
        "CFG scale": f"{request.cfg_scale:g}",
        "Seed": seed,
        "Size": f"{request.width}x{request.height}",
    }
    if request.clip_skip > 1:
        pairs["Clip skip"] = request.clip_skip  # A1111 writes it only when it is not 1
    if request.cache_interval > 1:
        pairs["DeepCache interval"] = request.cache_interval
    if request.guidance_cutoff > 0:
        pairs["CFG cutoff"] = f"{request.guidance_cutoff:g}"
    if request.eta is not None:
        pairs["Eta"] = f"{request.eta:g}"  # A1111 writes the eta it ran with when it is not the default
    if request.vae_decoder != "Full":
        pairs["VAE Decoder"] = request.vae_decoder  # A1111 writes its sd_vae_decode_method when not Full
    pairs.update(image_pairs(request))
    if model_hash:
        pairs["Model hash"] = model_hash
    pairs["Model"] = model_name
    # The initial noise comes from a CPU generator per image on every device (A1111's "Random number generator
    # source: CPU", which it writes as RNG: CPU): pasted into A1111, the infotext selects the same noise.
    pairs["RNG"] = "CPU"
    pairs.update(extra or {})
    pairs["Version"] = VERSION
    lines = [request.prompt]
    if request.negative_prompt:
        lines.append(f"{NEGATIVE_PREFIX} {request.negative_prompt}")
    lines.append(", ".join(f"{key}: {_quote(value)}" for key, value in pairs.items()))
    return "\n".join(lines).strip()  # as A1111's create_infotext: an empty prompt leaves no empty first line


def image_pairs(request: GenerationRequest) -> dict[str, Any]:
    """A1111's img2img / inpaint / hires fix keys for ``request`` (none for plain text-to-image)."""
    pairs: dict[str, Any] = {}
    if request.image is not None:
        image = request.image
        pairs["Denoising strength"] = f"{image.strength:g}"
        if image.resize_mode != "just resize":
            pairs["Resize mode"] = image.resize_mode.capitalize()
        if image.mask is not None:
            pairs["Mask blur"] = image.mask_blur
            pairs["Masked content"] = image.masked_content
            if image.invert_mask:
                pairs["Mask mode"] = "Inpaint not masked"
            if image.inpaint_full_res:
                pairs["Inpaint area"] = "Only masked"
                pairs["Masked area padding"] = image.padding
    if request.hires is not None:
        hires = request.hires
        pairs["Denoising strength"] = f"{hires.denoising_strength:g}"
        if hires.resize_x or hires.resize_y:
            pairs["Hires resize"] = f"{hires.resize_x}x{hires.resize_y}"
        else:
            pairs["Hires upscale"] = f"{hires.scale:g}"
        if hires.steps:
            pairs["Hires steps"] = hires.steps
        pairs["Hires upscaler"] = hires.upscaler
    return pairs


def hires_from_parameters(params: dict[str, Any]) -> HiresFix | None:
    """The hires fix a parsed ``parameters`` dict describes (A1111's keys), or None."""
    if not any(key in params for key in ("Hires upscale", "Hires resize", "Hires upscaler")):
        return None
    resize_x, _, resize_y = str(params.get("Hires resize", "0x0")).partition("x")
    return HiresFix(
        scale=float(params.get("Hires upscale", 2.0)),
        upscaler=str(params.get("Hires upscaler", "Latent")),
        steps=int(params.get("Hires steps", 0)),
        denoising_strength=float(params.get("Denoising strength", 0.7)),
        resize_x=int(resize_x or 0),
        resize_y=int(resize_y or 0),
    )


def image_settings_from_parameters(params: dict[str, Any]) -> dict[str, Any]:
    """The img2img / inpaint settings (``ImageConditioning`` fields but the images) a parsed dict names.

    Empty for text-to-image parameters (and for a hires fix, whose strength is its own).
    """
    if "Denoising strength" not in params or hires_from_parameters(params) is not None:
        return {}
    try:
        settings: dict[str, Any] = {"strength": float(params["Denoising strength"])}
        if "Mask blur" in params:
            settings["mask_blur"] = int(params["Mask blur"])
    except (TypeError, ValueError) as error:
        raise ValueError(f"parameters cannot be reused: {error}") from error
    if "Masked content" in params:
        settings["masked_content"] = str(params["Masked content"])
    if "Resize mode" in params:
        settings["resize_mode"] = str(params["Resize mode"]).lower()
    settings["invert_mask"] = params.get("Mask mode") == "Inpaint not masked"
    settings["inpaint_full_res"] = params.get("Inpaint area") == "Only masked"
    if "Masked area padding" in params:
        settings["padding"] = int(params["Masked area padding"])
    return settings


def parse_parameters(text: str) -> dict[str, Any]:
    """Parse A1111 ``parameters``: {"prompt", "negative_prompt", and each Key: value of the last line}.

    Raises ValueError if the text has no settings line (fewer than 3 ``Key: value`` pairs).
    """
    if not isinstance(text, str) or not text.strip():
        raise ValueError("no parameters text found")
    lines = text.strip().split("\n")
    settings_line = lines[-1]
    pairs = {m.group(1).strip(): m.group(2).strip() for m in _PAIR_RE.finditer(settings_line)}
    if len(pairs) < 3:
        raise ValueError("not AUTOMATIC1111 parameters: the last line has fewer than 3 'Key: value' pairs")
    for key, value in pairs.items():
        if value.startswith('"') and value.endswith('"') and len(value) >= 2:
            try:
                pairs[key] = json.loads(value)
            except json.JSONDecodeError:
                pass
    prompt_lines, negative_lines = [], []
    target = prompt_lines
    for line in lines[:-1]:
        if line.startswith(NEGATIVE_PREFIX):
            target = negative_lines
            line = line[len(NEGATIVE_PREFIX) :].lstrip()
        target.append(line)
    return {"prompt": "\n".join(prompt_lines), "negative_prompt": "\n".join(negative_lines), **pairs}


def with_local_loras(params: dict[str, Any], library: ModelLibrary | None, key: str = "prompt") -> dict[str, Any]:
    """``params`` with its prompt (``key``) naming the local LoRA files its ``Lora hashes`` give, as A1111 does when
    an infotext is pasted (``pipelines.models.network_hashes.local_lora_names``); unchanged without a library."""
    if library is None or not params.get("Lora hashes") or not isinstance(params.get(key), str):
        return params
    from pipelines.models.network_hashes import local_lora_names

    return {**params, key: local_lora_names(params[key], str(params["Lora hashes"]), library)}


def request_from_parameters(params: dict[str, Any]) -> GenerationRequest:
    """A request reproducing a parsed ``parameters`` dict (A1111's or ours), hires fix included.

    img2img and inpainting need their images, which the text does not hold: the request is the
    text-to-image part, and ``image_settings_from_parameters`` gives the rest.
    """
    width, _, height = str(params.get("Size", "512x512")).partition("x")
    try:
        resolved = resolve_sampler(str(params.get("Sampler", "Euler a")), str(params.get("Schedule type", "")))
        sampler = resolved.label
        return GenerationRequest(
            prompt=params.get("prompt", ""),
            negative_prompt=params.get("negative_prompt", ""),
            steps=int(params.get("Steps", 20)),
            cfg_scale=float(params.get("CFG scale", 7.0)),
            seed=int(params.get("Seed", -1)),
            width=int(width),
            height=int(height),
            clip_skip=int(params.get("Clip skip", 1)),
            sampler=sampler,
            cache_interval=int(params.get("DeepCache interval", 1)),
            guidance_cutoff=float(params.get("CFG cutoff", 0.0)),
            # A1111 also writes the ancestral samplers' Eta, which sd-app runs at 1 whatever it says
            eta=float(params["Eta"]) if "Eta" in params and resolved.spec.eta is not None else None,
            vae_decoder=str(params.get("VAE Decoder", "Full")),
            hires=hires_from_parameters(params),
        )
    except (TypeError, ValueError) as error:
        raise ValueError(f"parameters cannot be reused: {error}") from error


# What A1111's parse_generation_parameters (modules/infotext_utils.py) fills in for a key the text lacks: the value
# that key had when the image was made (a missing ``RNG`` meant the GPU's generator, the option's default).
A1111_DEFAULTS: dict[str, Any] = {
    "Clip skip": "1",
    "Hires resize-1": 0,
    "Hires resize-2": 0,
    "Hires sampler": "Use same sampler",
    "Hires checkpoint": "Use same checkpoint",
    "Hires prompt": "",
    "Hires negative prompt": "",
    "Mask mode": "Inpaint masked",
    "Masked content": "original",
    "Inpaint area": "Whole picture",
    "Masked area padding": 32,
    "RNG": "GPU",
    "Schedule type": "Automatic",
    "Schedule max sigma": 0,
    "Schedule min sigma": 0,
    "Schedule rho": 0,
    "VAE Encoder": "Full",
    "VAE Decoder": "Full",
    "FP8 weight": "Disable",
}


def a1111_parameters(text: str) -> dict[str, Any]:
    """A ``parameters`` text as A1111's ``parse_generation_parameters`` gives it (``/sdapi/v1/png-info``):
    ``Prompt``, ``Negative prompt``, then each pair as a string, a ``WxH`` value split into ``Key-1`` and
    ``Key-2`` (``Size-1``, ``Size-2``), then A1111's value for each key it fills in when missing
    (``A1111_DEFAULTS``; ``Hires resize`` only when neither half is there), and an old hires fix's ``First pass
    size`` read as A1111 reads it (the first pass's size becomes ``Size``, the final one ``Hires resize``). A text
    without a settings line is all prompt, as A1111 reads it."""
    try:
        parsed = parse_parameters(text)
    except ValueError:
        parsed = {"prompt": text.strip(), "negative_prompt": ""}
    result: dict[str, Any] = {"Prompt": parsed.pop("prompt"), "Negative prompt": parsed.pop("negative_prompt")}
    for key, value in parsed.items():
        size = re.fullmatch(r"(\d+)x(\d+)", str(value))
        if size:
            result[f"{key}-1"], result[f"{key}-2"] = size.groups()
        else:
            result[key] = str(value)
    has_hires_size = "Hires resize-1" in result
    for key, value in A1111_DEFAULTS.items():
        if key.startswith("Hires resize-") and has_hires_size:
            continue
        result.setdefault(key, value)
    _restore_first_pass_size(result)
    return result


def _restore_first_pass_size(result: dict[str, Any]) -> None:
    """A1111's reading of its old hires fix (before 1.0: ``First pass size: WxH`` beside the final ``Size``; 0x0
    meant a first pass of about 512x512 pixels, sides rounded up to multiples of 64)."""
    try:
        first = int(result["First pass size-1"]), int(result["First pass size-2"])
        width, height = int(result.get("Size-1", 512)), int(result.get("Size-2", 512))
    except (KeyError, ValueError):
        return
    if 0 in first and width > 0 and height > 0:
        scale = math.sqrt(512 * 512 / (width * height))
        first = math.ceil(scale * width / 64) * 64, math.ceil(scale * height / 64) * 64
    result["Size-1"], result["Size-2"] = first
    result["Hires resize-1"], result["Hires resize-2"] = width, height


def read_png_parameters(image: Any) -> str | None:
    """The ``parameters`` text chunk of an opened PIL image, if any."""
    info = getattr(image, "info", {}) or {}
    text = info.get("parameters")
    return text if isinstance(text, str) else None
