"""Samplers mean what A1111 means by their names, and every one runs through the pipeline.

The tables below are written from AUTOMATIC1111's ``modules/sd_samplers_kdiffusion.py`` (1.9+: sampler
label -> k-diffusion function and the schedule "Automatic" stands for) and the diffusers documentation's
table "A1111/k-diffusion -> diffusers", independently of ``pipelines.generation.schedulers``. The noise
levels are checked against k-diffusion's formulas (``get_sigmas_karras``, ``get_sigmas_exponential``).
The few-step samplers: A1111's "LCM" (``modules/sd_samplers_lcm.py``: a denoiser over the 50 levels of the
LCM grid, t = 20 j + 19) and "TCD" (ComfyUI-TCD, SD.Next; diffusers' ``TCDScheduler`` spaces its steps as
k-diffusion's ``sgm_uniform``); their timesteps are recomputed here the way A1111's denoiser gets them.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipelines.generation.request import GenerationRequest
from pipelines.generation.schedulers import build_scheduler, resolve_sampler, sampler_names
from pipelines.models.shipped import SD1_CONFIG_DIR, read_scheduler_config

# A1111 label -> (k-diffusion sampling function or CompVis sampler, what "Automatic" schedules with).
A1111_SAMPLERS = {
    "DPM++ 2M": ("sample_dpmpp_2m", "Karras"),
    "DPM++ SDE": ("sample_dpmpp_sde", "Karras"),
    "DPM++ 2M SDE": ("sample_dpmpp_2m_sde", "Exponential"),
    "Euler a": ("sample_euler_ancestral", "Uniform"),
    "Euler": ("sample_euler", "Uniform"),
    "LMS": ("sample_lms", "Uniform"),
    "Heun": ("sample_heun", "Uniform"),
    "DPM2": ("sample_dpm_2", "Karras"),
    "DPM2 a": ("sample_dpm_2_ancestral", "Karras"),
    "DDIM": ("compvis ddim", None),
    "PLMS": ("compvis plms", None),
    "UniPC": ("compvis unipc", None),
    "LCM": ("sample_lcm", "Uniform"),
    "TCD": ("sample_tcd", "SGM Uniform"),
}
# Names from A1111 before 1.9 (schedule in the name), and diffusers' name for PLMS.
LEGACY_NAMES = {
    "DPM++ 2M Karras": ("DPM++ 2M", "Karras"),
    "DPM++ SDE Karras": ("DPM++ SDE", "Karras"),
    "DPM++ 2M SDE Karras": ("DPM++ 2M SDE", "Karras"),
    "LMS Karras": ("LMS", "Karras"),
    "DPM2 Karras": ("DPM2", "Karras"),
    "DPM2 a Karras": ("DPM2 a", "Karras"),
    "PNDM": ("PLMS", None),
}
# k-diffusion function -> (diffusers class, config options that make it that algorithm).
DIFFUSERS_EQUIVALENT = {
    "sample_dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "sample_dpmpp_sde": ("DPMSolverSDEScheduler", {}),
    "sample_dpmpp_2m_sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    "sample_euler_ancestral": ("EulerAncestralDiscreteScheduler", {}),
    "sample_euler": ("EulerDiscreteScheduler", {}),
    "sample_lms": ("LMSDiscreteScheduler", {}),
    "sample_heun": ("HeunDiscreteScheduler", {}),
    "sample_dpm_2": ("KDPM2DiscreteScheduler", {}),
    "sample_dpm_2_ancestral": ("KDPM2AncestralDiscreteScheduler", {}),
    "compvis ddim": ("DDIMScheduler", {}),
    "compvis plms": ("PNDMScheduler", {"skip_prk_steps": True}),
    "compvis unipc": ("UniPCMultistepScheduler", {}),
    "sample_lcm": ("LCMScheduler", {}),
    "sample_tcd": ("TCDScheduler", {}),
}
CONSISTENCY = {"sample_lcm", "sample_tcd"}
SECOND_ORDER = {"sample_heun", "sample_dpm_2", "sample_dpm_2_ancestral", "sample_dpmpp_sde"}


def _model_sigmas() -> np.ndarray:
    """SD 1.x's noise level of each training timestep, from its "scaled_linear" betas."""
    config = read_scheduler_config(SD1_CONFIG_DIR)
    betas = np.linspace(config["beta_start"] ** 0.5, config["beta_end"] ** 0.5, config["num_train_timesteps"]) ** 2
    alphas_cumprod = np.cumprod(1 - betas)
    return ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5


def _model_sigma_range() -> tuple[float, float]:
    """sigma_min and sigma_max as k-diffusion's CompVisDenoiser takes them."""
    sigmas = _model_sigmas()
    return float(sigmas[0]), float(sigmas[-1])


def _expected_sigmas(schedule: str, n: int) -> np.ndarray:
    sigma_min, sigma_max = _model_sigma_range()
    if schedule == "Karras":  # Karras et al. 2022, eq. 5 with rho = 7
        ramp = np.linspace(0, 1, n)
        rho = 7.0
        return (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    assert schedule == "Exponential"
    return np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), n))


def _a1111_lcm_timesteps(schedule: str, n: int) -> list[int]:
    """A1111's LCMCompVisDenoiser: points evenly spaced in t from 999 to 19 ("SGM Uniform": n + 1 of them,
    the last dropped), t -> sigma interpolated in log-sigma over the 50 grid levels, sigma -> the nearest
    grid level (argmin: ties go to the lower one)."""
    grid = np.arange(50) * 20 + 19
    log_sigmas = np.log(_model_sigmas()[grid])  # ascending
    ts = np.linspace(999, 19, n) if schedule == "Uniform" else np.linspace(999, 19, n + 1)[:-1]
    out = []
    for t in ts:
        position = np.clip((t - 19) / 20, 0, 49)
        low, high = int(np.floor(position)), int(np.ceil(position))
        log_sigma = (1 - (position - low)) * log_sigmas[low] + (position - low) * log_sigmas[high]
        out.append(int(grid[np.argmin(np.abs(log_sigma - log_sigmas))]))
    return out


def _distinct_levels(sigmas: torch.Tensor) -> np.ndarray:
    """The scheduler's noise levels without the final 0 and the repeats of second-order samplers."""
    values = [float(s) for s in sigmas if float(s) > 0]
    return np.array([v for i, v in enumerate(values) if i == 0 or not math.isclose(v, values[i - 1], rel_tol=1e-6)])


ALL_NAMES = sampler_names() + list(LEGACY_NAMES)


def _meaning(name: str) -> tuple[str, str | None]:
    """(A1111 sampler label, schedule) that ``name`` stands for, from the tables above."""
    if name in LEGACY_NAMES:
        return LEGACY_NAMES[name]
    for label in sorted(A1111_SAMPLERS, key=len, reverse=True):
        if name == label:
            return label, A1111_SAMPLERS[label][1]
        if name.startswith(label + " "):
            return label, name[len(label) + 1 :]
    raise AssertionError(f"{name!r} is not an A1111 sampler name")


def test_every_a1111_sampler_is_offered():
    offered = {resolve_sampler(name).name for name in sampler_names()}
    assert offered == set(A1111_SAMPLERS)


@pytest.mark.parametrize("name", ALL_NAMES)
def test_sampler_name_means_what_a1111_means(name):
    import diffusers

    label, schedule = _meaning(name)
    function, _ = A1111_SAMPLERS[label]
    class_name, options = DIFFUSERS_EQUIVALENT[function]
    scheduler = build_scheduler(name, read_scheduler_config(SD1_CONFIG_DIR), noise_seeds=[1])
    assert type(scheduler) is getattr(diffusers, class_name)
    for key, value in options.items():
        assert scheduler.config[key] == value, (name, key)
    sampler = resolve_sampler(name)
    assert (sampler.name, sampler.second_order) == (label, function in SECOND_ORDER)
    steps = 12
    scheduler.set_timesteps(steps)
    evaluations = 2 * steps - 1 if function in SECOND_ORDER else steps
    if class_name != "PNDMScheduler":  # PLMS runs one warm-up evaluation more than its steps
        assert len(scheduler.timesteps) == evaluations
    if function in CONSISTENCY:
        assert scheduler.timesteps.tolist() == _a1111_lcm_timesteps(schedule, steps)
        for n in (1, 2, 3, 4, 6, 8):
            scheduler.set_timesteps(n)
            assert scheduler.timesteps.tolist() == _a1111_lcm_timesteps(schedule, n), n
    elif schedule in ("Karras", "Exponential"):
        assert np.allclose(_distinct_levels(scheduler.sigmas), _expected_sigmas(schedule, steps), rtol=1e-4)
    elif schedule == "Uniform":  # the model's own levels at (near) evenly spaced training timesteps
        levels = _distinct_levels(scheduler.sigmas)
        for other in ("Karras", "Exponential"):
            assert not np.allclose(levels, _expected_sigmas(other, steps), rtol=1e-2)
        table = _model_sigmas()  # sigma of each training timestep 0..999
        timesteps = np.interp(np.log(levels), np.log(table), np.arange(len(table)))
        assert np.ptp(np.diff(timesteps)) <= 2


def test_api_schedule_types_combine_with_sampler_names():
    assert resolve_sampler("Euler a", "Karras").label == "Euler a Karras"
    assert resolve_sampler("DPM++ 2M", "automatic").schedule == "Karras"
    assert resolve_sampler("DPM++ 2M", "Uniform").label == "DPM++ 2M Uniform"
    with pytest.raises(ValueError, match="Polyexponential.*not implement.*Automatic, Uniform, Karras, Exponential"):
        resolve_sampler("Euler", "Polyexponential")
    with pytest.raises(ValueError, match="no schedule choice"):
        resolve_sampler("DDIM", "Karras")
    with pytest.raises(ValueError, match="names schedule Karras"):
        resolve_sampler("DPM++ 2M Karras", "Exponential")
    assert resolve_sampler("LCM", "SGM Uniform").label == "LCM SGM Uniform"
    assert resolve_sampler("lcm sgm uniform").schedule == "SGM Uniform"
    assert resolve_sampler("LCM", "sgm_uniform").schedule == "SGM Uniform"  # A1111's scheduler name
    with pytest.raises(ValueError, match="'LCM' does not take schedule 'Karras'.*Automatic, Uniform, SGM Uniform"):
        resolve_sampler("LCM", "Karras")
    with pytest.raises(ValueError, match="'Euler' does not take schedule 'SGM Uniform'"):
        resolve_sampler("Euler", "SGM Uniform")


def test_sgm_uniform_on_the_grid_is_about_diffusers_own_lcm_and_tcd_spacing():
    import diffusers

    config = read_scheduler_config(SD1_CONFIG_DIR)
    for name, plain_class in (("LCM SGM Uniform", "LCMScheduler"), ("TCD", "TCDScheduler")):
        ours = build_scheduler(name, config)
        plain = getattr(diffusers, plain_class).from_config(config)
        for n in range(1, 13):  # the same for 1-4, 6 and 8 steps; otherwise at most one grid level apart
            ours.set_timesteps(n)
            plain.set_timesteps(n)
            gap = (ours.timesteps - plain.timesteps).abs().max().item()
            assert gap == 0 if n in (1, 2, 3, 4, 6, 8) else gap <= 20, (name, n, gap)


def _run(pipe, sampler: str, steps: int, **settings) -> tuple[list, list]:
    seen = []
    out = pipe(
        GenerationRequest(prompt="a red circle", steps=steps, width=64, height=64, sampler=sampler, seed=5, **settings),
        on_step=seen.append,
    )
    return out.images, seen


@pytest.mark.parametrize("name", sampler_names())
def test_every_sampler_runs_through_the_pipeline(tiny_pipe, name):
    images, seen = _run(tiny_pipe, name, 3)
    assert [info.step for info in seen] == [1, 2, 3]
    assert {info.total for info in seen} == {3}
    pixels = np.asarray(images[0])
    assert pixels.shape == (64, 64, 3) and pixels.std() > 0


def _count_unet_batches(pipe) -> tuple[list[int], object]:
    batches: list[int] = []
    handle = pipe.components.unet.register_forward_pre_hook(lambda _m, args: batches.append(args[0].shape[0]))
    return batches, handle


@pytest.mark.parametrize("name", ["Heun", "DPM2", "DPM2 a", "DPM++ SDE"])
def test_second_order_steps_count_steps_not_evaluations(tiny_pipe, name):
    batches, handle = _count_unet_batches(tiny_pipe)
    try:
        _, seen = _run(tiny_pipe, name, 4, guidance_cutoff=0.5)
    finally:
        handle.remove()
    assert [info.step for info in seen] == [1, 2, 3, 4] and seen[-1].total == 4
    assert len(batches) == 7  # 2 evaluations per step, one for the last (k-diffusion: no correction at sigma 0)
    # CFG for the first 2 of 4 steps = both evaluations of steps 1 and 2, then the positive half only.
    assert batches == [2, 2, 2, 2, 1, 1, 1]


def test_dpmpp_sde_is_stochastic_and_seed_reproducible(tiny_pipe):
    config = read_scheduler_config(SD1_CONFIG_DIR)
    sample = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    outputs = []
    for noise_seed in (1, 2):
        scheduler = build_scheduler("DPM++ SDE", config, noise_seeds=[noise_seed])
        scheduler.set_timesteps(4)
        x = sample * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            x = scheduler.step(torch.zeros_like(x), t, x).prev_sample
        outputs.append(x)
    assert (outputs[0] - outputs[1]).abs().max() > 1e-3  # the Brownian noise depends on the seed
    request = dict(prompt="a star", steps=4, width=64, height=64, sampler="DPM++ SDE")
    batch = tiny_pipe(GenerationRequest(seed=200, n=3, **request))
    alone = tiny_pipe(GenerationRequest(seed=201, n=1, **request))
    again = tiny_pipe(GenerationRequest(seed=201, n=1, **request))
    assert np.array_equal(np.asarray(alone.images[0]), np.asarray(again.images[0]))
    diff = np.abs(np.asarray(batch.images[1], dtype=np.int16) - np.asarray(alone.images[0], dtype=np.int16))
    assert diff.max() <= 2


@pytest.mark.parametrize(("name", "same_as"), [("Euler a Automatic", "Euler a"), ("DPM++ 2M automatic", "DPM++ 2M"),
                                               ("UniPC Automatic", "UniPC")])
def test_a_schedule_type_of_automatic_in_the_name_is_the_samplers_own(name, same_as):
    """The README: a schedule type may follow the name, Automatic included (A1111's "Schedule type" values)."""
    assert resolve_sampler(name) == resolve_sampler(same_as)
    assert resolve_sampler("DPM++ 2M Automatic", "Karras") == resolve_sampler("DPM++ 2M", "Karras")


def test_dpmpp_sde_says_nothing_of_its_brownian_trees_edges_and_gives_the_same_noise(tiny_pipe):
    """torchsde warns "Should have ta>=t0" when DPM++ SDE asks a hair below its tree's start (a rounding of
    sigma_min) and clamps the query itself; the pipeline clamps first, so library users see nothing printed and the
    latents are those of diffusers' own scheduler stepping, bit for bit."""
    import warnings

    from pipelines.generation.denoising import clamp_brownian_queries

    request = GenerationRequest(prompt="a star", steps=6, width=64, height=64, sampler="DPM++ SDE", seed=7, n=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tiny_pipe(request)
    assert not [w for w in caught if "Should have" in str(w.message)], [str(w.message) for w in caught]
    config = read_scheduler_config(SD1_CONFIG_DIR)
    sample = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    outputs = []
    for clamped in (False, True):
        scheduler = build_scheduler("DPM++ SDE", config, noise_seeds=[7, 8])
        scheduler.set_timesteps(6)
        x = sample * scheduler.init_noise_sigma
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for t in scheduler.timesteps:
                if clamped:
                    clamp_brownian_queries(scheduler, x)
                x = scheduler.step(-0.1 * x, t, x).prev_sample
        outputs.append(x)
        assert any("Should have" in str(w.message) for w in caught) != clamped  # unclamped, torchsde says so
    assert torch.equal(outputs[0], outputs[1])
