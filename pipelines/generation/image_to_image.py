"""Image-conditioned generation: img2img and inpainting on the text-to-image pipeline's parts.

img2img is SDEdit (Meng et al. 2022, "SDEdit: Guided Image Synthesis and Editing with Stochastic
Differential Equations"): encode the init image with the VAE, noise it to the timestep where the last
``int(steps * strength)`` steps of the schedule begin (at least the last step when the strength is above 0),
and denoise from there. For the same components,
seed, strength and sampler it draws diffusers' ``StableDiffusionImg2ImgPipeline`` picture; strength 1
starts from pure noise (the init image is ignored, as diffusers' inpainting pipeline does), strength 0
returns the init image through the VAE.

Inpainting (white = repaint), as diffusers' ``StableDiffusionInpaintPipeline``:
- an ordinary 4-channel U-Net denoises everything, and after each step the latents outside the mask
  are replaced by the init image's latents noised to the next timestep (un-noised after the last);
- an SD inpainting U-Net (``in_channels`` 9) sees the mask and the masked image's latents as five
  extra input channels at every step.
Then the original pixels are laid back over the result through the blurred mask (A1111's paste-back,
``pipelines.generation.masks``). Each image has its own seeded CPU generator for the VAE's posterior
sample and the noise, so a seed's picture does not depend on the batch.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

from pipelines.generation.denoising import GenerationInterrupted
from pipelines.generation.masks import fill_masked, prepare_image
from pipelines.generation.schedulers import build_scheduler

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from pipelines.generation.denoising import Interruption
    from pipelines.generation.request import GenerationRequest
    from pipelines.generation.text_to_image import StepCallback, TextToImagePipeline


def tail_timesteps(scheduler: Any, steps: int, run: int) -> torch.Tensor:
    """The timesteps of the last ``run`` of ``steps`` steps (diffusers' ``get_timesteps``).

    ``scheduler.set_timesteps(steps)`` must have been called; the scheduler is told where it begins, so
    ``add_noise`` and multistep solvers start from the right noise level.
    """
    start = (steps - run) * getattr(scheduler, "order", 1)
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(start)
    return scheduler.timesteps[start:]  # [evaluations of the last `run` steps]


def to_pixels(images: list[Image.Image]) -> torch.Tensor:
    """RGB images (all one size) as a [n, 3, H, W] fp32 tensor in [-1, 1] (diffusers' VaeImageProcessor)."""
    from diffusers.image_processor import VaeImageProcessor

    return VaeImageProcessor(do_resize=False).preprocess([image.convert("RGB") for image in images])


def encode(pipe: TextToImagePipeline, pixels: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
    """Scaled VAE latents [n, 4, h, w] (fp32) sampled from the posterior, one generator per image.

    ``pixels`` [1 or n, 3, H, W] in [-1, 1]; a single image is encoded once and sampled n times.
    """
    import torch
    from diffusers.utils.torch_utils import randn_tensor

    vae = pipe.components.vae
    samples = []
    posterior = None
    for index, generator in enumerate(generators):
        if posterior is None or pixels.shape[0] > 1:
            image = pixels[index : index + 1] if pixels.shape[0] > 1 else pixels
            posterior = vae.encode(image.to(pipe.device, vae.dtype)).latent_dist
        mean, std = posterior.mean.float(), posterior.std.float()  # [1, 4, h, w]
        noise = randn_tensor(mean.shape, generator=generator, dtype=torch.float32).to(mean.device)
        samples.append(mean + std * noise)
    return torch.cat(samples) * vae.config.scaling_factor  # [n, 4, h, w]


def inpainting_channels(
    pipe: TextToImagePipeline, pixels: torch.Tensor, mask: torch.Tensor, generators: list[torch.Generator]
) -> torch.Tensor:
    """An inpainting U-Net's extra input [n, 5, h, w]: the mask at latent size and the masked image's latents.

    ``pixels`` [1, 3, H, W] in [-1, 1]; ``mask`` [1, 1, H, W], 1 = repaint (binary). The masked image is
    the picture with the masked pixels set to 0 (mid-grey), as diffusers and A1111 build it.
    """
    import torch
    import torch.nn.functional as F

    masked_latents = encode(pipe, pixels * (mask < 0.5), generators)  # [n, 4, h, w]
    small_mask = F.interpolate(mask.float(), size=masked_latents.shape[-2:]).to(masked_latents.device)  # [1, 1, h, w]
    return torch.cat([small_mask.expand(len(generators), -1, -1, -1), masked_latents], dim=1)


def image_to_image(
    pipe: TextToImagePipeline,
    request: GenerationRequest,
    seeds: list[int],
    text_states: torch.Tensor,
    on_step: StepCallback | None = None,
    cancel: threading.Event | None = None,
    progress: bool = False,
    interruption: Interruption | None = None,
) -> list[Image.Image]:
    """Steps 3-6 of the pipeline for a request with an init image (module docstring); images in seed order.
    Interrupted, the pictures of the predicted clean latents are laid back as finished ones are."""
    import torch
    import torch.nn.functional as F
    from diffusers.image_processor import VaeImageProcessor
    from diffusers.utils.torch_utils import randn_tensor

    settings = request.image
    assert settings is not None
    n = len(seeds)
    # 3. Timesteps: the last int(steps * strength) steps (at least 1) of a fresh scheduler's schedule.
    scheduler = build_scheduler(request.sampler, pipe.components.scheduler_config, noise_seeds=seeds)
    scheduler.set_timesteps(request.steps, device=pipe.device)
    run = request.total_steps
    timesteps = tail_timesteps(scheduler, request.steps, run)
    # 4. Inputs at the generation size; the masked area filled first for the "fill"/"latent" contents.
    prepared = prepare_image(settings, request.width, request.height)
    source = prepared.image
    if prepared.mask is not None and settings.masked_content != "original":
        source = fill_masked(source, prepared.mask)
    pixels = to_pixels([source])  # [1, 3, H, W]
    mask = None
    if prepared.mask is not None:
        mask_processor = VaeImageProcessor(do_normalize=False, do_binarize=True, do_convert_grayscale=True)
        mask = mask_processor.preprocess(prepared.mask)  # [1, 1, H, W], 0 or 1
    # 5. Latents. Per image generator: the posterior sample of the init image (when it is used), then the noise.
    generators = pipe.generators(seeds)
    pure_noise = settings.strength == 1.0
    blending = mask is not None and not pipe.inpainting_unet
    image_latents = encode(pipe, pixels, generators) if (not pure_noise or blending) else None  # [n, 4, h, w]
    h, w = request.height // pipe.vae_scale_factor, request.width // pipe.vae_scale_factor
    noise = randn_tensor((n, pipe.latent_channels, h, w), generator=generators, dtype=torch.float32)
    noise = noise.to(pipe.device)  # [n, 4, h, w]
    latent_mask = None if mask is None else F.interpolate(mask, size=(h, w)).to(pipe.device)  # [1, 1, h, w]
    if latent_mask is not None and image_latents is not None:
        if settings.masked_content == "latent noise":
            image_latents = image_latents * (1 - latent_mask) + noise * latent_mask
        elif settings.masked_content == "latent nothing":
            image_latents = image_latents * (1 - latent_mask)
    if run == 0:
        latents = image_latents  # strength ~0: the init image through the VAE
    elif pure_noise:
        latents = noise * scheduler.init_noise_sigma
    else:
        latents = scheduler.add_noise(image_latents, noise, timesteps[:1].repeat(n))
    extra = None
    if pipe.inpainting_unet:
        known = mask if mask is not None else torch.ones_like(pixels[:, :1])  # no mask: everything is new
        extra = inpainting_channels(pipe, pixels, known, generators)  # [n, 5, h, w]
    after_step = None
    if blending:

        def after_step(index: int, current: torch.Tensor) -> torch.Tensor:
            """Outside the mask, the init image's latents at the noise level of the next step."""
            known_latents = image_latents
            if index < len(timesteps) - 1:
                known_latents = scheduler.add_noise(image_latents, noise, timesteps[index + 1 : index + 2])
            return (1 - latent_mask) * known_latents + latent_mask * current

    # 6. Denoise, decode, and lay the original back outside the mask.
    if run > 0:
        try:
            latents = pipe.denoise(
                scheduler, latents, text_states, request, generators, on_step, cancel, progress,
                timesteps=timesteps, total=run, extra_channels=extra, after_step=after_step, interruption=interruption,
            )
        except GenerationInterrupted as stop:
            if stop.clean is not None:
                pictures = pipe.decode(stop.clean, request.vae_decoder)
                stop.unfinished = {i: (prepared.paste_back(picture), stop.step) for i, picture in enumerate(pictures)}
            raise
    return [prepared.paste_back(image) for image in pipe.decode(latents, request.vae_decoder)]
