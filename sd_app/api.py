"""HTTP routes compatible with AUTOMATIC1111's ``/sdapi/v1`` subset, on a FastAPI router.

``POST /sdapi/v1/txt2img`` (hires fix included), ``POST /sdapi/v1/img2img`` (img2img, inpainting),
``GET /sdapi/v1/samplers | schedulers | upscalers | latent-upscale-modes | progress`` and
``POST /sdapi/v1/interrupt | skip`` (the model routes, options included, are in ``sd_app.api_models``).
Requests become the same ``GenerationRequest`` the UI and CLI
build and run through the same ``Engine``.

Interrupt and skip behave as A1111's (``modules/processing.py``, ``sd_samplers_common``): the interrupted
request answers 200 with the images finished so far, ranked among themselves, then the images being denoised,
decoded from the model's prediction of their clean latents at the step reached (A1111's ``last_latent``),
unscored; ``info.interrupted`` says so, ``info.stopped_at_step`` gives each image's steps done (null when
finished) and their infotexts add ``Stopped at step: K of N``. Interrupted before its first step, a request
answers 200 with no images. A skip stops the current one of the ``n_iter`` batches of ``batch_size`` images the
same way and the request goes on with the next batch (``pipelines.rerank.best_of``: sd-app's parts of up to 4
images stay as they are); with early pruning, and while a minimum score's round finishes the candidates it
pruned, it stops the request as an interrupt does.

Differences from A1111, on purpose:

- images come back best first by CLIP score when a reranker is loaded (``"rerank": false`` keeps
  generation order); ``info.all_seeds``, ``info.infotexts`` and ``info.clip_scores`` follow the
  order of ``images``; no grid image is prepended for batches;
- options that would change the picture but are not implemented (``restore_faces``, ``tiling``,
  ``subseed_strength``, ``styles``, scripts, a second-pass prompt/sampler/model, more than one init
  image) are refused with 422 instead of ignored;
- img2img takes one init image; a mask of another size is resized to it and ``info.notes`` says so;
- defaults for absent fields are ``GenerationRequest``'s (20 steps, DPM++ 2M with its Karras schedule);
- sd-app's own fields: ``rerank``, ``rerank_by``, ``scorers`` (scorer names and weights among those the
  server was started with, ``GET /sdapi/v1/scorers``; never a path), ``min_score`` and ``extra_rounds``;
  ``info`` adds every candidate's scores and whether it reached the minimum.
"""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from fastapi import APIRouter, HTTPException, Request
from pydantic import BaseModel, ConfigDict, Field

from pipelines.generation.conditioning import LATENT_UPSCALERS, MASKED_CONTENT, PIXEL_UPSCALERS, RESIZE_MODES
from pipelines.generation.request import GenerationRequest
from pipelines.generation.schedulers import SAMPLERS, resolve_sampler, schedule_names
from sd_app.api_errors import http_error
from sd_app.metadata import VERSION, image_pairs
from sd_app.ui_jobs import JobTracker

if TYPE_CHECKING:
    from PIL import Image

    from sd_app.engine import Engine, GenerationResult

_DEFAULTS = GenerationRequest()
# AUTOMATIC1111's k-diffusion aliases (modules/sd_samplers_kdiffusion.py), accepted as sampler names.
SAMPLER_ALIASES: dict[str, list[str]] = {
    "Euler a": ["k_euler_a", "k_euler_ancestral"],
    "Euler": ["k_euler"],
    "LMS": ["k_lms"],
    "Heun": ["k_heun"],
    "DPM2": ["k_dpm_2"],
    "DPM2 a": ["k_dpm_2_a"],
    "DPM++ 2M": ["k_dpmpp_2m"],
    "DPM++ SDE": ["k_dpmpp_sde"],
    "DPM++ 2M SDE": ["k_dpmpp_2m_sde"],
    "LMS Karras": ["k_lms_ka"],
    "DPM++ 2M Karras": ["k_dpmpp_2m_ka"],
    "DPM++ 2M SDE Karras": ["k_dpmpp_2m_sde_ka"],
    "DDIM": ["ddim"],
    "PLMS": ["plms"],
    "UniPC": ["unipc"],
    "LCM": ["k_lcm"],  # modules/sd_samplers_lcm.py
}
SCHEDULERS = tuple(schedule_names())
DEFAULT_MASK_BLUR = 4  # A1111's mask_blur_x and mask_blur_y


class GenerationFields(BaseModel):
    """The fields A1111's txt2img and img2img requests share; the others are checked by
    ``sd_app.a1111_fields`` (ignored when harmless, refused when they would change the picture)."""

    model_config = ConfigDict(extra="allow")

    prompt: str = ""
    negative_prompt: str = ""
    steps: int = _DEFAULTS.steps
    cfg_scale: float = _DEFAULTS.cfg_scale
    seed: int = -1
    width: int = _DEFAULTS.width
    height: int = _DEFAULTS.height
    batch_size: int = Field(1, ge=1)
    n_iter: int = Field(1, ge=1)
    sampler_name: str | None = None
    sampler_index: str | None = None  # older clients send the sampler here
    scheduler: str | None = None  # A1111 1.9+ schedule type: Automatic, Uniform, Karras or Exponential
    send_images: bool = True
    save_images: bool = False
    rerank: bool = True  # sd-app: order images best first by CLIP score
    # sd-app: rank by one of these (None: the server's --scorer weights, else CLIP score) ...
    rerank_by: Literal["clip", "contrastive", "mixed"] | None = None
    # ... or by several scorers the server offers, by name: {"clip": 1, "aesthetic": 0.5} or "clip:1, aesthetic:0.5"
    scorers: dict[str, float] | str | None = None
    # regenerate with new seeds until a candidate reaches it: a number (the one scorer) or {"aesthetic": 5.5}
    min_score: float | dict[str, float] | None = None
    extra_rounds: int = Field(3, ge=0, le=10)  # with min_score: at most this many more rounds
    override_settings: dict[str, Any] | None = None  # sd_model_checkpoint, sd_vae, CLIP_stop_at_last_layers,
    # sd_vae_decode_method
    override_settings_restore_afterwards: bool = True


class Txt2ImgRequest(GenerationFields):
    """A1111's ``StableDiffusionTxt2ImgProcessingAPI`` fields we honour, the hires fix included."""

    enable_hr: bool = False
    denoising_strength: float | None = None  # the hires fix's; A1111 clients send 0.7
    hr_scale: float = 2.0
    hr_upscaler: str | None = "Latent"
    hr_second_pass_steps: int = 0
    hr_resize_x: int = 0
    hr_resize_y: int = 0
    # A second pass with other settings than the first; refused unless unset or the same.
    hr_checkpoint_name: str | None = None
    hr_sampler_name: str | None = None
    hr_scheduler: str | None = None
    hr_prompt: str = ""
    hr_negative_prompt: str = ""
    firstphase_width: int = 0
    firstphase_height: int = 0
    # sd-app: early pruning, run all batch_size * n_iter candidates prune_at steps, finish the best prune_to
    prune_to: int = 0
    prune_at: int = 0


class Img2ImgRequest(GenerationFields):
    """A1111's ``StableDiffusionImg2ImgProcessingAPI`` fields we honour (its defaults, as clients expect)."""

    init_images: list[str] = Field(default_factory=list)
    resize_mode: int = 0  # 0 just resize, 1 crop and resize, 2 resize and fill
    denoising_strength: float = 0.75
    mask: str | None = None  # base64; white = repaint
    mask_blur: int | None = None  # A1111: when set, both directions' blur; else mask_blur_x and _y (4 each)
    mask_blur_x: int | None = None
    mask_blur_y: int | None = None
    mask_round: bool = True  # the latent blend's mask rounded to 0 or 1, as sd-app always does; False refused
    inpainting_fill: int = 0  # 0 fill, 1 original, 2 latent noise, 3 latent nothing
    inpaint_full_res: bool = True  # only masked
    inpaint_full_res_padding: int = 0
    inpainting_mask_invert: int = 0
    include_init_images: bool = False
    initial_noise_multiplier: float | None = None
    latent_mask: str | None = None


def sampler_from_fields(sampler_name: str | None, scheduler: str | None) -> str:
    """Our sampler name for A1111's ``sampler_name`` (or an alias) and ``scheduler``; ValueError if unknown."""
    name = (sampler_name or _DEFAULTS.sampler).strip()
    for canonical, aliases in SAMPLER_ALIASES.items():
        if name.casefold() in aliases:
            name = canonical
    return resolve_sampler(name, scheduler).label


def _refuse_unsupported(body: GenerationFields) -> None:
    """A second hires pass with other settings, and img2img's latent mask: declared fields we refuse unless
    unset (the undeclared A1111 fields are checked by ``sd_app.a1111_fields``)."""
    refused: dict[str, Any] = {}
    if isinstance(body, Txt2ImgRequest):
        refused.update(
            hr_checkpoint_name=body.hr_checkpoint_name if body.hr_checkpoint_name != "Use same checkpoint" else None,
            hr_prompt=body.hr_prompt if body.hr_prompt != body.prompt else "",
            hr_negative_prompt=body.hr_negative_prompt if body.hr_negative_prompt != body.negative_prompt else "",
            firstphase_width=body.firstphase_width,
            firstphase_height=body.firstphase_height,
        )
        if body.hr_sampler_name and body.hr_sampler_name.casefold() != "use same sampler":  # A1111's UI's "unset"
            # The same sampler by either field, an alias or a name with its schedule (e.g. "k_euler" for "Euler")
            first = body.sampler_name or body.sampler_index
            try:
                same = sampler_from_fields(body.hr_sampler_name, body.scheduler) == sampler_from_fields(
                    first, body.scheduler)
            except ValueError:
                same = False
            if not same:
                refused["hr_sampler_name"] = body.hr_sampler_name
        same = ("use same scheduler", (body.scheduler or "").casefold(), "automatic")
        if body.hr_scheduler and body.hr_scheduler.casefold() not in same:
            refused["hr_scheduler"] = body.hr_scheduler
    if isinstance(body, Img2ImgRequest):
        refused["latent_mask"] = body.latent_mask
        refused["mask_round"] = "False" if not body.mask_round else None
        if body.initial_noise_multiplier not in (None, 1, 1.0):
            refused["initial_noise_multiplier"] = body.initial_noise_multiplier
    for field, value in refused.items():
        if value:
            raise ValueError(f"{field} is not supported by sd-app (got {value!r}); leave it unset")


def _common_settings(body: GenerationFields, clip_skip: int = 1, vae_decoder: str = "Full") -> dict[str, Any]:
    """The settings txt2img and img2img share. ``clip_skip`` and ``vae_decoder``: the server's defaults,
    unless ``override_settings`` says ``CLIP_stop_at_last_layers`` / ``sd_vae_decode_method``."""
    from sd_app.a1111_fields import check_fields, check_options

    overrides = check_options(body.override_settings or {}, "override_settings")
    sampler = sampler_from_fields(body.sampler_name or body.sampler_index, body.scheduler)
    check_fields(body.model_extra or {}, resolve_sampler(sampler).name, set(type(body).model_fields))
    n = body.batch_size * body.n_iter
    if not 1 <= n <= 16:
        raise ValueError(f"batch_size * n_iter must be between 1 and 16, got {body.batch_size} * {body.n_iter} = {n}")
    return {
        "prompt": body.prompt,
        "negative_prompt": body.negative_prompt,
        "steps": body.steps,
        "cfg_scale": body.cfg_scale,
        "seed": body.seed,
        "width": body.width,
        "height": body.height,
        "n": n,
        "clip_skip": overrides.get("CLIP_stop_at_last_layers", clip_skip),
        "vae_decoder": overrides.get("sd_vae_decode_method", vae_decoder),
        "sampler": sampler,
        # DDIM's eta and TCD's gamma as asked; the other samplers' eta is checked by check_fields above.
        "eta": (body.model_extra or {}).get("eta") if resolve_sampler(sampler).spec.eta is not None else None,
    }


def to_generation_request(body: Txt2ImgRequest, clip_skip: int = 1, vae_decoder: str = "Full") -> GenerationRequest:
    """Validate and convert; ValueError names the A1111 field at fault."""
    from pipelines.generation.conditioning import HiresFix

    _refuse_unsupported(body)
    hires = None
    if body.enable_hr:
        hires = HiresFix(
            scale=body.hr_scale,
            upscaler=body.hr_upscaler or "Latent",
            steps=body.hr_second_pass_steps,
            denoising_strength=0.7 if body.denoising_strength is None else body.denoising_strength,
            resize_x=body.hr_resize_x,
            resize_y=body.hr_resize_y,
        )
    return GenerationRequest(**_common_settings(body, clip_skip, vae_decoder), hires=hires, prune_to=body.prune_to,
                             prune_at=body.prune_at)


def _a1111_choice(field: str, value: int, choices: tuple[str, ...]) -> str:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < len(choices):
        options = ", ".join(f"{i} {name}" for i, name in enumerate(choices))
        raise ValueError(f"{field} must be one of {options}; got {value!r}")
    return choices[value]


def to_image_request(body: Img2ImgRequest, clip_skip: int = 1,
                     vae_decoder: str = "Full") -> tuple[GenerationRequest, list[str]]:
    """The img2img / inpaint request and notes (a mask resized to the image); ValueError names the field."""
    from pipelines.generation.masks import image_conditioning
    from sd_app.images import decode_image

    _refuse_unsupported(body)
    if not 0 <= body.denoising_strength <= 1:  # as the library would, by the A1111 field's name
        raise ValueError(f"denoising_strength must be between 0 and 1, got {body.denoising_strength!r}")
    if len(body.init_images) != 1:
        raise ValueError(f"init_images must hold exactly one base64 image, got {len(body.init_images)}")
    blur = body.mask_blur
    if blur is None:  # A1111: mask_blur, when sent, sets both directions; otherwise each its own
        blur_x, blur_y = (DEFAULT_MASK_BLUR if v is None else v for v in (body.mask_blur_x, body.mask_blur_y))
        if blur_x != blur_y:
            raise ValueError(f"mask_blur_x ({blur_x}) and mask_blur_y ({blur_y}) must be equal: sd-app blurs a mask "
                             "alike in both directions (send mask_blur)")
        blur = blur_x
    init = decode_image(body.init_images[0], "init_images[0]")
    mask = decode_image(body.mask, "mask", mask=True) if body.mask else None
    if body.inpainting_mask_invert not in (0, 1):
        raise ValueError(f"inpainting_mask_invert must be 0 or 1, got {body.inpainting_mask_invert!r}")
    image, notes = image_conditioning(
        init,
        mask,
        strength=body.denoising_strength,
        mask_blur=blur,
        masked_content=_a1111_choice("inpainting_fill", body.inpainting_fill, MASKED_CONTENT),
        inpaint_full_res=body.inpaint_full_res,
        padding=body.inpaint_full_res_padding,
        invert_mask=bool(body.inpainting_mask_invert),
        resize_mode=_a1111_choice("resize_mode", body.resize_mode, tuple(RESIZE_MODES)),
    )
    return GenerationRequest(**_common_settings(body, clip_skip, vae_decoder), image=image), notes


def png_base64(image: Image.Image, parameters: str | None) -> str:
    """PNG bytes (with the A1111 ``parameters`` text chunk) as base64, as A1111's API returns them."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    if parameters:
        info.add_text("parameters", parameters)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def build_info(
    body: GenerationFields, result: GenerationResult, model_hash: str | None, notes: list[str] | None = None
) -> dict[str, Any]:
    """A1111's ``info`` object (as a dict; the route JSON-encodes it) plus our CLIP scores."""
    request = result.request
    spec = resolve_sampler(request.sampler)
    count = len(result.candidates)
    return {
        "prompt": request.prompt,
        "all_prompts": [request.prompt] * count,
        "negative_prompt": request.negative_prompt,
        "all_negative_prompts": [request.negative_prompt] * count,
        "seed": request.seed,
        "all_seeds": result.seeds,
        "subseed": -1,
        "all_subseeds": [-1] * count,
        "subseed_strength": 0,
        "width": request.width,
        "height": request.height,
        "sampler_name": spec.name,
        "scheduler": spec.schedule,
        "cfg_scale": request.cfg_scale,
        "steps": request.steps,
        "batch_size": body.batch_size,
        "n_iter": body.n_iter,
        "restore_faces": False,
        "face_restoration_model": None,
        "sd_model_name": result.model_name,
        "sd_model_hash": model_hash,
        "sd_vae_name": None,
        "sd_vae_hash": None,
        "seed_resize_from_w": -1,
        "seed_resize_from_h": -1,
        "denoising_strength": _denoising_strength(request),
        "extra_generation_params": {"Schedule type": spec.schedule, **image_pairs(request)},
        "index_of_first_image": 0,
        "infotexts": [c.parameters for c in result.candidates],
        "styles": [],
        "job_timestamp": time.strftime("%Y%m%d%H%M%S"),
        "clip_skip": request.clip_skip,
        "is_using_inpainting_conditioning": result.inpainting_conditioning,
        "version": VERSION,
        "clip_scores": [
            c.details.get("CLIP score", c.score if result.score_label == "CLIP score" else None)
            for c in result.candidates
        ],
        "reranker": result.reranker_name,
        "reranked": result.reranker_name is not None,
        "score_label": result.score_label,
        "rerank_scores": [c.score for c in result.candidates],
        "rerank_details": [c.details for c in result.candidates],
        "min_score": result.min_scores or None,
        "min_score_passed": [c.passed for c in result.candidates] if result.min_scores else None,
        "rounds": result.rounds,
        "max_rounds": result.max_rounds,
        "candidates_made": result.candidates_made,  # started in all rounds, pruned ones included
        "prune_to": request.prune_to or None,
        "prune_at": request.prune_at or None,
        "pruned": [{"seed": c.seed, "score": c.score, "at_step": c.at_step, "details": c.details}
                   for c in result.pruned],  # dropped early, best early score first
        "early_scorer": result.early_scorer,  # what scored them: the reranker or the model's preview scorer
        "early_score_label": result.early_score_label if result.pruned else None,
        "prompt_truncated_for_scoring": result.prompt_truncated_for_scoring,
        "prompt_tokens": result.prompt_tokens.tokens if result.prompt_tokens else None,
        "prompt_chunks": result.prompt_tokens.chunks if result.prompt_tokens else None,
        "notes": notes or [],
        "interrupted": result.interrupted,  # by POST /interrupt: the images not started are missing
        "stopped_at_step": [c.stopped_at for c in result.candidates],  # stopped by an interrupt or a skip; null: done
    }


def _denoising_strength(request: GenerationRequest) -> float | None:
    if request.image is not None:
        return request.image.strength
    return request.hires.denoising_strength if request.hires is not None else None


def samplers_list() -> list[dict[str, Any]]:
    """``GET /sdapi/v1/samplers``: every sampler name we accept, A1111's shape."""
    rows = []
    for name, spec in SAMPLERS.items():
        default = spec.default_schedule
        options = {"scheduler": default.lower().replace(" ", "_")} if default not in (None, "Uniform") else {}
        rows.append({"name": name, "aliases": SAMPLER_ALIASES.get(name, []), "options": options})
    return rows


async def run_cancelling_on_disconnect(work: Callable[[], Any], http: Request, cancel: threading.Event) -> Any:
    """Run ``work`` in a worker thread; set ``cancel`` if the client goes away meanwhile (its queued or
    running job then stops within a step). Errors become HTTP answers with a ``detail``."""
    import anyio

    async def watch(scope: anyio.CancelScope) -> None:
        while not await http.is_disconnected():
            await anyio.sleep(0.25)
        cancel.set()
        scope.cancel()

    outcome: dict[str, Any] = {}
    async with anyio.create_task_group() as group:
        group.start_soon(watch, group.cancel_scope)
        try:
            outcome["result"] = await anyio.to_thread.run_sync(work)
        except Exception as error:  # noqa: BLE001 - mapped to an HTTP answer below
            outcome["error"] = error
        group.cancel_scope.cancel()
    if "error" in outcome:
        raise http_error(outcome["error"])
    if "result" not in outcome:  # the client disconnected; nobody reads this answer
        raise HTTPException(status_code=499, detail="client disconnected; the job was cancelled")
    return outcome["result"]


def build_api_router(engine: Engine, tracker: JobTracker) -> APIRouter:
    """The ``/sdapi/v1`` routes for one engine; no state outside ``engine`` and ``tracker``."""
    router = APIRouter(prefix="/sdapi/v1", tags=["sdapi"])

    async def run(
        body: GenerationFields, request: GenerationRequest, notes: list[str], http: Request
    ) -> dict[str, Any]:
        from sd_app.a1111_fields import check_options
        from sd_app.api_models import apply_options, check_server_options, client_switch

        overrides = check_options(body.override_settings or {}, "override_settings")
        if engine.limits is not None:  # what can be told without the model, before queueing behind other jobs
            rounds = 1 + body.extra_rounds if body.min_score is not None and body.min_score != {} else 1
            try:
                engine.limits.check(request, None, rounds=rounds)
            except ValueError as error:
                raise HTTPException(status_code=422, detail=str(error)) from None
        from pipelines.generation.denoising import Interruption

        cancel = threading.Event()  # the client went away: nothing is kept
        interruption = Interruption()  # POST /interrupt or /skip: what was made is kept
        client = http.client.host if http.client else ""

        def work() -> GenerationResult:
            check_server_options(engine, overrides)
            checkpoint, vae = client_switch(engine, overrides)  # library names only (422 for a path)
            with tracker.job(request.total_steps, cancel, "api", client=client, interruption=interruption) as job:
                if overrides and not body.override_settings_restore_afterwards:
                    apply_options(engine, overrides)  # A1111: the overrides stay, all of them
                return engine.generate(
                    request,
                    checkpoint=checkpoint,
                    vae=vae,
                    rerank=body.rerank,
                    rerank_by=body.rerank_by,
                    scorers=body.scorers,
                    min_score=body.min_score,
                    extra_rounds=body.extra_rounds,
                    save=body.save_images,
                    on_step=lambda info: tracker.step(job, info),
                    cancel=cancel,
                    interruption=interruption,
                    skip_batch_size=body.batch_size,  # a skip stops one of the n_iter batches, as in A1111
                )

        result = await run_cancelling_on_disconnect(work, http, cancel)
        images = [png_base64(c.image, c.parameters) for c in result.candidates] if body.send_images else []
        parameters = body.model_dump()
        if isinstance(body, Img2ImgRequest) and not body.include_init_images:
            parameters.update(init_images=None, mask=None)  # as A1111: the inputs are not echoed back
        return {
            "images": images,
            "parameters": parameters,
            "info": json.dumps(build_info(body, result, result.model_hash, notes)),
        }

    @router.post("/txt2img")
    async def txt2img(body: Txt2ImgRequest, http: Request) -> dict[str, Any]:
        try:
            request = to_generation_request(body, engine.clip_skip, engine.vae_decoder)
        except ValueError as error:
            raise HTTPException(status_code=422, detail=str(error)) from None
        return await run(body, request, [], http)

    @router.post("/img2img")
    async def img2img(body: Img2ImgRequest, http: Request) -> dict[str, Any]:
        try:
            request, notes = to_image_request(body, engine.clip_skip, engine.vae_decoder)
        except ValueError as error:
            raise HTTPException(status_code=422, detail=str(error)) from None
        return await run(body, request, notes, http)

    @router.get("/upscalers")
    def upscalers() -> list[dict[str, Any]]:
        names = ["None", *PIXEL_UPSCALERS]
        return [{"name": name, "model_name": None, "model_path": None, "model_url": None, "scale": 4}
                for name in names]

    @router.get("/latent-upscale-modes")
    def latent_upscale_modes() -> list[dict[str, Any]]:
        return [{"name": name} for name in LATENT_UPSCALERS]

    @router.get("/samplers")
    def samplers() -> list[dict[str, Any]]:
        return samplers_list()

    @router.get("/schedulers")
    def schedulers() -> list[dict[str, Any]]:
        return [{"name": name.lower().replace(" ", "_"), "label": name, "aliases": None} for name in SCHEDULERS]

    @router.get("/progress")
    def progress(skip_current_image: bool = False) -> dict[str, Any]:
        def previews(latents: Any) -> list[Image.Image]:
            return engine.active_pipeline().preview_latents(latents, size=128)

        return progress_payload(tracker, previews, skip_current_image)

    @router.get("/scorers")
    def scorers() -> list[dict[str, Any]]:
        """sd-app: the scorers a request may name in ``scorers`` / ``min_score`` (no paths)."""
        defaults = engine.default_weights()
        return [
            {"name": kind, "label": spec.label, "default_weight": defaults.get(kind),
             "model": Path(spec.source).name if spec.source else "reranker"}
            for kind, spec in engine.available_scorers().items()
        ]

    @router.post("/interrupt")
    def interrupt() -> dict[str, Any]:
        return {"interrupted": tracker.interrupt()}

    @router.post("/skip")
    def skip() -> dict[str, Any]:
        return {"skipped": tracker.skip()}

    return router


def progress_payload(
    tracker: JobTracker,
    previews: Callable[[Any], list[Image.Image]],
    skip_current_image: bool = False,
) -> dict[str, Any]:
    """A1111's ``/progress`` answer for the tracker's current job; ``previews`` maps latents to tiles."""
    job = tracker.current()
    now = time.time()
    asked = job.interruption if job is not None else None
    state = {
        "skipped": bool(asked and asked.skipped),
        "interrupted": bool(job and (job.cancel.is_set() or (asked is not None and asked.interrupted))),
        "stopping_generation": False,
        "job": f"job-{job.id}" if job else "",
        "job_count": tracker.count(),
        "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(job.registered if job else now)),
        "job_no": 0,
        "sampling_step": job.step if job else 0,
        "sampling_steps": job.total_steps if job else 0,
    }
    current_image = None
    if job is not None and job.latents is not None and not skip_current_image:
        current_image = png_base64(_side_by_side(previews(job.latents)), None)
    return {
        "progress": job.progress if job else 0.0,
        "eta_relative": job.eta(now) if job else 0.0,
        "state": state,
        "current_image": current_image,
        "textinfo": None,
        "current_task": state["job"] or None,
    }


def _side_by_side(tiles: list[Image.Image]) -> Image.Image:
    """Preview tiles of all images of a job (all the same size) in one row."""
    from diffusers.utils import make_image_grid

    return make_image_grid(tiles, rows=1, cols=len(tiles))
