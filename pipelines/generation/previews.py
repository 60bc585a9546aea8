"""Cheap latent -> RGB previews for the denoise loop (no VAE decode per step).

Each latent pixel covers an 8x8 image patch, and a linear map of its channels (plus a bias)
approximates that patch's mean colour well enough to watch an image form. For SD 1.x the
coefficients below are the widely used ones (ComfyUI ``latent_formats.SD15``), for the scaled
latents the U-Net sees (VAE mean * 0.18215). For any other VAE, ``fit_latent_rgb_projection``
fits the map by least squares on a few colour images encoded with that VAE.

On a GPU a step callback that copies latents to the host waits for the step to finish, which stalls
the queue of kernels every step. ``LatentCopy`` starts the copy without waiting (pinned memory, a CUDA
event); ``PreviewStream`` keeps the newest copy that has arrived, so previews lag a step or so behind
instead of slowing every step down.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image


@dataclass(frozen=True)
class LatentRGBProjection:
    """rgb = latent_channels @ weight + bias, rgb in about [-1, 1]."""

    weight: tuple[tuple[float, float, float], ...]  # [C, 3]
    bias: tuple[float, float, float] = (0.0, 0.0, 0.0)

    @property
    def channels(self) -> int:
        return len(self.weight)

    def apply(self, latents: torch.Tensor) -> torch.Tensor:
        """[B, C, h, w] latents -> [B, 3, h, w] RGB in about [-1, 1]."""
        if latents.ndim != 4 or latents.shape[1] != self.channels:
            raise ValueError(f"latents must have shape [B, {self.channels}, h, w], got {list(latents.shape)}")
        weight = torch.tensor(self.weight, dtype=torch.float32, device=latents.device)  # [C, 3]
        bias = torch.tensor(self.bias, dtype=torch.float32, device=latents.device)  # [3]
        rgb = torch.einsum("bchw,cr->brhw", latents.float(), weight)  # [B, 3, h, w]
        return rgb + bias[None, :, None, None]


SD1_LATENT_RGB = LatentRGBProjection(
    weight=(
        #  R        G        B
        (0.3512, 0.2297, 0.3227),
        (0.3250, 0.4974, 0.2350),
        (-0.2829, 0.1762, 0.2721),
        (-0.2120, -0.2616, -0.7177),
    ),
)


class LatentCopy:
    """A host copy of step latents [n, C, h, w], started without waiting for the device."""

    def __init__(self, latents: torch.Tensor, step: int = 0) -> None:
        self.step = step
        self._event: Any = None
        if latents.device.type == "cuda":
            self._host = torch.empty(latents.shape, dtype=latents.dtype, pin_memory=True)
            self._host.copy_(latents.detach(), non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._host = latents.detach().to("cpu", copy=True)

    def ready(self) -> bool:
        """True once the copy has arrived (never waits)."""
        return self._event is None or bool(self._event.query())

    def wait(self) -> torch.Tensor:
        """The latents on the host, waiting for the copy if it is still under way."""
        if self._event is not None:
            self._event.synchronize()
        return self._host


class PreviewStream:
    """Step latents on their way to the host: ``push`` every step, ``latest`` the newest that has arrived."""

    def __init__(self) -> None:
        self._pending: list[LatentCopy] = []
        self._shown = -1

    def push(self, latents: torch.Tensor, step: int) -> None:
        self._pending.append(LatentCopy(latents, step))

    def latest(self) -> LatentCopy | None:
        """The newest arrived copy not handed out before (None when nothing new has arrived); never waits."""
        arrived = [copy for copy in self._pending if copy.ready()]
        if not arrived:
            return None
        newest = arrived[-1]
        self._pending = [copy for copy in self._pending if copy.step > newest.step]
        if newest.step <= self._shown:
            return None
        self._shown = newest.step
        return newest


def preview(
    latents: torch.Tensor, projection: LatentRGBProjection = SD1_LATENT_RGB, size: int | None = None
) -> list[Image.Image]:
    """[B, C, h, w] latents -> B small RGB images (h x w, or longest side ``size``)."""
    rgb = projection.apply(latents.detach().float().cpu())  # [B, 3, h, w]
    pixels = ((rgb + 1.0) / 2.0).clamp(0.0, 1.0).mul(255.0).round().to(torch.uint8)
    arrays = pixels.permute(0, 2, 3, 1).numpy()  # [B, h, w, 3]
    images = [Image.fromarray(np.ascontiguousarray(a)) for a in arrays]
    if size is not None:
        h, w = arrays.shape[1:3]
        scale = size / max(h, w)
        new = (max(1, round(w * scale)), max(1, round(h * scale)))
        images = [im.resize(new, Image.Resampling.BILINEAR) for im in images]
    return images


def calibration_images(n: int = 16, size: int = 64, seed: int = 0) -> torch.Tensor:
    """8 solid colours (black, white, primaries, secondaries) + smooth random colour fields.

    Returns [n, 3, size, size] in [-1, 1], the VAE's input range.
    """
    corners = torch.tensor(
        [[0, 0, 0], [1, 1, 1], [1, 0, 0], [0, 1, 0], [0, 0, 1], [0, 1, 1], [1, 0, 1], [1, 1, 0]],
        dtype=torch.float32,
    )
    solid = corners[: min(n, 8), :, None, None].expand(-1, 3, size, size)  # [s, 3, S, S]
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(max(0, n - 8), 3, 4, 4, generator=generator)  # [r, 3, 4, 4]
    smooth = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    return torch.cat([solid, smooth]) * 2.0 - 1.0  # [n, 3, S, S]


@torch.no_grad()
def fit_latent_rgb_projection(
    vae: Any, n_images: int = 16, size: int = 64, seed: int = 0
) -> LatentRGBProjection:
    """Least-squares latent -> RGB map for any diffusers ``AutoencoderKL``.

    Encodes ``calibration_images`` (posterior mean, times ``scaling_factor`` like the pipeline's
    latents), average-pools the images to the latent grid, and solves [latent, 1] @ W = rgb.
    """
    param = next(vae.parameters())
    images = calibration_images(n_images, size, seed)  # [n, 3, S, S]
    posterior = vae.encode(images.to(param.device, param.dtype)).latent_dist
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    latents = (posterior.mean.float().cpu() - shift) * vae.config.scaling_factor  # [n, C, h, w]
    target = torch.nn.functional.adaptive_avg_pool2d(images, latents.shape[-2:])  # [n, 3, h, w]
    channels = latents.shape[1]
    inputs = latents.permute(0, 2, 3, 1).reshape(-1, channels).double()  # [P, C]
    inputs = torch.cat([inputs, torch.ones(len(inputs), 1, dtype=torch.float64)], dim=1)  # [P, C+1]
    outputs = target.permute(0, 2, 3, 1).reshape(-1, 3).double()  # [P, 3]
    solution = torch.linalg.lstsq(inputs, outputs).solution  # [C+1, 3]
    weight = tuple(tuple(float(v) for v in row) for row in solution[:channels])
    bias = tuple(float(v) for v in solution[channels])
    return LatentRGBProjection(weight=weight, bias=bias)  # type: ignore[arg-type]


def projection_for_vae(vae: Any, n_images: int = 16, size: int = 64) -> LatentRGBProjection:
    """The SD 1.x coefficients for the SD 1.x VAE (4 latent channels, scaling 0.18215, widths
    128/256/512/512), else a map fitted to ``vae``. Call once per loaded model and keep the result.
    """
    config = vae.config
    is_sd1 = (
        getattr(config, "latent_channels", None) == 4
        and abs(float(getattr(config, "scaling_factor", 0.0)) - 0.18215) < 1e-6
        and list(getattr(config, "block_out_channels", [])) == [128, 256, 512, 512]
    )
    return SD1_LATENT_RGB if is_sd1 else fit_latent_rgb_projection(vae, n_images=n_images, size=size)
