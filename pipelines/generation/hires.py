"""AUTOMATIC1111's hires fix: a second, img2img pass over an upscaled first pass (``modules/processing.py``).

The first pass runs at width x height. Its latents are upscaled to the target size, either in latent
space (``F.interpolate`` with A1111's latent modes) or in pixels (VAE decode, PIL resize, encode again).
Fresh noise from the same seeds at the new shape is added at the start of the second pass, which runs
the last ``hr_second_pass_steps`` (0: as many as the first pass) steps of a schedule of
``int(steps / min(denoising_strength, 0.999))`` steps, A1111's ``setup_img2img_steps`` with explicit steps.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from pipelines.generation.conditioning import LATENT_UPSCALERS, PIXEL_UPSCALERS
from pipelines.generation.image_to_image import encode, tail_timesteps, to_pixels
from pipelines.generation.schedulers import build_scheduler

if TYPE_CHECKING:
    import torch

    from pipelines.generation.denoising import Interruption
    from pipelines.generation.request import GenerationRequest
    from pipelines.generation.text_to_image import StepCallback, TextToImagePipeline


def second_pass_schedule(steps: int, denoising_strength: float) -> tuple[int, int]:
    """(schedule length, steps run): the second pass runs the last ``steps`` of ``int(steps / min(d, 0.999))``."""
    if denoising_strength <= 0:
        return 0, 0
    return int(steps / min(denoising_strength, 0.999)), steps


def _centre_crop(tensor: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The central ``height`` x ``width`` of a [n, c, H, W] tensor."""
    top, left = (tensor.shape[-2] - height) // 2, (tensor.shape[-1] - width) // 2
    return tensor[..., top : top + height, left : left + width]


def upscale_latents(latents: torch.Tensor, upscaler: str, cover: tuple[int, int], final: tuple[int, int],
                    factor: int) -> torch.Tensor:
    """Latents [n, 4, h, w] interpolated to ``cover`` pixels (A1111's latent mode) and cropped to ``final``."""
    import torch.nn.functional as F

    mode, antialias = LATENT_UPSCALERS[upscaler]
    size = (cover[1] // factor, cover[0] // factor)
    upscaled = F.interpolate(latents, size=size, mode=mode, antialias=antialias)  # [n, 4, H/8, W/8]
    return _centre_crop(upscaled, final[1] // factor, final[0] // factor)


def upscale_pixels(images: list, upscaler: str, cover: tuple[int, int], final: tuple[int, int]) -> list:
    """PIL images resized to ``cover`` with ``upscaler``'s filter and centre-cropped to ``final``."""
    from PIL import Image

    resample = getattr(Image.Resampling, PIXEL_UPSCALERS[upscaler])
    left, top = (cover[0] - final[0]) // 2, (cover[1] - final[1]) // 2
    box = (left, top, left + final[0], top + final[1])
    return [image.resize(cover, resample=resample).crop(box) for image in images]


def hires_fix(
    pipe: TextToImagePipeline,
    request: GenerationRequest,
    seeds: list[int],
    latents: torch.Tensor,
    text_states: torch.Tensor,
    on_step: StepCallback | None = None,
    cancel: threading.Event | None = None,
    progress: bool = False,
    interruption: Interruption | None = None,
) -> torch.Tensor:
    """The second pass over the first pass's ``latents`` [n, 4, h, w]; returns latents at the target size."""
    import torch
    from diffusers.utils.torch_utils import randn_tensor

    hires = request.hires
    assert hires is not None
    cover, final = hires.target_size(request.width, request.height)
    steps = hires.steps or request.steps
    schedule, run = second_pass_schedule(steps, hires.denoising_strength)
    generators = pipe.generators(seeds)  # fresh, from the same seeds
    shape = (len(seeds), pipe.latent_channels, final[1] // pipe.vae_scale_factor, final[0] // pipe.vae_scale_factor)
    # 1. Upscale: in latent space, or decode -> resize -> encode (posterior sampled before the noise is drawn).
    if hires.latent:
        upscaled = upscale_latents(latents, hires.upscaler, cover, final, pipe.vae_scale_factor)
    else:
        images = upscale_pixels(pipe.decode(latents, request.vae_decoder), hires.upscaler, cover, final)
        upscaled = encode(pipe, to_pixels(images), generators)
    if run == 0:
        return upscaled
    # 2. Fresh noise at the new shape, added at the first timestep of the tail of the longer schedule.
    noise = randn_tensor(shape, generator=generators, dtype=torch.float32).to(pipe.device)  # [n, 4, H/8, W/8]
    scheduler = build_scheduler(request.sampler, pipe.components.scheduler_config, noise_seeds=seeds)
    scheduler.set_timesteps(schedule, device=pipe.device)
    timesteps = tail_timesteps(scheduler, schedule, run)
    noisy = scheduler.add_noise(upscaled.to(pipe.device), noise, timesteps[:1].repeat(len(seeds)))
    extra = pipe.blank_inpainting_channels(noisy, generators) if pipe.inpainting_unet else None
    # 3. Denoise (``on_step`` already counts on from the first pass).
    return pipe.denoise(
        scheduler, noisy, text_states, request, generators, on_step, cancel, progress,
        timesteps=timesteps, total=run, interruption=interruption, extra_channels=extra,
    )
