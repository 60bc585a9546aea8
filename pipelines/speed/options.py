"""Fast paths: reduced precision, memory format, fused projections and compilation.

CPU: bf16 weights for the U-Net and VAE where the processor has native bf16 (AVX512-BF16 / AMX), the
text encoder kept in fp32 (it runs once per request); channels_last for the convolutions (oneDNN's
preferred layout), their weights prepacked into oneDNN's blocked layout (``pipelines.speed.conv_packing``);
bf16 attention fused by oneDNN Graph (``pipelines.speed.cpu_attention``).
CUDA: fp16 U-Net, SDPA attention (diffusers' ``AttnProcessor2_0``), fused QKV projections, channels_last;
the VAE in fp32 when its config says ``force_upcast`` (fp16 overflows in SD VAEs' decoders; the decode
also retries in fp32 on NaN/inf, ``pipelines.speed.vae_precision``); optionally ``torch.compile``
(``mode="reduce-overhead"`` or ``"max-autotune"`` use CUDA graphs for a fixed shape).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from pipelines.speed.cpu import cpu_has_native_bf16

if TYPE_CHECKING:
    import torch

    from pipelines.models.components import SDComponents


def default_device() -> str:
    """CUDA when there is a GPU, else the CPU."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def default_dtype(device: str | torch.device) -> torch.dtype:
    """Dtype of the U-Net and VAE: fp16 on CUDA, bf16 on CPUs with native bf16, fp32 otherwise."""
    import torch

    if str(device).startswith("cuda"):
        return torch.float16
    return torch.bfloat16 if cpu_has_native_bf16() else torch.float32


def text_encoder_dtype(device: str | torch.device) -> torch.dtype:
    """fp16 on CUDA; fp32 on CPU, where the text encoder's one call per request is cheap."""
    import torch

    return torch.float16 if str(device).startswith("cuda") else torch.float32


@dataclass(frozen=True)
class SpeedOptions:
    """Load-time speed settings; they do not change the picture beyond precision effects."""

    channels_last: bool = True
    fused_cpu_attention: bool = True  # oneDNN Graph attention, used for bf16 models on CPU only
    fuse_qkv: bool = False
    compile: bool = False
    compile_mode: str | None = None  # e.g. "reduce-overhead" (CUDA graphs) on GPU
    prepack_convolutions: bool = True  # CPU, channels_last, not compiled: oneDNN-layout conv weights
    sdpa: bool = True  # CUDA: PyTorch's scaled_dot_product_attention (diffusers' AttnProcessor2_0)


def default_speed_options(device: str | torch.device) -> SpeedOptions:
    """What ``load_pipeline`` uses by default: on CUDA fp16-friendly fusions (fused QKV, SDPA, channels_last),
    on the CPU channels_last, prepacked convolutions and oneDNN Graph attention (fused QKV is 3% slower there)."""
    if str(device).startswith("cuda"):
        return SpeedOptions(channels_last=True, fuse_qkv=True, sdpa=True)
    return SpeedOptions(channels_last=True, fused_cpu_attention=True, prepack_convolutions=True)


def apply_speed_options(components: SDComponents, options: SpeedOptions) -> None:
    """Apply memory format, fusion and compilation to the U-Net and VAE in place."""
    import torch

    from pipelines.speed.vae_precision import cast_module, vae_needs_fp32

    if vae_needs_fp32(components.vae):
        cast_module(components.vae, torch.float32)
    components.unet = speed_up(components.unet, options, components.vae)
    if components.tiny_decoder is not None and options.channels_last:
        components.tiny_decoder.to(memory_format=torch.channels_last)


def speed_up(unet: torch.nn.Module, options: SpeedOptions, vae: torch.nn.Module | None = None) -> torch.nn.Module:
    """``options`` applied to a diffusers U-Net (and VAE) in place; returns the U-Net, compiled if asked."""
    import torch

    models = [unet] if vae is None else [unet, vae]
    if options.channels_last:
        for model in models:
            model.to(memory_format=torch.channels_last)
    if options.fused_cpu_attention and unet.device.type == "cpu" and unet.dtype == torch.bfloat16:
        from pipelines.speed.cpu_attention import use_fused_cpu_attention

        use_fused_cpu_attention(*models)
    elif options.sdpa and unet.device.type == "cuda":
        from diffusers.models.attention_processor import AttnProcessor2_0

        unet.set_attn_processor(AttnProcessor2_0())
    if options.fuse_qkv:
        unet.fuse_qkv_projections()  # FusedAttnProcessor2_0: SDPA over one q/k/v projection
    cpu = unet.device.type == "cpu"
    if options.prepack_convolutions and options.channels_last and cpu and not options.compile:
        from pipelines.speed.conv_packing import pack_convolutions

        for model in models:
            pack_convolutions(model)
    if options.compile:
        return torch.compile(unet, mode=options.compile_mode, fullgraph=False)
    return unet
