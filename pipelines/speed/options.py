"""Fast paths: reduced precision, memory format, fused projections and compilation.

CPU: bf16 weights for the U-Net and VAE where the processor has native bf16 (AVX512-BF16 / AMX), the
text encoder kept in fp32 (it runs once per request); channels_last for the convolutions (oneDNN's
preferred layout); bf16 attention fused by oneDNN Graph (``pipelines.speed.cpu_attention``).
CUDA: fp16, SDPA attention (diffusers' default), fused QKV projections, channels_last, optionally
``torch.compile`` (``mode="max-autotune"`` uses CUDA graphs for a fixed shape).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from pipelines.models.components import SDComponents


def default_device() -> str:
    """CUDA when there is a GPU, else the CPU."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def cpu_has_native_bf16() -> bool:
    """True when this CPU computes bf16 natively (AVX512-BF16 or AMX), where bf16 is a real speed-up."""
    import torch

    cpu = getattr(torch, "cpu", None)
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(cpu, name, lambda: False)()) for name in checks)


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
    compile_mode: str | None = None  # e.g. "max-autotune" (CUDA graphs) on GPU


def apply_speed_options(components: SDComponents, options: SpeedOptions) -> None:
    """Apply memory format, fusion and compilation to the U-Net and VAE in place."""
    import torch

    unet = components.unet
    if options.channels_last:
        unet.to(memory_format=torch.channels_last)
        components.vae.to(memory_format=torch.channels_last)
    if options.fused_cpu_attention and unet.device.type == "cpu" and unet.dtype == torch.bfloat16:
        from pipelines.speed.cpu_attention import use_fused_cpu_attention

        use_fused_cpu_attention(unet, components.vae)
    if options.fuse_qkv:
        unet.fuse_qkv_projections()
    if options.compile:
        components.unet = torch.compile(unet, mode=options.compile_mode, fullgraph=False)
