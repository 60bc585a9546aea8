"""FLOP counting for the roofline table (scripts/bench_flops.py): attention is counted, exactly."""

from __future__ import annotations

import math

from pipelines.models.shipped import SD1_CONFIG_DIR
from pipelines.speed.roofline import matmul_peak_flops, unet_flops


def _attention_flops(batch: int) -> int:
    """SD 1.5: per transformer block 2 * 2 * B * (N^2 + 77 N) * C (Q K^T and weights x V, self and cross)."""
    blocks = {64: (320, 5), 32: (640, 5), 16: (1280, 5), 8: (1280, 1)}  # latent side: (channels, blocks)
    return sum(4 * batch * ((side * side) ** 2 + 77 * side * side) * channels * count
               for side, (channels, count) in blocks.items())


def test_sd15_unet_flops_count_attention_and_scale_with_batch():
    cfg = unet_flops(SD1_CONFIG_DIR / "unet", batch=2, latent=64)
    assert cfg.attention == _attention_flops(2)  # SDPA is counted (as two batched matmuls)
    assert {"aten.convolution", "aten.addmm", "aten.bmm"} <= set(cfg.by_operator)
    assert cfg.total == sum(cfg.by_operator.values())
    assert 1.5e12 < cfg.total < 1.7e12  # about 0.8 TFLOP per image per step, as published for SD 1.5
    single = unet_flops(SD1_CONFIG_DIR / "unet", batch=1, latent=64)
    assert single.total * 2 == cfg.total


def test_matmul_peak_is_a_rate():
    rate = matmul_peak_flops(64, repeats=2)
    assert rate > 0 and math.isfinite(rate)
