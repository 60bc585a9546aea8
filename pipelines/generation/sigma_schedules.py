"""Karras and exponential noise schedules for diffusers' Euler ancestral sampler, which lacks the options.

k-diffusion's ``sample_euler_ancestral`` takes any sigma schedule, and A1111 offers every schedule type
for it; diffusers' ``EulerAncestralDiscreteScheduler`` only spaces timesteps. Its step reads the noise
levels from ``sigmas`` and the U-Net's timesteps from ``timesteps``, so after each ``set_timesteps`` both
are replaced by those of diffusers' ``EulerDiscreteScheduler`` with the schedule option on the same
model config (Karras et al. 2022, eq. 5; the exponential schedule is log-linear in sigma).
"""

from __future__ import annotations

from typing import Any


def with_sigma_schedule(scheduler: Any, schedule_options: dict[str, Any]) -> Any:
    """``scheduler`` (Euler ancestral) whose ``set_timesteps`` uses the sigma schedule of ``schedule_options``."""
    from diffusers import EulerDiscreteScheduler

    spacing = EulerDiscreteScheduler.from_config(dict(scheduler.config), **schedule_options)
    plain_set_timesteps = scheduler.set_timesteps

    def set_timesteps(num_inference_steps: int, device: Any = None) -> None:
        plain_set_timesteps(num_inference_steps, device=device)
        spacing.set_timesteps(num_inference_steps, device=device)
        scheduler.sigmas = spacing.sigmas.clone()  # [steps + 1], ending in 0
        scheduler.timesteps = spacing.timesteps.clone()  # [steps]

    scheduler.set_timesteps = set_timesteps
    return scheduler
