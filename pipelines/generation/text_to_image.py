"""The Stable Diffusion 1.x pipeline on diffusers components: text-to-image, and the entry to image-to-image.

Latent diffusion (Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion
Models") with classifier-free guidance (Ho & Salimans 2022). The structure follows diffusers'
``StableDiffusionPipeline.__call__``: check inputs, encode prompt, timesteps, latents, denoise,
decode; for the same components, seeds and scheduler it produces the same images.
"""

from __future__ import annotations

import contextlib
import threading
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from pipelines.generation.denoising import (  # noqa: F401 - public here too
    GenerationCancelled,
    GenerationInterrupted,
    Interruption,
    StepCallback,
    StepInfo,
)
from pipelines.generation.extra_networks import (
    NEGATIVE_PROMPT_TAGS,
    ExtraNetworks,
    TextualInversion,
    parse_network_tags,
)
from pipelines.generation.prompts import TokenCount, count_tokens, encode_prompt_pair, tokenize_prompt
from pipelines.generation.request import GenerationRequest, require_request
from pipelines.generation.schedulers import build_scheduler, guidance_warning

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from pipelines.generation.denoising import DenoisingRun
    from pipelines.models.components import SDComponents


@dataclass
class TextToImageOutput:
    """Images in request order, the seed of each, and the request as actually run (seed resolved)."""

    images: list[Image.Image]
    seeds: list[int]
    request: GenerationRequest
    model_name: str
    model_hash: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


INPAINTING_CHANNELS = 9  # SD inpainting U-Nets: 4 latent + 1 mask + 4 masked-image latent channels


def counting_steps(on_step: StepCallback | None, offset: int, total: int) -> StepCallback | None:
    """``on_step`` seeing steps ``offset + 1 ..`` out of ``total`` (the hires fix's two passes count as one)."""
    if on_step is None:
        return None

    def counted(info: StepInfo) -> None:
        on_step(replace(info, step=info.step + offset, total=total))

    return counted


class TextToImagePipeline:
    """Generate images from text with a CLIP text encoder, a U-Net and a VAE (and, given an init image
    or a hires fix in the request, from an image: ``pipelines.generation.image_to_image`` and ``hires``).

    >>> pipe = load_pipeline("embedded")
    >>> out = pipe(GenerationRequest(prompt="a red circle on a blue background", seed=1))
    >>> out.images[0].save("circle.png")
    >>> green = pipe(GenerationRequest(prompt="a green circle on a blue background", seed=1,
    ...                                image=ImageConditioning(out.images[0], strength=0.6)))
    """

    def __init__(self, components: SDComponents) -> None:
        self.components = components
        self.vae_scale_factor = 2 ** (len(components.vae.config.block_out_channels) - 1)
        self._lock = threading.Lock()  # one generation at a time per loaded model
        self._latent_projection: Any = None  # latent -> RGB map for previews, fitted on first use
        self.extra_networks: ExtraNetworks | None = None  # LoRAs and embeddings (pipelines.models.networks)

    @property
    def device(self) -> torch.device:
        return self.components.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.components.unet.dtype

    @property
    def name(self) -> str:
        return self.components.name

    def count_tokens(self, prompt: str) -> TokenCount:
        """Tokens in ``prompt`` and the number of 75-token chunks it will be encoded in."""
        return count_tokens(self.components.tokenizer, prompt)

    def preview_latents(self, latents: torch.Tensor, size: int | None = None) -> list[Image.Image]:
        """Cheap RGB previews of latents [n, C, h, w] (a linear map, no VAE decode), for progress views."""
        from pipelines.generation.previews import preview, projection_for_vae

        if self._latent_projection is None:
            self._latent_projection = projection_for_vae(self.components.vae)
        return preview(latents, self._latent_projection, size=size)

    def generate(self, prompt: str, **settings: Any) -> TextToImageOutput:
        """Shorthand: ``pipe.generate("a cat", seed=1, steps=20)``."""
        return self(GenerationRequest(prompt=prompt, **settings))

    def __call__(
        self,
        request: GenerationRequest,
        *,
        on_step: StepCallback | None = None,
        cancel: threading.Event | None = None,
        progress: bool = False,
        interruption: Interruption | None = None,
    ) -> TextToImageOutput:
        """Run one request. ``on_step`` sees every step; setting ``cancel`` stops within one step.

        A request with ``image`` runs img2img or inpainting, one with ``hires`` adds the hires fix
        (``pipelines.generation.image_to_image`` and ``hires``); ``on_step`` then counts the steps of
        both passes. An ``interruption`` stops within one step too, with GenerationInterrupted holding the
        pictures of the images' predicted clean latents (``unfinished``, by position in the batch; the first
        pass's images when the hires pass had not begun, as A1111) and the steps done of ``request.total_steps``.
        """

        # 1. Check inputs (the request validates itself) and resolve a random seed.
        require_request(request)
        if request.prune_to:
            raise ValueError("early pruning (prune_to) needs a scorer: run it with pipelines.rerank.best_of.best_of_n")
        request = request.resolved()
        self.check_decoder(request.vae_decoder)
        seeds = request.seeds()
        warning = guidance_warning(request.sampler, request.cfg_scale)
        if warning:
            warnings.warn(warning, stacklevel=2)
        with self.generating():
            # 2. Encode prompt and negative prompt (classifier-free guidance needs both), the prompt's LoRAs merged.
            networks_used = self.activate_networks(request.prompt, request.negative_prompt)
            guided = request.cfg_scale > 1.0
            text_states = self.encode_prompt(
                request.prompt, request.negative_prompt, request.n, guided, request.clip_skip
            )
            try:
                images = self._images(request, seeds, text_states, on_step, cancel, progress, interruption)
            except GenerationInterrupted as stop:
                if not stop.unfinished and stop.clean is not None:
                    pictures = self.decode(stop.clean, request.vae_decoder)
                    stop.unfinished = {i: (picture, stop.step) for i, picture in enumerate(pictures)}
                stop.total, stop.extra = request.total_steps, networks_used
                raise
        return TextToImageOutput(
            images=images,
            seeds=seeds,
            request=request,
            model_name=self.components.name,
            model_hash=self.components.model_hash,
            extra=networks_used,
        )

    def _images(
        self,
        request: GenerationRequest,
        seeds: list[int],
        text_states: torch.Tensor,
        on_step: StepCallback | None,
        cancel: threading.Event | None,
        progress: bool,
        interruption: Interruption | None,
    ) -> list[Image.Image]:
        """Steps 3-6 of ``__call__`` (seed resolved, prompt encoded): the images in seed order."""
        first_pass = counting_steps(on_step, 0, request.total_steps)
        if request.image is not None:
            # 3-6. Image-conditioned: the init image's latents, noised to the strength, denoised.
            from pipelines.generation.image_to_image import image_to_image

            return image_to_image(self, request, seeds, text_states, first_pass, cancel, progress, interruption)
        # 3-4. Timesteps of a fresh scheduler, latents from one CPU generator per image.
        run = self.text_to_image_run(request, seeds, text_states)
        # 5. Denoise.
        latents = run.run(on_step=first_pass, cancel=cancel, progress=progress, interruption=interruption)
        if request.hires is not None:
            # 5b. Hires fix: upscale, noise again from the same seeds, denoise the last steps.
            from pipelines.generation.hires import hires_fix

            second_pass = counting_steps(on_step, request.steps, request.total_steps)
            try:
                latents = hires_fix(self, request, seeds, latents, text_states, second_pass, cancel, progress,
                                    interruption)
            except GenerationInterrupted as stop:
                stop.step += request.steps  # of the whole request's steps
                if stop.clean is None:  # the second pass had not begun: the first pass's images (as A1111)
                    stop.clean = latents
                raise
        # 6. Decode.
        return self.decode(latents, request.vae_decoder)

    @contextlib.contextmanager
    def generating(self) -> Iterator[None]:
        """Hold this model for one generation (one at a time per loaded model), without autograd."""
        import torch

        with self._lock, torch.inference_mode():
            yield

    def start(self, request: GenerationRequest, *, track_clean: bool = False) -> tuple[DenoisingRun, dict[str, str]]:
        """A text-to-image run of ``request`` (seed resolved) that has not taken a step yet, and the
        infotext pairs of its networks; call inside ``generating()``, step it, then ``decode`` its latents.
        ``track_clean`` keeps the predicted clean latents of each step (early pruning)."""
        if request.image is not None or request.hires is not None:
            raise ValueError("a stepwise run is plain text-to-image (no init image, no hires fix)")
        networks_used = self.activate_networks(request.prompt, request.negative_prompt)
        text_states = self.encode_prompt(
            request.prompt, request.negative_prompt, request.n, request.cfg_scale > 1.0, request.clip_skip
        )
        return self.text_to_image_run(request, request.seeds(), text_states, track_clean=track_clean), networks_used

    def text_to_image_run(
        self, request: GenerationRequest, seeds: list[int], text_states: torch.Tensor, *, track_clean: bool = False
    ) -> DenoisingRun:
        """Steps 3-4 of text-to-image: a fresh scheduler (schedulers keep per-run state) and the seeds' latents."""
        from pipelines.generation.denoising import DenoisingRun

        scheduler = build_scheduler(request.sampler, self.components.scheduler_config, noise_seeds=seeds)
        scheduler.set_timesteps(request.steps, device=self.device)
        # One CPU generator per image, so a seed's picture is independent of batch size.
        generators = self.generators(seeds)
        latents = self.prepare_latents(request, generators) * scheduler.init_noise_sigma
        extra = self.blank_inpainting_channels(latents, generators) if self.inpainting_unet else None
        return DenoisingRun(self, scheduler, latents, text_states, request, generators, extra_channels=extra,
                            track_clean=track_clean)

    @staticmethod
    def generators(seeds: list[int]) -> list[torch.Generator]:
        """One seeded CPU generator per image: the same noise on every device and at any batch size."""
        import torch

        return [torch.Generator("cpu").manual_seed(seed) for seed in seeds]

    @property
    def inpainting_unet(self) -> bool:
        """An SD inpainting U-Net (``in_channels`` 9: latents, mask, masked-image latents)."""
        return self.components.unet.config.in_channels == INPAINTING_CHANNELS

    @property
    def latent_channels(self) -> int:
        return self.components.vae.config.latent_channels

    def blank_inpainting_channels(self, latents: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
        """An inpainting U-Net's extra input when nothing is known: mask all ones, an all-grey masked image.

        (A1111's ``txt2img_image_conditioning``.) Returns [n, 5, h, w].
        """
        from pipelines.generation.image_to_image import inpainting_channels

        h, w = latents.shape[-2:]
        f = self.vae_scale_factor
        grey = latents.new_zeros(1, 3, h * f, w * f)  # [1, 3, H, W]: 0 is mid-grey in [-1, 1]
        return inpainting_channels(self, grey, latents.new_ones(1, 1, h * f, w * f), generators)

    def activate_networks(self, prompt: str, negative_prompt: str) -> dict[str, str]:
        """Merge the prompt's ``<lora:...>`` LoRAs (none: the base model) and name the embeddings it uses.

        Returns the infotext pairs beyond the model's: ``VAE hash`` and ``VAE`` (a separate VAE), ``Lora hashes``
        and ``TI hashes`` (A1111's). ValueError when the prompt has LoRA tags and this pipeline has no
        ``extra_networks``, or the negative prompt has any.
        """
        _, tags = parse_network_tags(prompt)
        if parse_network_tags(negative_prompt)[1]:
            raise ValueError(NEGATIVE_PROMPT_TAGS)
        if self.extra_networks is None:
            if tags:
                raise ValueError(f"the prompt names LoRA {tags[0].name!r} but this pipeline has no model library")
            return self.components.vae_pairs()
        used = {**self.components.vae_pairs(), **self.extra_networks.activate(tags)}
        embeddings = self.embeddings_for(prompt, negative_prompt)
        names = [n for text in (prompt, negative_prompt)
                 for n in tokenize_prompt(self.components.tokenizer, text, embeddings).embeddings_used]
        if names:
            used["TI hashes"] = ", ".join(f"{n}: {embeddings[n].short_hash}" for n in dict.fromkeys(names))
        return used

    def embeddings_for(self, *texts: str) -> dict[str, TextualInversion]:
        """The textual-inversion embeddings the texts may use (none without ``extra_networks``)."""
        return self.extra_networks.embeddings(texts) if self.extra_networks is not None else {}

    def encode_prompt(
        self, prompt: str, negative_prompt: str, n: int, guided: bool, clip_skip: int = 1
    ) -> torch.Tensor:
        """Text states for the U-Net: [2n, 77k, D] as (negative, positive) when guided, else [n, 77k, D]."""
        import torch

        c = self.components
        embeddings = self.embeddings_for(prompt, negative_prompt)
        positive, negative = encode_prompt_pair(
            c.tokenizer, c.text_encoder, prompt, negative_prompt, embeddings=embeddings, clip_skip=clip_skip
        )
        positive = positive.to(self.dtype).repeat(n, 1, 1)  # [n, 77k, D] in the U-Net's dtype
        if not guided:
            return positive
        negative = negative.to(self.dtype).repeat(n, 1, 1)  # [n, 77k, D]
        return torch.cat([negative, positive])  # [2n, 77k, D]

    def prepare_latents(self, request: GenerationRequest, generators: list[torch.Generator]) -> torch.Tensor:
        """Gaussian latents [n, C, H/8, W/8], drawn in fp32 on the CPU, one generator per image."""
        import torch
        from diffusers.utils.torch_utils import randn_tensor

        channels = self.latent_channels
        h, w = request.height // self.vae_scale_factor, request.width // self.vae_scale_factor
        # One draw per generator (randn_tensor with a list), on the CPU: the same on every device.
        latents = randn_tensor((len(generators), channels, h, w), generator=generators, dtype=torch.float32)
        return latents.to(self.device)  # [n, C, h, w], fp32 whatever the model's dtype

    def denoise(
        self,
        scheduler: Any,
        latents: torch.Tensor,
        text_states: torch.Tensor,
        request: GenerationRequest,
        generators: list[torch.Generator],
        on_step: StepCallback | None = None,
        cancel: threading.Event | None = None,
        progress: bool = False,
        *,
        timesteps: torch.Tensor | None = None,
        total: int | None = None,
        extra_channels: torch.Tensor | None = None,
        after_step: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
        interruption: Interruption | None = None,
    ) -> torch.Tensor:
        """The sampling loop (:class:`pipelines.generation.denoising.DenoisingRun`, which documents the
        arguments) run to the end: predict noise with the U-Net, apply guidance, step the scheduler."""
        from pipelines.generation.denoising import DenoisingRun

        run = DenoisingRun(
            self, scheduler, latents, text_states, request, generators,
            timesteps=timesteps, total=total, extra_channels=extra_channels, after_step=after_step,
        )
        return run.run(on_step=on_step, cancel=cancel, progress=progress, interruption=interruption)

    def check_decoder(self, vae_decoder: str) -> None:
        """ValueError if ``vae_decoder`` is "TAESD" and this model has no tiny decoder."""
        if vae_decoder == "TAESD" and self.components.tiny_decoder is None:  # found by pipelines.models.tiny_decoder
            raise ValueError(
                f"vae_decoder TAESD: {self.components.name} has no tiny decoder (for a Stable Diffusion 1.x model put "
                "TAESD's taesd_decoder.safetensors in a models folder's VAE-approx/ or vae_approx/)"
            )

    def decode(self, latents: torch.Tensor, vae_decoder: str = "Full") -> list[Image.Image]:
        """Decode latents one image at a time (bounded memory) to 8-bit RGB PIL images, with the full VAE
        decoder or (``vae_decoder`` "TAESD") the model's tiny decoder.

        A reduced-precision decode that overflows (NaN/inf) is redone in fp32, never written black
        (``pipelines.speed.vae_precision``).
        """
        from diffusers.image_processor import VaeImageProcessor

        from pipelines.speed.vae_precision import decode_latents

        self.check_decoder(vae_decoder)
        decoder = self.components.tiny_decoder if vae_decoder == "TAESD" else self.components.vae
        images = []
        for latent in latents.split(1):  # [1, C, h, w]
            pixels = decode_latents(decoder, latent)  # [1, 3, H, W], fp32
            pixels = (pixels / 2 + 0.5).clamp(0, 1)
            array = pixels.permute(0, 2, 3, 1).cpu().numpy()  # [1, H, W, 3]
            images.extend(VaeImageProcessor.numpy_to_pil(array))
        return images
