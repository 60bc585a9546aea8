"""Side-by-side benchmark: plain diffusers ``StableDiffusionPipeline`` against our pipeline's modes.

All modes run in one process on the same weights, alternating after a warm-up, so the ratios hold
even on a machine with other load. Per mode: seconds per denoising step (between step callbacks),
seconds per image (encode + denoise + decode), peak memory during the run (RSS growth on CPU, max
allocated on CUDA), the ratio to diffusers, and PSNR against diffusers' fp32 image of the same seed.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.request import GenerationRequest

REFERENCE = "diffusers fp32"


@dataclass(frozen=True)
class Mode:
    """One way of running: which pipeline, which precision/options, which request changes."""

    name: str
    pipeline: str  # "diffusers" | "fp32" | "fast" | "fast-sdpa" | "compiled"
    request_changes: dict[str, Any] = field(default_factory=dict)
    key: str = ""  # short name for command lines (``--modes fast,deepcache3``)


DEFAULT_MODES = [
    Mode(REFERENCE, "diffusers", key="diffusers"),
    Mode("ours fp32", "fp32", key="fp32"),
    Mode("ours fast (default)", "fast", key="fast"),
    Mode("ours fast + DeepCache 3", "fast", {"cache_interval": 3}, key="deepcache3"),
    Mode("ours fast + CFG cutoff 0.3", "fast", {"guidance_cutoff": 0.3}, key="cfg-cutoff"),
]
GPU_MODES = [Mode("ours fast + fused QKV + compile (CUDA graphs)", "compiled", key="compiled")]
# Chosen by key only: what one part of the default fast path is worth.
ABLATION_MODES = [Mode("ours fast, PyTorch SDPA attention", "fast-sdpa", key="fast-sdpa")]


def modes_by_key(keys: list[str]) -> list[Mode]:
    """Modes named by their keys, in the given order; ValueError lists the choices for an unknown key."""
    known = {mode.key: mode for mode in DEFAULT_MODES + GPU_MODES + ABLATION_MODES}
    unknown = [key for key in keys if key not in known]
    if unknown:
        raise ValueError(f"unknown mode {unknown[0]!r}; choose from {', '.join(known)}")
    return [known[key] for key in keys]


@dataclass
class Measurement:
    mode: str
    seconds_per_step: list[float] = field(default_factory=list)
    seconds_per_image: list[float] = field(default_factory=list)
    peak_memory_mb: list[float] = field(default_factory=list)
    psnr_db: float = math.nan


def psnr(a: Any, b: Any) -> float:
    """Peak signal-to-noise ratio in dB between two 8-bit images."""
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    mse = float(np.mean((x - y) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def _rss_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class PeakMemory:
    """Peak memory growth during a block: RSS polled every 5 ms on CPU, the allocator's peak on CUDA."""

    def __init__(self, device: str) -> None:
        self.cuda = device.startswith("cuda")
        self.peak_mb = 0.0
        self._stop = threading.Event()

    def __enter__(self) -> PeakMemory:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated() / 2**20
        else:
            self._base = _rss_mb()
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.wait(0.005):
            self.peak_mb = max(self.peak_mb, _rss_mb() - self._base)

    def __exit__(self, *exc: object) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            self.peak_mb = torch.cuda.max_memory_allocated() / 2**20 - self._base
        else:
            self._stop.set()
            self._thread.join()


def _step_seconds(stamps: list[float]) -> float:
    return (stamps[-1] - stamps[0]) / max(len(stamps) - 1, 1)


class Runner:
    """Loads each pipeline once and runs one image in a given mode."""

    def __init__(self, model: str | Path, device: str, modes: list[Mode]) -> None:
        import torch

        from pipelines.loading import load_pipeline, resolve_spec
        from pipelines.speed import SpeedOptions

        self.device = device
        self.path = resolve_spec(model)
        kinds = {mode.pipeline for mode in modes}
        self.ours: dict[str, Any] = {}
        if "fp32" in kinds:
            self.ours["fp32"] = load_pipeline(
                self.path, device=device, dtype=torch.float32, speed=SpeedOptions(channels_last=False)
            )
        if "fast" in kinds:
            self.ours["fast"] = load_pipeline(self.path, device=device)
        if "fast-sdpa" in kinds:
            sdpa = SpeedOptions(fused_cpu_attention=False)
            self.ours["fast-sdpa"] = load_pipeline(self.path, device=device, speed=sdpa)
        if "compiled" in kinds:
            options = SpeedOptions(channels_last=True, fuse_qkv=True, compile=True, compile_mode="max-autotune")
            self.ours["compiled"] = load_pipeline(self.path, device=device, speed=options)
        self.diffusers = self._load_diffusers() if "diffusers" in kinds else None

    def _load_diffusers(self) -> Any:
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline.from_pretrained(
            self.path, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
            local_files_only=True, use_safetensors=True,
        ).to(self.device)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def run(self, mode: Mode, request: GenerationRequest) -> tuple[Any, float, float, float]:
        """(image, seconds per image, seconds per step, peak memory MB) for one image."""
        import torch

        stamps: list[float] = []
        with PeakMemory(self.device) as memory:
            start = time.perf_counter()
            if mode.pipeline == "diffusers":
                image = self._run_diffusers(request, stamps)
            else:
                on_step: Callable[[Any], None] = lambda _info: stamps.append(time.perf_counter())  # noqa: E731
                out = self.ours[mode.pipeline](replace(request, **mode.request_changes), on_step=on_step)
                image = out.images[0]
            if self.device.startswith("cuda"):
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
        return image, seconds, _step_seconds(stamps), memory.peak_mb

    def _run_diffusers(self, request: GenerationRequest, stamps: list[float]) -> Any:
        import torch

        def on_step_end(pipe: Any, step: int, timestep: Any, kwargs: dict) -> dict:
            stamps.append(time.perf_counter())
            return kwargs

        return self.diffusers(
            request.prompt,
            negative_prompt=request.negative_prompt or None,
            num_inference_steps=request.steps,
            guidance_scale=request.cfg_scale,
            height=request.height,
            width=request.width,
            generator=[torch.Generator("cpu").manual_seed(request.seed)],
            callback_on_step_end=on_step_end,
        ).images[0]


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
    from pipelines.loading import default_device

    device = device or default_device()
    modes = modes or DEFAULT_MODES + (GPU_MODES if device.startswith("cuda") else [])
    runner = Runner(model, device, modes)
    from pipelines.loading import read_scheduler_config
    from pipelines.schedulers import sampler_for_config

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
        "import time; t = time.perf_counter(); import sd_app.cli, sd_app.engine, pipelines.loading, torch, "
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
