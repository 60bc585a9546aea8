"""The VAE's precision: fp32 where fp16 overflows, checked on every decode so no image comes out black.

SD VAE decoders overflow fp16's range (65504) in their last up blocks on some latents; the result is
NaN/inf, which the 8-bit conversion turns into a black image. diffusers marks such VAEs with
``force_upcast`` in their config (SDXL's pipeline honours it; SD 1.x's does not). Here: a VAE whose
config says ``force_upcast`` is kept in fp32 when the model would run in fp16, and any decode in reduced
precision that gives a non-finite value is redone in fp32, and the VAE stays in fp32 from then on.
bf16 has fp32's exponent range, so ``force_upcast`` does not apply to it (the retry still does).
"""

from __future__ import annotations

import logging
from typing import Any, TypeVar

import torch

log = logging.getLogger(__name__)
ModuleT = TypeVar("ModuleT", bound=torch.nn.Module)


class NonFiniteDecode(FloatingPointError):
    """The VAE gave NaN/inf even in fp32: the latents themselves are broken (no image is written)."""


def vae_needs_fp32(vae: Any) -> bool:
    """An fp16 VAE whose config asks for fp32 decoding (``force_upcast``)."""
    return vae.dtype == torch.float16 and bool(getattr(vae.config, "force_upcast", False))


def cast_module(module: ModuleT, dtype: torch.dtype) -> ModuleT:
    """``module.to(dtype)`` through torch's own ``nn.Module.to``, in place, returning ``module``.

    diffusers 0.42's ``ModelMixin.to`` logs "There are modules in AutoencoderKL that should be kept in float32:
    []" on every dtype cast, even for models that keep no module in fp32 (``_keep_in_fp32_modules`` is None
    for its VAEs); the cast itself is the same.
    """
    return torch.nn.Module.to(module, dtype)


def upcast_to_fp32(model: torch.nn.Module) -> None:
    """Convert ``model`` to fp32 in place, repacking any prepacked convolutions (``conv_packing``)."""
    from pipelines.speed.conv_packing import packed_convolutions, plain_weights

    with plain_weights(packed_convolutions(model)):
        cast_module(model, torch.float32)


def decode_latents(vae: Any, latents: torch.Tensor) -> torch.Tensor:
    """Scaled latents [B, C, h, w] -> pixels [B, 3, H, W] in [-1, 1] (fp32), never NaN/inf.

    A reduced-precision decode with a non-finite value is redone in fp32 and the VAE kept in fp32;
    ``NonFiniteDecode`` if fp32 is not finite either. One host sync per call (the finiteness check).
    """
    scaled = latents / vae.config.scaling_factor  # [B, C, h, w]
    pixels = vae.decode(scaled.to(vae.dtype)).sample  # [B, 3, H, W]
    if vae.dtype != torch.float32 and not bool(torch.isfinite(pixels).all()):
        log.warning("the VAE gave NaN/inf in %s; decoding in fp32 from now on", str(vae.dtype).removeprefix("torch."))
        upcast_to_fp32(vae)
        pixels = vae.decode(scaled.float()).sample
    if not bool(torch.isfinite(pixels).all()):
        raise NonFiniteDecode("the VAE decoded NaN/inf even in fp32: the latents are not finite")
    return pixels.float()
