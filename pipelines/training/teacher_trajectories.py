"""The teacher's own sampling trajectories, for distilling a few-step student towards the pictures the
product draws at 20 steps.

Each trajectory is the shipped U-Net with the model's own sampler (``DPM++ 2M Uniform``, its scheduler config),
20 steps, CFG 7, from a seeded Gaussian latent: the latent entering every step, that step's timestep, and
the final clean latent. A consistency function maps every point of an ODE trajectory to its end (Song et al.
2023, "Consistency Models"; the teacher pairs of knowledge distillation, Luhman & Luhman 2021), so
(point, timestep) -> end is a direct target for the LCM-LoRA beside the one-step consistency loss of
:mod:`pipelines.training.lcm`. Cached under ``folder`` by the exact U-Net weights and the settings.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from pipelines.training import common

STEPS, CFG = 20, 7.0


@dataclass(frozen=True)
class Trajectories:
    points: np.ndarray  # (N, S, 4, h, w) float16: the scaled latent entering each step
    timesteps: np.ndarray  # (S,) int64
    ends: np.ndarray  # (N, 4, h, w) float16: the final clean latent, scaled
    labels: np.ndarray  # (N,) int64: each trajectory's caption (index into the caller's caption table)


@torch.no_grad()
def sample_trajectories(unet: torch.nn.Module, states: torch.Tensor, empty: torch.Tensor, runtime: common.Runtime,
                        res: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """states (B, 77, D), empty (1, 77, D) -> points (B, S, 4, h, w), timesteps (S,), ends (B, 4, h, w).
    Trajectory i starts from the latent the product draws for seed ``seed + i`` (one CPU generator per image)."""
    from pipelines.generation.schedulers import build_scheduler, sampler_for_config
    from pipelines.models.shipped import EMBEDDED_MODEL_DIR, read_scheduler_config

    config = read_scheduler_config(EMBEDDED_MODEL_DIR)
    scheduler = build_scheduler(sampler_for_config(config), config)  # the model's own sampler, as evaluate runs it
    scheduler.set_timesteps(STEPS)
    b = states.shape[0]
    generators = [torch.Generator().manual_seed(seed + i) for i in range(b)]
    latents = torch.cat([torch.randn((1, 4, res // 8, res // 8), generator=g) for g in generators])  # (B, 4, h, w)
    latents = latents * scheduler.init_noise_sigma
    context = torch.cat([empty.expand(b, -1, -1), states]).to(runtime.device)  # (2B, 77, D)
    points = []
    for t in scheduler.timesteps:
        points.append(latents.clone())
        with runtime.autocast():
            eps = unet(torch.cat([latents, latents]).to(runtime.device), t, encoder_hidden_states=context).sample
        uncond, cond = eps.float().cpu().chunk(2)  # (B, 4, h, w) each
        latents = scheduler.step(uncond + CFG * (cond - uncond), t, latents).prev_sample
    return torch.stack(points, 1), scheduler.timesteps.long(), latents


def trajectory_set(folder: Path, unet: torch.nn.Module, table: torch.Tensor, labels: np.ndarray,
                   runtime: common.Runtime, res: int, seed: int, teacher_id: str, batch: int = 8) -> Trajectories:
    """One trajectory per label (caption index into ``table`` (C + 1, 77, D), whose last row is the empty
    prompt), made in batches and cached under ``teacher_id``, which names the exact weights that made them:
    the U-Net's and the text encoder's behind ``table``."""
    path = folder / f"trajectories-{teacher_id}-s{seed}-n{len(labels)}-{res}.npz"
    if not path.is_file():
        points, ends = [], []
        timesteps = None
        for start in tqdm(range(0, len(labels), batch), desc="teacher trajectories", mininterval=20):
            chunk = labels[start : start + batch]
            p, timesteps, e = sample_trajectories(unet, table[chunk], table[-1:], runtime, res, seed * 100000 + start)
            points.append(p.half().numpy())
            ends.append(e.half().numpy())
        common.save_npz(path, points=np.concatenate(points), timesteps=timesteps.numpy(), ends=np.concatenate(ends),
                        labels=labels)
    with np.load(path) as stored:
        if not np.array_equal(stored["labels"], labels):
            raise ValueError(f"{path} was made for other captions: delete it to make the trajectories again")
        return Trajectories(stored["points"], stored["timesteps"], stored["ends"], stored["labels"])
