"""AUTOMATIC1111 sampler names -> diffusers schedulers.

The mapping follows the diffusers documentation's table "A1111/k-diffusion -> diffusers"
(https://huggingface.co/docs/diffusers/api/schedulers/overview). A name may carry its schedule type
("DPM++ 2M Karras"); the PNG metadata writes it back split, as A1111 1.6+ does
(``Sampler: DPM++ 2M, Schedule type: Karras``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from diffusers import SchedulerMixin

DEFAULT_SAMPLER = "DPM++ 2M Karras"


@dataclass(frozen=True)
class SamplerSpec:
    """One A1111 sampler: the diffusers class that implements it and the config it needs."""

    name: str  # A1111's sampler name without the schedule type, e.g. "DPM++ 2M"
    scheduler_class: str  # attribute of the diffusers package
    options: dict[str, Any] = field(default_factory=dict)
    schedule: str = "Automatic"  # A1111 "Schedule type"


_DPMPP = {"algorithm_type": "dpmsolver++", "solver_order": 2}
_KARRAS = {"use_karras_sigmas": True}

SAMPLERS: dict[str, SamplerSpec] = {
    spec.name if spec.schedule == "Automatic" else f"{spec.name} {spec.schedule}": spec
    for spec in [
        SamplerSpec("Euler", "EulerDiscreteScheduler"),
        SamplerSpec("Euler a", "EulerAncestralDiscreteScheduler"),
        SamplerSpec("Heun", "HeunDiscreteScheduler"),
        SamplerSpec("LMS", "LMSDiscreteScheduler"),
        SamplerSpec("LMS", "LMSDiscreteScheduler", _KARRAS, "Karras"),
        SamplerSpec("DPM2", "KDPM2DiscreteScheduler"),
        SamplerSpec("DPM2 a", "KDPM2AncestralDiscreteScheduler"),
        SamplerSpec("DPM++ 2M", "DPMSolverMultistepScheduler", _DPMPP),
        SamplerSpec("DPM++ 2M", "DPMSolverMultistepScheduler", {**_DPMPP, **_KARRAS}, "Karras"),
        SamplerSpec("DPM++ 2M SDE", "DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
        SamplerSpec(
            "DPM++ 2M SDE",
            "DPMSolverMultistepScheduler",
            {"algorithm_type": "sde-dpmsolver++", **_KARRAS},
            "Karras",
        ),
        SamplerSpec("DPM++ SDE", "DPMSolverSinglestepScheduler"),
        SamplerSpec("DDIM", "DDIMScheduler"),
        SamplerSpec("PNDM", "PNDMScheduler", {"skip_prk_steps": True}),
        SamplerSpec("PLMS", "PNDMScheduler", {"skip_prk_steps": True}),
        SamplerSpec("UniPC", "UniPCMultistepScheduler"),
    ]
}


def sampler_names() -> list[str]:
    """Every accepted sampler name, in display order."""
    return list(SAMPLERS)


def resolve_sampler(name: str) -> SamplerSpec:
    """The spec for an A1111 sampler name (case-insensitive); ValueError listing the choices."""
    if not isinstance(name, str):
        raise ValueError(f"sampler must be a string, got {name!r}")
    wanted = " ".join(name.split()).casefold()
    for known, spec in SAMPLERS.items():
        if known.casefold() == wanted:
            return spec
    raise ValueError(f"unknown sampler {name!r}; choose one of: {', '.join(SAMPLERS)}")


def build_scheduler(name: str, base_config: dict[str, Any]) -> SchedulerMixin:
    """A fresh scheduler for ``name`` carrying the model's noise schedule from ``base_config``."""
    import diffusers

    spec = resolve_sampler(name)
    scheduler_class = getattr(diffusers, spec.scheduler_class)
    return scheduler_class.from_config(dict(base_config), **spec.options)


def sampler_for_config(config: dict[str, Any]) -> str:
    """The A1111 name of the scheduler a model ships with (its scheduler_config.json), e.g. "PNDM"."""
    most_specific_first = sorted(SAMPLERS.items(), key=lambda item: -len(item[1].options))
    for name, spec in most_specific_first:
        if spec.scheduler_class == config.get("_class_name") and all(
            config.get(key, False) == value for key, value in spec.options.items()
        ):
            return name
    return DEFAULT_SAMPLER
