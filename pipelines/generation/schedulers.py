"""AUTOMATIC1111 samplers and schedule types -> diffusers schedulers.

A1111 (1.9+) names a sampler (the k-diffusion or CompVis algorithm) and, separately, a schedule type
(how the noise levels are spaced); "Automatic" takes the sampler's own default
(``modules/sd_samplers_kdiffusion.py``: DPM++ 2M, DPM++ SDE, DPM2 and DPM2 a default to Karras,
DPM++ 2M SDE to Exponential, the rest to the model's own uniform spacing). Older names carry the
schedule in the sampler name ("DPM++ 2M Karras") and are still accepted. The diffusers class for each
algorithm follows the diffusers documentation's table "A1111/k-diffusion -> diffusers"
(https://huggingface.co/docs/diffusers/api/schedulers/overview). The PNG metadata writes sampler and
schedule apart, as A1111 does (``Sampler: DPM++ 2M, Schedule type: Karras``).

The few-step samplers of consistency-distilled models run on the 50-point grid of the distillation's
teacher solver, t = 20 k + 19 (:mod:`pipelines.generation.consistency_schedules`): "LCM" (A1111 1.8+
``modules/sd_samplers_lcm.py``, ComfyUI ``lcm``; diffusers ``LCMScheduler``, Luo et al. 2023) and "TCD"
(Zheng et al. 2024, "Trajectory Consistency Distillation"; diffusers ``TCDScheduler``, ComfyUI-TCD; its
``eta``, the paper's gamma, 0.3 by default, sets how much fresh noise each step takes). Their schedule
types are "Uniform" (A1111's own LCM spacing: n grid points evenly from t = 999 to 19) and "SGM Uniform"
(n + 1 evenly from 999 to 19, the last dropped: about diffusers' and ComfyUI's spacing). Both want CFG 1-2 and
4-8 steps (:func:`few_step_defaults`, :func:`guidance_warning`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from diffusers import SchedulerMixin

AUTOMATIC = "Automatic"
UNIFORM = "Uniform"
# Schedule types we implement, with the diffusers options that give them.
SCHEDULE_OPTIONS: dict[str, dict[str, Any]] = {
    UNIFORM: {},
    "Karras": {"use_karras_sigmas": True},
    "Exponential": {"use_exponential_sigmas": True},
}
SGM_UNIFORM = "SGM Uniform"  # only on the consistency grid (LCM, TCD)
SCHEDULES = (AUTOMATIC, *SCHEDULE_OPTIONS, SGM_UNIFORM)
SCHEDULE_FLAGS = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")
# Every schedule type A1111 offers; the ones not in SCHEDULES are refused by name.
A1111_SCHEDULES = (
    *SCHEDULES, "Polyexponential", "KL Optimal", "Align Your Steps", "Simple", "Normal", "DDIM", "Beta",
)


@dataclass(frozen=True)
class SamplerSpec:
    """One A1111 sampler: the diffusers class that implements its algorithm and what A1111 defaults to."""

    name: str  # A1111's sampler label, e.g. "DPM++ 2M"
    scheduler_class: str  # attribute of the diffusers package
    options: dict[str, Any] = field(default_factory=dict)
    default_schedule: str | None = UNIFORM  # what "Automatic" means; None: no schedule choice (CompVis samplers)
    second_order: bool = False  # two model evaluations per step (A1111 counts steps, not evaluations)
    brownian_noise: bool = False  # noise from a Brownian tree seeded per image (k-diffusion's SDE samplers)
    schedules: tuple[str, ...] | None = None  # the schedule types it takes; None: every one of SCHEDULE_OPTIONS
    eta: float | None = None  # default step noise of a scheduler whose step takes it (DDIM's eta, TCD's gamma)
    few_step: bool = False  # made for consistency-distilled models (an LCM-LoRA): 4-8 steps, CFG 1-2


_DPMPP_2M = {"algorithm_type": "dpmsolver++", "solver_order": 2}

SAMPLERS: dict[str, SamplerSpec] = {
    spec.name: spec
    for spec in [
        SamplerSpec("DPM++ 2M", "DPMSolverMultistepScheduler", _DPMPP_2M, "Karras"),
        SamplerSpec("DPM++ SDE", "DPMSolverSDEScheduler", {}, "Karras", second_order=True, brownian_noise=True),
        SamplerSpec(
            "DPM++ 2M SDE", "DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 2},
            "Exponential",
        ),
        SamplerSpec("Euler a", "EulerAncestralDiscreteScheduler"),
        SamplerSpec("Euler", "EulerDiscreteScheduler"),
        SamplerSpec("LMS", "LMSDiscreteScheduler"),
        SamplerSpec("Heun", "HeunDiscreteScheduler", second_order=True),
        SamplerSpec("DPM2", "KDPM2DiscreteScheduler", {}, "Karras", second_order=True),
        SamplerSpec("DPM2 a", "KDPM2AncestralDiscreteScheduler", {}, "Karras", second_order=True),
        SamplerSpec("DDIM", "DDIMScheduler", {}, None, eta=0.0),
        SamplerSpec("PLMS", "PNDMScheduler", {"skip_prk_steps": True}, None),
        SamplerSpec("UniPC", "UniPCMultistepScheduler", {}, None),
        SamplerSpec("LCM", "LCMScheduler", {}, UNIFORM, schedules=(UNIFORM, SGM_UNIFORM), few_step=True),
        SamplerSpec("TCD", "TCDScheduler", {}, SGM_UNIFORM, schedules=(SGM_UNIFORM, UNIFORM), eta=0.3, few_step=True),
    ]
}
SAMPLER_ALIASES = {"PNDM": "PLMS"}  # diffusers' name for PLMS
DEFAULT_SAMPLER = "DPM++ 2M"  # Karras, as A1111 defaults to


@dataclass(frozen=True)
class Sampler:
    """A sampler with its schedule resolved: what one request samples with."""

    spec: SamplerSpec
    schedule: str  # a key of SCHEDULE_OPTIONS, or "Automatic" for samplers without a schedule choice

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def scheduler_class(self) -> str:
        return self.spec.scheduler_class

    @property
    def options(self) -> dict[str, Any]:
        """The diffusers config options: the algorithm's and the schedule's."""
        return {**self.spec.options, **SCHEDULE_OPTIONS.get(self.schedule, {})}

    @property
    def second_order(self) -> bool:
        return self.spec.second_order

    @property
    def label(self) -> str:
        """The short name: the sampler alone when the schedule is its default, else "sampler schedule"."""
        if self.schedule in (AUTOMATIC, self.spec.default_schedule):
            return self.name
        return f"{self.name} {self.schedule}"


def _schedules_for(spec: SamplerSpec) -> tuple[str, ...]:
    if spec.default_schedule is None:
        return (AUTOMATIC,)
    return spec.schedules or tuple(SCHEDULE_OPTIONS)


FEW_STEP_STEPS, FEW_STEP_CFG, FEW_STEP_MAX_CFG = 4, 1.0, 2.0


def few_step_defaults(name: str) -> tuple[int, float] | None:
    """(steps, CFG scale) to use when the user gave none: (4, 1) for LCM and TCD, None for the others."""
    return (FEW_STEP_STEPS, FEW_STEP_CFG) if resolve_sampler(name).spec.few_step else None


def guidance_warning(name: str, cfg_scale: float) -> str | None:
    """A warning when a few-step sampler runs with CFG above 2: distilled models bake guidance in, and
    more burns the picture (LCM-LoRA's authors recommend 1-2). None when there is nothing to say."""
    spec = resolve_sampler(name).spec
    if spec.few_step and cfg_scale > FEW_STEP_MAX_CFG:
        return (f"{spec.name} is made for CFG 1-2 (guidance is distilled into the LCM-LoRA); CFG {cfg_scale:g} "
                "will over-saturate the picture")
    return None


def sampler_names() -> list[str]:
    """Every sampler name we show: each sampler (its default schedule), then its other schedules."""
    names = []
    for spec in SAMPLERS.values():
        names.append(spec.name)
        names.extend(f"{spec.name} {s}" for s in _schedules_for(spec) if s not in (AUTOMATIC, spec.default_schedule))
    return names


def schedule_names() -> list[str]:
    """The schedule types we accept (A1111's names)."""
    return list(SCHEDULES)


def _match(text: str, choices: list[str] | tuple[str, ...]) -> str | None:
    wanted = " ".join(text.split()).casefold()
    return next((choice for choice in choices if choice.casefold() == wanted), None)


def resolve_schedule(schedule: str | None) -> str:
    """A1111's spelling of a schedule type (case-insensitive); ValueError naming the ones we implement."""
    if schedule is None or not str(schedule).strip():
        return AUTOMATIC
    if not isinstance(schedule, str):
        raise ValueError(f"scheduler must be a string, got {schedule!r}")
    known = _match(schedule.replace("_", " "), SCHEDULES)  # A1111's names too: "sgm_uniform"
    if known is not None:
        return known
    what = "is an A1111 schedule type we do not implement" if _match(schedule, A1111_SCHEDULES) else "is unknown"
    raise ValueError(f"scheduler {schedule!r} {what}; choose one of: {', '.join(SCHEDULES)}")


def resolve_sampler(name: str, schedule: str | None = None) -> Sampler:
    """The sampler for an A1111 name ("DPM++ 2M", "DPM++ 2M Karras", "euler a") and schedule type.

    ValueError lists the choices for an unknown name and names the clash when the name's schedule and
    ``schedule`` disagree.
    """
    if not isinstance(name, str):
        raise ValueError(f"sampler must be a string, got {name!r}")
    text = " ".join(name.split())
    named_schedule = None
    sampler_name = _match(text, list(SAMPLERS) + list(SAMPLER_ALIASES))
    if sampler_name is None:
        for suffix in sorted((*SCHEDULE_OPTIONS, SGM_UNIFORM, AUTOMATIC), key=len, reverse=True):  # "SGM Uniform" 1st
            if text.casefold().endswith(" " + suffix.casefold()):
                sampler_name = _match(text[: -len(suffix) - 1], list(SAMPLERS) + list(SAMPLER_ALIASES))
                named_schedule = suffix if suffix != AUTOMATIC else None  # "Euler a Automatic": the sampler's own
                if sampler_name is not None:
                    break
    if sampler_name is None:
        raise ValueError(f"unknown sampler {name!r}; choose one of: {', '.join(sampler_names())}")
    spec = SAMPLERS[SAMPLER_ALIASES.get(sampler_name, sampler_name)]
    wanted = resolve_schedule(schedule)
    if named_schedule is not None and wanted not in (AUTOMATIC, named_schedule):
        raise ValueError(f"sampler {name!r} names schedule {named_schedule}, but scheduler is {schedule!r}")
    wanted = named_schedule or wanted
    if spec.default_schedule is None:
        if wanted != AUTOMATIC:
            raise ValueError(
                f"sampler {spec.name!r} has no schedule choice; scheduler must be Automatic, got {wanted!r}"
            )
        return Sampler(spec, AUTOMATIC)
    chosen = spec.default_schedule if wanted == AUTOMATIC else wanted
    if chosen not in _schedules_for(spec):
        raise ValueError(
            f"sampler {spec.name!r} does not take schedule {chosen!r}; choose one of: "
            f"{', '.join((AUTOMATIC, *_schedules_for(spec)))}"
        )
    return Sampler(spec, chosen)


def build_scheduler(
    name: str, base_config: dict[str, Any], noise_seeds: list[int] | None = None, schedule: str | None = None
) -> SchedulerMixin:
    """A fresh scheduler for sampler ``name`` carrying the model's noise schedule from ``base_config``.

    ``noise_seeds`` (one per image) seed the Brownian-tree noise of the DPM++ SDE sampler, so that its
    picture for a seed does not depend on the batch; other stochastic samplers take the per-image
    generators at each step instead.
    """
    import inspect

    import diffusers

    sampler = resolve_sampler(name, schedule)
    scheduler_class = getattr(diffusers, sampler.scheduler_class)
    accepted = inspect.signature(scheduler_class.__init__).parameters
    # The model's config may switch a schedule on (use_karras_sigmas: true): every flag is set explicitly.
    options = {flag: False for flag in SCHEDULE_FLAGS if flag in accepted}
    options.update(sampler.options)
    if sampler.spec.brownian_noise:
        options["noise_sampler_seed"] = list(noise_seeds) if noise_seeds else None
    if sampler.spec.schedules and SGM_UNIFORM in sampler.spec.schedules:
        from pipelines.generation.consistency_schedules import on_consistency_grid

        return on_consistency_grid(scheduler_class.from_config(dict(base_config)), sampler.schedule == SGM_UNIFORM)
    if sampler.scheduler_class == "EulerAncestralDiscreteScheduler" and sampler.schedule != UNIFORM:
        from pipelines.generation.sigma_schedules import with_sigma_schedule

        return with_sigma_schedule(scheduler_class.from_config(dict(base_config)), SCHEDULE_OPTIONS[sampler.schedule])
    return scheduler_class.from_config(dict(base_config), **options)


def sampler_for_config(config: dict[str, Any]) -> str:
    """The A1111 name of the scheduler a model ships with (its scheduler_config.json), e.g. "PLMS"."""
    schedule = next((s for s, o in SCHEDULE_OPTIONS.items() if o and all(config.get(k) for k in o)), UNIFORM)
    most_specific_first = sorted(SAMPLERS.values(), key=lambda spec: -len(spec.options))
    for spec in most_specific_first:
        if spec.scheduler_class == config.get("_class_name") and all(
            config.get(key) == value for key, value in spec.options.items()
        ):
            chosen = schedule if spec.default_schedule is not None else AUTOMATIC
            if spec.schedules:  # a consistency sampler: its config has no schedule flags
                chosen = spec.default_schedule
            return Sampler(spec, chosen).label
    return DEFAULT_SAMPLER
