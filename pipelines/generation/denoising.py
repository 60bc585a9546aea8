"""The sampling loop of one batch as an object: run it to the end, or stop after step k, drop some
images, and go on with the rest (early pruning, ``pipelines.rerank.early_pruning``), or set them aside
as a run of their own to finish later.

Every image of a batch has its own noise generator and its own rows in the scheduler's multistep
history, so dropping rows leaves the kept images exactly what they would have been (tests/test_early_pruning.py).
The predicted clean latents x0 (Ho et al. 2020, eq. 15; Karras et al. 2022: ``D(x; sigma)``) are
computed from the U-Net's output at each evaluation when asked for (``track_clean``).
"""

from __future__ import annotations

import copy
import inspect
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from pipelines.generation.request import GenerationRequest
    from pipelines.generation.text_to_image import TextToImagePipeline

class GenerationCancelled(Exception):
    """Raised inside the denoising loop when the caller's cancel event is set."""


class GenerationInterrupted(GenerationCancelled):
    """Raised inside the denoising loop when the caller's :class:`Interruption` asks it to stop (A1111's
    interrupt or skip). Unlike a cancel, what was made is kept, and the layers it passes through add to it.

    Set by the loop: ``clean`` [n, C, h, w], the model's prediction of the clean latents at the last evaluation
    (None before the first one), which is what A1111 decodes for an interrupted image (its sampler's
    ``last_latent``), and ``step`` of ``total`` steps done. Set by the pipeline that ran the loop: ``unfinished``
    (position -> (picture of ``clean``, steps done), the position of the image in the batch or the request),
    ``finished`` (position -> image, those completed before the stop) and ``extra`` (the networks' infotext pairs).
    As a subclass of GenerationCancelled, a caller that keeps nothing treats it as a cancel."""

    def __init__(self, message: str, *, skipped: bool, clean: torch.Tensor | None, step: int, total: int) -> None:
        super().__init__(message)
        self.skipped = skipped  # a skip: the generation goes on with its next batch where it can
        self.clean = clean
        self.step, self.total = step, total
        self.finished: dict[int, Image.Image] = {}
        self.unfinished: dict[int, tuple[Image.Image, int]] = {}
        self.extra: dict[str, str] = {}


class Interruption:
    """A1111's Interrupt and Skip for one generation: asked from any thread, seen before each evaluation.

    ``interrupt()`` stops the generation and keeps what it made: the finished images, and the images being
    denoised as their predicted clean picture at the step reached (A1111 decodes the same). ``skip()`` does
    that to the batch being denoised only: the generation goes on with its next batch
    (``pipelines.rerank.best_of.best_of_n``, which clears the skip before each batch, as A1111 clears it
    before each of its ``n_iter`` batches)."""

    def __init__(self) -> None:
        self._interrupted = threading.Event()
        self._skipped = threading.Event()

    def interrupt(self) -> None:
        self._interrupted.set()

    def skip(self) -> None:
        self._skipped.set()

    @property
    def interrupted(self) -> bool:
        return self._interrupted.is_set()

    @property
    def skipped(self) -> bool:
        return self._skipped.is_set()

    def clear_skip(self) -> None:
        """Forget a skip asked before the next batch starts (A1111: a skip stops one batch at most)."""
        self._skipped.clear()

    @property
    def asked(self) -> bool:
        """An interrupt or a skip waits to be seen."""
        return self.interrupted or self.skipped

    def error(self, clean: torch.Tensor | None, step: int, total: int) -> GenerationInterrupted:
        """The exception that stops a loop at ``step`` of ``total`` (an interrupt wins over a skip)."""
        skipped = not self.interrupted
        verb = "skipped" if skipped else "interrupted"
        return GenerationInterrupted(f"{verb} after {step} of {total} steps", skipped=skipped, clean=clean,
                                     step=step, total=total)


@dataclass(frozen=True)
class StepInfo:
    """Handed to the step callback after every denoising step."""

    step: int  # 1-based
    total: int
    timestep: float
    latents: torch.Tensor  # [n, 4, H/8, W/8], the current (noisy) latents


StepCallback = Callable[[StepInfo], None]


# Scheduler attributes that hold one row per image (diffusers 0.3x-0.4x): multistep histories and the
# sample kept between the two evaluations of a second-order step. Everything else is per schedule.
PER_IMAGE_SCHEDULER_STATE = (
    "model_outputs", "last_sample", "sample", "prev_derivative", "derivatives", "cur_sample", "ets",
    "cur_model_output",
)


def _take_rows(value: Any, rows: torch.Tensor) -> Any:
    """``value`` with only ``rows`` of every tensor in it (lists of tensors too); scalars unchanged."""
    import torch

    if isinstance(value, torch.Tensor):
        return value[rows.to(value.device)] if value.ndim > 0 else value
    if isinstance(value, list):
        return [_take_rows(item, rows) for item in value]
    if isinstance(value, tuple):
        return tuple(_take_rows(item, rows) for item in value)
    return value


def keep_scheduler_rows(scheduler: Any, rows: Sequence[int]) -> None:
    """Drop the per-image state of every image not in ``rows`` (indices into the current batch)."""
    import torch

    index = torch.tensor(list(rows), dtype=torch.long)
    for name in PER_IMAGE_SCHEDULER_STATE:
        if hasattr(scheduler, name):
            setattr(scheduler, name, _take_rows(getattr(scheduler, name), index))
    seeds = getattr(scheduler, "noise_sampler_seed", None)
    if isinstance(seeds, list):  # DPM++ SDE: one Brownian tree per image
        scheduler.noise_sampler_seed = [seeds[i] for i in rows]
    sampler = getattr(scheduler, "noise_sampler", None)
    tree = getattr(sampler, "tree", None)
    if tree is not None and getattr(tree, "batched", False):
        tree.trees = [tree.trees[i] for i in rows]
        if len(tree.trees) == 1:
            tree.batched = False


class _EdgeClampedInterval:
    """A torchsde ``BrownianInterval`` whose queries are clamped to its own ends before it sees them. diffusers'
    DPM++ SDE asks its tree for ``sigma_fn(t_fn(sigma_min))``, which rounding puts a hair below the tree's start;
    torchsde then clamps to the start itself, after a "Should have ta>=t0" UserWarning each time. Clamped here
    first, the noise is the same to the bit and nothing is printed."""

    def __init__(self, interval: Any) -> None:
        self.interval = interval

    def __call__(self, ta: float, tb: float) -> torch.Tensor:
        start, end = self.interval._start, self.interval._end  # torchsde's own bounds, as it clamps to them
        return self.interval(min(max(float(ta), start), end), min(max(float(tb), start), end))


def clamp_brownian_queries(scheduler: Any, sample: torch.Tensor) -> None:
    """Before a DPM++ SDE step: the scheduler's Brownian-tree noise sampler built as its ``step`` builds it when it
    has none (from the sigmas > 0 and the per-image seeds; ``sample`` [n, C, h, w] gives the shape), and each
    tree's queries clamped to its ends (:class:`_EdgeClampedInterval`). Other schedulers are left alone."""
    if not hasattr(scheduler, "noise_sampler"):  # (no import for the samplers without one)
        return
    from diffusers.schedulers.scheduling_dpmsolver_sde import BrownianTreeNoiseSampler, DPMSolverSDEScheduler

    if not isinstance(scheduler, DPMSolverSDEScheduler):
        return
    if scheduler.noise_sampler is None:
        sigmas, seeds = scheduler.sigmas, scheduler.noise_sampler_seed
        low, high = sigmas[sigmas > 0].min(), sigmas.max()
        scheduler.noise_sampler = BrownianTreeNoiseSampler(sample, low.item(), high.item(), seeds)
    tree = scheduler.noise_sampler.tree
    tree.trees = [t if isinstance(t, _EdgeClampedInterval) else _EdgeClampedInterval(t) for t in tree.trees]


def copy_scheduler(scheduler: Any) -> Any:
    """A deep copy of a scheduler mid-run. A DPM++ SDE Brownian-tree noise sampler is not copied (torchsde's
    interval cache breaks under deepcopy): the copy builds its own from the per-image seeds at its next
    step, and a seeded tree that splits halfway (diffusers' ``BatchedBrownianTree``) gives the same noise for
    the same interval whatever was asked of it before."""
    sampler = getattr(scheduler, "noise_sampler", None)
    return copy.deepcopy(scheduler, {id(sampler): None} if sampler is not None else None)


def _noise_level(
    scheduler: Any, t: torch.Tensor, index: int, step_index: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha, sigma) of the variance-preserving x_t = alpha x0 + sigma eps the U-Net sees at evaluation ``index``;
    ``step_index``: the scheduler's step index at that evaluation (default: its current one)."""
    import torch

    sigmas = getattr(scheduler, "sigmas", None)
    if sigmas is not None and hasattr(scheduler, "index_for_timestep"):
        if step_index is None:
            step_index = scheduler.step_index if scheduler.step_index is not None else scheduler.index_for_timestep(t)
        sigma = sigmas[step_index].float()  # k-diffusion's sigma: x = x0 + sigma eps before input scaling
        alpha = 1.0 / torch.sqrt(sigma**2 + 1.0)
        return alpha, sigma * alpha
    abar = scheduler.alphas_cumprod[int(t)].float()  # DDIM, PLMS: integer timesteps on the training schedule
    return abar.sqrt(), (1.0 - abar).sqrt()


def predicted_clean(
    scheduler: Any, model_input: torch.Tensor, model_output: torch.Tensor, t: torch.Tensor, index: int,
    step_index: int | None = None,
) -> torch.Tensor:
    """x0 [n, C, h, w] from the scaled U-Net input and the (guided) model output: epsilon or v prediction.
    ``step_index``: the scheduler's step index at that evaluation, when it has stepped since (default: current)."""
    alpha, sigma = _noise_level(scheduler, t, index, step_index)
    alpha, sigma = alpha.to(model_input.device), sigma.to(model_input.device)
    if scheduler.config.prediction_type == "v_prediction":
        return alpha * model_input - sigma * model_output
    if scheduler.config.prediction_type == "sample":
        return model_output
    return (model_input - sigma * model_output) / alpha


class DenoisingRun:
    """Predict noise with the U-Net, apply guidance, step the scheduler: ``run()`` goes on to step ``until``.

    Latents and scheduler arithmetic stay in fp32; only the U-Net runs in the model's dtype.
    ``timesteps`` (default: the scheduler's) and ``total`` (default: ``request.steps``) let img2img
    run the tail of a schedule; ``extra_channels`` [n, 5, h, w] are concatenated to the scaled input
    of an inpainting U-Net; ``after_step(index, latents)`` may replace the latents after each
    evaluation (the 4-channel inpainting blend). ``request.steps`` counts steps as A1111 does: a
    second-order sampler evaluates the U-Net twice per step, and the progress, the CFG cutoff and the
    DeepCache interval all count steps, not evaluations. With ``track_clean``, ``clean`` holds the x0
    predicted at the last evaluation; ``keep(rows)`` drops the other images, ``split_off(rows)`` makes a
    run of its own of them. ``predicted_clean()`` gives that x0 of any run, computed when asked (an interrupt).
    """

    def __init__(
        self,
        pipe: TextToImagePipeline,
        scheduler: Any,
        latents: torch.Tensor,
        text_states: torch.Tensor,
        request: GenerationRequest,
        generators: list[torch.Generator],
        *,
        timesteps: torch.Tensor | None = None,
        total: int | None = None,
        extra_channels: torch.Tensor | None = None,
        after_step: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
        track_clean: bool = False,
    ) -> None:
        from pipelines.speed.deep_cache import DeepCacheRunner

        self.pipe, self.scheduler, self.request = pipe, scheduler, request
        self.latents = latents  # [n, C, h, w]
        self.text_states = text_states  # [2n, 77k, D] (negative, positive) or [n, 77k, D]
        self.generators = list(generators)
        self.timesteps = scheduler.timesteps if timesteps is None else timesteps  # [evaluations]
        # Timestep values read once (one host sync), not per step: on CUDA float(t) would wait for the GPU.
        self.timestep_values = [float(value) for value in self.timesteps.cpu()]
        self.total = request.steps if total is None else total
        unet = pipe.components.unet
        self.extra_channels = None if extra_channels is None else extra_channels.to(pipe.device, unet.dtype)
        self.after_step = after_step
        self.track_clean = track_clean
        self.clean: torch.Tensor | None = None  # [n, C, h, w], x0 of the last evaluation
        # The last evaluation's scaled input and guided output [n, C, h, w], timestep, index and the scheduler's
        # step index then: its x0 when asked, at no cost per step.
        self._last_evaluation: tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, int | None] | None = None
        self.guided_steps = self.total - round(self.total * request.guidance_cutoff)
        self.runner = DeepCacheRunner(unet, request.cache_interval)
        parameters = inspect.signature(scheduler.step).parameters
        self._takes_generator, self._takes_eta = "generator" in parameters, "eta" in parameters
        order = getattr(scheduler, "order", 1)
        total_evaluations = self.total if order == 1 else 2 * self.total - 1
        self.warmup = max(len(self.timesteps) - total_evaluations, 0)  # evaluations before step 1 ends
        self.index = 0  # next evaluation
        self.step = 0  # steps completed so far

    @property
    def n(self) -> int:
        return self.latents.shape[0]

    def _step_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {}
        if self._takes_generator:
            kwargs["generator"] = self.generators if len(self.generators) > 1 else self.generators[0]
        if self._takes_eta:  # DDIM's eta, TCD's gamma: the request's, else the sampler's own default
            from pipelines.generation.schedulers import resolve_sampler

            eta = self.request.eta
            kwargs["eta"] = resolve_sampler(self.request.sampler).spec.eta if eta is None else eta
        return kwargs

    def predicted_clean(self) -> torch.Tensor | None:
        """x0 [n, C, h, w] predicted at the last evaluation, None before the first one."""
        if self.track_clean or self._last_evaluation is None:
            return self.clean
        scaled, noise, t, index, step_index = self._last_evaluation
        return predicted_clean(self.scheduler, scaled.float(), noise, t, index, step_index)

    def run(
        self,
        until: int | None = None,
        on_step: StepCallback | None = None,
        cancel: threading.Event | None = None,
        progress: bool = False,
        interruption: Interruption | None = None,
    ) -> torch.Tensor:
        """Denoise until ``until`` steps are complete (default: all); returns the latents [n, C, h, w].
        GenerationCancelled when ``cancel`` is set; GenerationInterrupted, with the x0 of the last evaluation,
        when ``interruption`` asks (both seen before each evaluation)."""
        import torch
        from tqdm.auto import tqdm

        until = self.total if until is None else until
        unet, scheduler, request = self.pipe.components.unet, self.scheduler, self.request
        step_kwargs = self._step_kwargs()
        bar = tqdm(total=self.total, initial=self.step, disable=not progress, desc="denoise", leave=False)
        while self.step < until and self.index < len(self.timesteps):
            index, t, n, latents = self.index, self.timesteps[self.index], self.n, self.latents
            if cancel is not None and cancel.is_set():
                raise GenerationCancelled(f"cancelled after {self.step} of {self.total} steps")
            if interruption is not None and interruption.asked:
                bar.close()
                raise interruption.error(self.predicted_clean(), self.step, self.total)
            guided = self.text_states.shape[0] == 2 * n and self.step < self.guided_steps
            states = self.text_states if guided else self.text_states[-n:]  # positive half when unguided
            scaled = scheduler.scale_model_input(latents, t)  # [n, C, h, w], what the U-Net was trained on
            model_input = (torch.cat([scaled] * 2) if guided else scaled).to(unet.dtype)  # [2n or n, C, h, w]
            if self.extra_channels is not None:
                extra = torch.cat([self.extra_channels] * 2) if guided else self.extra_channels
                model_input = torch.cat([model_input, extra], dim=1)  # [2n or n, 9, h, w]
            if request.cache_interval > 1:
                noise = self.runner(model_input, t, states, self.step)
            else:
                noise = unet(model_input, t, encoder_hidden_states=states).sample
            noise = noise.float()  # [2n or n, C, h, w]
            if guided:
                noise_uncond, noise_text = noise.chunk(2)
                noise = noise_uncond + request.cfg_scale * (noise_text - noise_uncond)  # [n, C, h, w]
            if self.track_clean:
                self.clean = predicted_clean(scheduler, scaled.float(), noise, t, index)  # [n, C, h, w]
            self._last_evaluation = (scaled, noise, t, index, getattr(scheduler, "step_index", None))
            clamp_brownian_queries(scheduler, latents)
            latents = scheduler.step(noise, t, latents, **step_kwargs).prev_sample
            if self.after_step is not None:
                # Contiguous: a blend with a broadcast mask can come out channels_last, and other strides
                # would cost the fused CPU attention a new trace (and the convolutions a layout change).
                latents = self.after_step(index, latents).contiguous()
            self.latents = latents
            self.index += 1
            # A step is complete when the scheduler is back in its first stage (always, for first-order
            # ones), after the warm-up evaluations (PLMS evaluates its first step twice).
            last = index == len(self.timesteps) - 1
            if index >= self.warmup and (getattr(scheduler, "state_in_first_order", True) or last):
                self.step += 1
                bar.update()
                if on_step is not None:
                    on_step(StepInfo(self.step, self.total, self.timestep_values[index], latents))
        bar.close()
        return self.latents

    def keep(self, rows: Sequence[int]) -> None:
        """Go on with only the images ``rows`` (indices into the current batch, in that order)."""
        import torch

        n = self.n
        rows = list(rows)
        if not rows or len(set(rows)) != len(rows) or not all(0 <= row < n for row in rows):
            raise ValueError(f"rows must be distinct indices into the batch of {n}, got {rows!r}")
        if self.after_step is not None:
            raise ValueError("a run with an after-step blend (4-channel inpainting) cannot drop images")
        index = torch.tensor(rows, dtype=torch.long, device=self.latents.device)
        both = torch.cat([index, index + n])  # rows of the (negative, positive) halves
        self.latents = self.latents[index]
        if self.text_states.shape[0] == 2 * n:
            self.text_states = self.text_states[both.to(self.text_states.device)]
        else:
            self.text_states = self.text_states[index.to(self.text_states.device)]
        if self.extra_channels is not None:
            self.extra_channels = self.extra_channels[index]
        if self.clean is not None:
            self.clean = self.clean[index]
        if self._last_evaluation is not None:
            scaled, noise, *when = self._last_evaluation
            self._last_evaluation = (scaled[index.to(scaled.device)], noise[index.to(noise.device)], *when)
        self.generators = [self.generators[row] for row in rows]
        keep_scheduler_rows(self.scheduler, rows)
        deep = getattr(self.runner, "_deep", None)  # DeepCache's cached features: [2n or n, ...]
        if deep is not None:
            self.runner._deep = deep[both.to(deep.device)] if deep.shape[0] == 2 * n else deep[index.to(deep.device)]

    def split_off(self, rows: Sequence[int]) -> DenoisingRun:
        """A run of only the images ``rows`` (indices into the current batch), at the same step, that goes on
        independently: its own scheduler state, noise generators and cached features. This run is unchanged."""
        import torch

        from pipelines.speed.deep_cache import DeepCacheRunner

        other = copy.copy(self)  # tensors are shared until either run replaces them (nothing is updated in place)
        other.scheduler = copy_scheduler(self.scheduler)  # histories, step index, noise seeds
        other.runner = DeepCacheRunner(self.runner.unet, self.runner.interval)
        other.runner._deep = self.runner._deep
        other.generators = []
        for generator in self.generators:  # the same noise from here on, drawn separately
            twin = torch.Generator(generator.device)
            twin.set_state(generator.get_state())
            other.generators.append(twin)
        other.keep(rows)
        return other

