"""Timesteps of the few-step samplers (LCM, TCD) on the consistency grid, spaced as A1111 spaces them.

A consistency-distilled model is trained only at the timesteps of its teacher's skipping-step solver:
with ``original_inference_steps`` 50 and 1000 training steps, t_j = 20 (j + 1) - 1, j = 0..49 (Luo et al.
2023; diffusers' ``LCMScheduler`` and ``TCDScheduler`` build the same grid). A1111's LCM sampler
(``modules/sd_samplers_lcm.py``) is a k-diffusion denoiser over exactly these 50 levels: its schedules
space n points in timestep between the grid's ends (999 and 19), interpolate the noise level in log-sigma
and snap to the nearest grid level (ties to the lower one). "Uniform", the sampler's own ``get_sigmas``,
takes n points from 999 to 19 inclusive; "SGM Uniform" (k-diffusion's ``sgm_uniform``) takes n + 1 and
drops the last: diffusers' own LCM/TCD spacing for 1-4, 6 and 8 steps (for 4: 999, 759, 499, 259) and at
most one grid level from it otherwise. Where two points
snap to one level (only near 50 steps) the later one takes the next level down, so levels never repeat.
"""

from __future__ import annotations

import math
from typing import Any


def grid_indices(steps: int, grid_size: int, sgm: bool) -> list[int]:
    """Indices j (descending) of the grid points a schedule of ``steps`` visits."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    points = steps + 1 if sgm else steps
    top = grid_size - 1
    positions = [top - top * i / (points - 1) for i in range(points)] if points > 1 else [float(top)]
    if sgm:
        positions = positions[:-1]
    # Nearest level in log-sigma after linear interpolation between neighbours = round half down.
    indices = [max(0, math.ceil(p - 0.5 - 1e-6)) for p in positions]
    for i in range(1, len(indices)):  # near 50 steps two points may snap to one level: take the next one down
        indices[i] = min(indices[i], indices[i - 1] - 1)
    if indices[-1] < 0:
        raise ValueError(f"steps must be between 1 and {grid_size} on a {grid_size}-level grid, got {steps}")
    return indices


def grid_timesteps(steps: int, num_train_timesteps: int = 1000, grid_size: int = 50, sgm: bool = False) -> list[int]:
    """The timesteps of a ``steps``-step schedule on the consistency grid, e.g. [999, 679, 339, 19]."""
    skip = num_train_timesteps // grid_size
    return [skip * (j + 1) - 1 for j in grid_indices(steps, grid_size, sgm)]


def on_consistency_grid(scheduler: Any, sgm: bool) -> Any:
    """``scheduler`` (diffusers LCM or TCD) whose ``set_timesteps(n)`` takes A1111's spacing on its grid."""
    plain_set_timesteps = scheduler.set_timesteps
    config = scheduler.config

    def set_timesteps(num_inference_steps: int, device: Any = None) -> None:
        grid_size = config.original_inference_steps
        if not 1 <= num_inference_steps <= grid_size:
            raise ValueError(f"steps must be between 1 and {grid_size} for a consistency sampler (its grid has "
                             f"{grid_size} levels), got {num_inference_steps}")
        timesteps = grid_timesteps(num_inference_steps, config.num_train_timesteps, grid_size, sgm)
        plain_set_timesteps(timesteps=timesteps, device=device)

    scheduler.set_timesteps = set_timesteps
    return scheduler
