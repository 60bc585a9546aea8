"""Ways of running one image: plain diffusers ``StableDiffusionPipeline`` (the reference) or our
pipeline at a precision with speed options and request changes. The benchmark (``sd-app bench``)
and the shapes evaluation (``pipelines.training.evaluate``) run the same modes.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from pipelines.generation.request import GenerationRequest
from pipelines.speed.measure import PeakMemory, step_seconds

REFERENCE = "diffusers fp32"


@dataclass(frozen=True)
class Mode:
    """One way of running: which pipeline, which precision/options, which request changes."""

    name: str
    pipeline: str  # "diffusers" | "diffusers-half" | "fp32" | "fast" | "fast-sdpa" | "compiled"
    request_changes: dict[str, Any] = field(default_factory=dict)
    key: str = ""  # short name for command lines (``--modes fast,deepcache3``)


DEFAULT_MODES = [
    Mode(REFERENCE, "diffusers", key="diffusers"),
    Mode("ours fp32", "fp32", key="fp32"),
    Mode("ours fast (default)", "fast", key="fast"),
    Mode("ours fast + DeepCache 3", "fast", {"cache_interval": 3}, key="deepcache3"),
    Mode("ours fast + CFG cutoff 0.3", "fast", {"guidance_cutoff": 0.3}, key="cfg-cutoff"),
]
# On CUDA "diffusers-half" is plain diffusers in fp16 (what a diffusers user runs on a GPU); "compiled" is our
# default path with the U-Net compiled, CUDA graphs replaying the whole step ("reduce-overhead").
GPU_MODES = [
    Mode("diffusers fp16", "diffusers-half", key="diffusers-half"),
    Mode("ours fast + torch.compile (CUDA graphs)", "compiled", key="compiled"),
]
# Chosen by key only: what one part of the default fast path is worth.
ABLATION_MODES = [
    Mode("ours fast, PyTorch SDPA attention", "fast-sdpa", key="fast-sdpa"),
    Mode("ours fast + TAESD decoder", "fast", {"vae_decoder": "TAESD"}, key="taesd"),  # a model with a tiny decoder
]


def modes_by_key(keys: list[str]) -> list[Mode]:
    """Modes named by their keys, in the given order; ValueError lists the choices for an unknown key."""
    known = {mode.key: mode for mode in DEFAULT_MODES + GPU_MODES + ABLATION_MODES}
    unknown = [key for key in keys if key not in known]
    if unknown:
        raise ValueError(f"unknown mode {unknown[0]!r}; choose from {', '.join(known)}")
    return [known[key] for key in keys]


class Runner:
    """Loads each pipeline once and runs one image in a given mode (``lazy``: load each on its first run)."""

    def __init__(self, model: str | Path, device: str, modes: list[Mode], lazy: bool = False) -> None:
        from pipelines.models.loading import resolve_spec

        self.device = device
        self.path = resolve_spec(model)
        self.modes = modes
        self._pipelines: dict[str, Any] = {}
        if not lazy:
            for kind in dict.fromkeys(mode.pipeline for mode in modes):
                self.pipeline(kind)

    def pipeline(self, kind: str) -> Any:
        """The loaded pipeline of one kind (``Mode.pipeline``), loading it the first time."""
        if kind not in self._pipelines:
            self._pipelines[kind] = self._load(kind)
        return self._pipelines[kind]

    def _load(self, kind: str) -> Any:
        import torch

        from pipelines.models.loading import load_pipeline
        from pipelines.speed.options import SpeedOptions, default_dtype, default_speed_options

        if kind == "diffusers":
            return self._load_diffusers(torch.float32)
        if kind == "diffusers-half":
            return self._load_diffusers(default_dtype(self.device))
        if kind == "fp32":
            plain = SpeedOptions(channels_last=False, prepack_convolutions=False)
            return load_pipeline(self.path, device=self.device, dtype=torch.float32, speed=plain)
        if kind == "fast":
            return load_pipeline(self.path, device=self.device)
        if kind == "fast-sdpa":
            return load_pipeline(self.path, device=self.device, speed=SpeedOptions(fused_cpu_attention=False))
        if kind == "compiled":
            base = default_speed_options(self.device)
            options = SpeedOptions(**{**base.__dict__, "compile": True, "compile_mode": "reduce-overhead"})
            return load_pipeline(self.path, device=self.device, speed=options)
        raise ValueError(f"unknown pipeline kind {kind!r}")

    def _load_diffusers(self, dtype: Any) -> Any:
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline.from_pretrained(
            self.path, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
            local_files_only=True, use_safetensors=True, torch_dtype=dtype,
        ).to(self.device)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def run(self, mode: Mode, request: GenerationRequest) -> tuple[Any, float, float, float]:
        """(image, seconds per image, seconds per step, peak memory MB) for one image."""
        import torch

        stamps: list[float] = []
        with PeakMemory(self.device) as memory:
            start = time.perf_counter()
            if mode.pipeline.startswith("diffusers"):
                image = self._run_diffusers(self.pipeline(mode.pipeline), request, stamps)
            else:
                on_step: Callable[[Any], None] = lambda _info: stamps.append(time.perf_counter())  # noqa: E731
                pipe = self.pipeline(mode.pipeline)
                out = pipe(replace(request, **mode.request_changes), on_step=on_step)
                image = out.images[0]
            if self.device.startswith("cuda"):
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
        return image, seconds, step_seconds(stamps), memory.peak_mb

    def _run_diffusers(self, pipe: Any, request: GenerationRequest, stamps: list[float]) -> Any:
        import torch

        def on_step_end(pipe: Any, step: int, timestep: Any, kwargs: dict) -> dict:
            stamps.append(time.perf_counter())
            return kwargs

        return pipe(
            request.prompt,
            negative_prompt=request.negative_prompt or None,
            num_inference_steps=request.steps,
            guidance_scale=request.cfg_scale,
            height=request.height,
            width=request.width,
            generator=[torch.Generator("cpu").manual_seed(request.seed)],
            callback_on_step_end=on_step_end,
        ).images[0]


