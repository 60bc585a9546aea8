"""The side-by-side benchmark behind ``sd-app bench``: plain diffusers against our pipeline's modes.

All modes run in one process on the same weights, alternating after a warm-up, so the ratios hold
even on a machine with other load. Per mode: seconds per denoising step (between step callbacks),
seconds per image (encode + denoise + decode), peak memory during the run (RSS growth on CPU, max
allocated on CUDA), the ratio to diffusers, and PSNR against diffusers' fp32 image of the same seed.
"""

from __future__ import annotations

import math
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.generation.request import GenerationRequest
from pipelines.models.modes import DEFAULT_MODES, GPU_MODES, REFERENCE, Mode, Runner
from pipelines.speed.measure import psnr


@dataclass
class Measurement:
    mode: str
    seconds_per_step: list[float] = field(default_factory=list)
    seconds_per_image: list[float] = field(default_factory=list)
    peak_memory_mb: list[float] = field(default_factory=list)
    psnr_db: float = math.nan


def run_benchmark(
    model: str | Path,
    *,
    modes: list[Mode] | None = None,
    steps: int = 20,
    size: int = 512,
    cfg_scale: float = 7.5,
    repeats: int = 1,
    seed: int = 1234,
    prompt: str = "a red circle on a blue background",
    device: str | None = None,
    log: Callable[[str], None] = print,
) -> list[Measurement]:
    """Time every mode on the same request, alternating modes within each repeat."""
    from pipelines.speed.options import default_device

    device = device or default_device()
    modes = modes or DEFAULT_MODES + (GPU_MODES if device.startswith("cuda") else [])
    runner = Runner(model, device, modes)
    from pipelines.generation.schedulers import sampler_for_config
    from pipelines.models.shipped import read_scheduler_config

    request = GenerationRequest(  # the model's own scheduler, as plain diffusers uses it
        prompt=prompt, steps=steps, cfg_scale=cfg_scale, seed=seed, width=size, height=size,
        sampler=sampler_for_config(read_scheduler_config(runner.path)),
    )
    log(f"warm-up ({len(modes)} modes, 2 steps each) on {device}")
    for mode in modes:
        runner.run(mode, replace(request, steps=2))
    results = {mode.name: Measurement(mode.name) for mode in modes}
    images: dict[str, Any] = {}
    for repeat in range(repeats):
        for mode in modes:
            image, seconds, per_step, memory = runner.run(mode, request)
            result = results[mode.name]
            result.seconds_per_image.append(seconds)
            result.seconds_per_step.append(per_step)
            result.peak_memory_mb.append(memory)
            images[mode.name] = image
            log(f"repeat {repeat + 1}/{repeats} {mode.name}: {seconds:.2f} s/image, {per_step:.3f} s/step")
    reference = images.get(REFERENCE)
    for name, result in results.items():
        if reference is not None:
            result.psnr_db = psnr(reference, images[name])
    return list(results.values())


def format_table(results: list[Measurement], title: str) -> str:
    """A markdown table: medians over repeats, ratio = diffusers' s/image / this mode's s/image."""
    reference = next((r for r in results if r.mode == REFERENCE), results[0])
    base = float(np.median(reference.seconds_per_image))
    lines = [
        title,
        "",
        "| mode | s/step | s/image | speed-up vs diffusers | peak mem (MB) | PSNR vs diffusers fp32 (dB) |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        per_image = float(np.median(r.seconds_per_image))
        lines.append(
            f"| {r.mode} | {np.median(r.seconds_per_step):.3f} | {per_image:.2f} | {base / per_image:.2f}x | "
            f"{np.median(r.peak_memory_mb):.0f} | {r.psnr_db:.1f} |"
        )
    return "\n".join(lines)


def measure_startup(model: str, out_dir: Path) -> dict[str, float]:
    """Seconds from process start to PNG written for ``sd-app generate``, and the import share."""
    imports = (
        "import time; t = time.perf_counter(); import sd_app.cli, sd_app.engine, pipelines.models.loading, torch, "
        "diffusers, transformers; from diffusers import UNet2DConditionModel, AutoencoderKL; "
        "print(time.perf_counter() - t)"
    )
    import_seconds = float(subprocess.run([sys.executable, "-c", imports], capture_output=True, text=True,
                                          check=True).stdout.strip())
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "sd_app.cli", "generate", "a red circle on a blue background", "--model", model,
         "--seed", "1", "--out", str(out_dir), "--no-rerank"],
        check=True, capture_output=True,
    )
    total = time.perf_counter() - start
    return {"total_seconds": total, "import_seconds": import_seconds, "import_share": import_seconds / total}
