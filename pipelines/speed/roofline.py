"""Where a denoising step's time goes against the machine's limit: the U-Net's FLOPs per step and the
processor's measured bf16 matmul peak.

FLOPs are counted with ``torch.utils.flop_counter.FlopCounterMode`` on a meta-device U-Net (no weights,
no compute): convolutions, linear layers (addmm/mm) and attention (SDPA decomposes to two batched
matmuls on the meta device, so Q K^T and weights x V are counted as bmm). A multiply-add counts as 2
FLOPs. Not counted: normalisations, softmax, activations, residual adds and upsampling, which are a
fraction of a percent of the FLOPs but memory-bound, so they take time out of proportion.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch


@dataclass(frozen=True)
class FlopCount:
    """FLOPs of one U-Net call, in total and by ATen operator (``aten.convolution``, ``aten.bmm``, ...)."""

    total: int
    by_operator: dict[str, int]

    @property
    def attention(self) -> int:
        return self.by_operator.get("aten.bmm", 0)


def unet_flops(unet_config: dict[str, Any] | str | Path, batch: int = 2, latent: int = 64,
               text_tokens: int = 77) -> FlopCount:
    """FLOPs of one U-Net call on latents [batch, C, latent, latent] (batch 2 = one image with CFG)."""
    from diffusers import UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    config = UNet2DConditionModel.load_config(unet_config) if isinstance(unet_config, (str, Path)) else unet_config
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
        sample = torch.empty(batch, unet.config.in_channels, latent, latent)  # [B, C, h, w]
        states = torch.empty(batch, text_tokens, unet.config.cross_attention_dim)  # [B, 77, D]
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        unet(sample, 500, encoder_hidden_states=states)
    counts = counter.get_flop_counts()["Global"]
    return FlopCount(int(counter.get_total_flops()), {str(op): int(n) for op, n in counts.items()})


def matmul_peak_flops(size: int = 4096, dtype: torch.dtype = torch.bfloat16, repeats: int = 5,
                      device: str = "cpu", clock: Any = time.perf_counter) -> float:
    """The best FLOP/s of a [size x size] @ [size x size] matmul over ``repeats`` runs (after one warm-up):
    what this processor's GEMM kernel reaches, the practical ceiling for the U-Net's convolutions and
    projections. ``clock=time.process_time`` gives FLOPs per CPU-second (robust to other processes
    sharing the cores when one thread runs)."""
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=generator).to(device, dtype)
    b = torch.randn(size, size, generator=generator).to(device, dtype)
    torch.matmul(a, b)
    best = float("inf")
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = clock()
        torch.matmul(a, b)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        best = min(best, clock() - start)
    return 2 * size**3 / best
