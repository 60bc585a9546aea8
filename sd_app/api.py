"""HTTP routes compatible with AUTOMATIC1111's ``/sdapi/v1`` subset, on a FastAPI router.

``POST /sdapi/v1/txt2img``, ``GET /sdapi/v1/samplers | schedulers | progress`` and
``POST /sdapi/v1/interrupt`` (the model routes, options included, are in ``sd_app.api_models``).
Requests become the same ``GenerationRequest`` the UI and CLI
build and run through the same ``Engine``. Differences from A1111, on purpose:

- images come back best first by CLIP score when a reranker is loaded (``"rerank": false`` keeps
  generation order); ``info.all_seeds``, ``info.infotexts`` and ``info.clip_scores`` follow the
  order of ``images``; no grid image is prepended for batches;
- options that would change the picture but are not implemented (``enable_hr``, ``restore_faces``,
  ``tiling``, ``subseed_strength``, ``styles``, scripts) are refused with 422 instead of ignored;
- defaults for absent fields are ``GenerationRequest``'s (20 steps, DPM++ 2M with its Karras schedule).
"""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal

from fastapi import APIRouter, HTTPException, Request
from pydantic import BaseModel, ConfigDict, Field

from pipelines.generation.request import GenerationRequest
from pipelines.generation.schedulers import SAMPLERS, resolve_sampler, schedule_names
from sd_app.metadata import VERSION
from sd_app.ui_jobs import Busy, JobTracker

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
}
SCHEDULERS = tuple(schedule_names())


class Txt2ImgRequest(BaseModel):
    """The A1111 ``StableDiffusionTxt2ImgProcessingAPI`` fields we honour; the others are checked by
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
    rerank_by: Literal["clip", "contrastive", "mixed"] = "clip"  # sd-app: or against counterfactual captions
    override_settings: dict[str, Any] | None = None  # sd_model_checkpoint, sd_vae, CLIP_stop_at_last_layers
    override_settings_restore_afterwards: bool = True


def sampler_from_fields(sampler_name: str | None, scheduler: str | None) -> str:
    """Our sampler name for A1111's ``sampler_name`` (or an alias) and ``scheduler``; ValueError if unknown."""
    name = (sampler_name or _DEFAULTS.sampler).strip()
    for canonical, aliases in SAMPLER_ALIASES.items():
        if name.casefold() in aliases:
            name = canonical
    return resolve_sampler(name, scheduler).label


def to_generation_request(body: Txt2ImgRequest, clip_skip: int = 1) -> GenerationRequest:
    """Validate and convert; ValueError names the A1111 field at fault. ``clip_skip``: the server's default,
    unless ``override_settings`` says ``CLIP_stop_at_last_layers``."""
    from sd_app.a1111_fields import check_fields, check_options

    overrides = check_options(body.override_settings or {}, "override_settings")
    sampler = sampler_from_fields(body.sampler_name or body.sampler_index, body.scheduler)
    check_fields(body.model_extra or {}, resolve_sampler(sampler).name, set(Txt2ImgRequest.model_fields))
    n = body.batch_size * body.n_iter
    if not 1 <= n <= 16:
        raise ValueError(f"batch_size * n_iter must be between 1 and 16, got {body.batch_size} * {body.n_iter} = {n}")
    return GenerationRequest(
        prompt=body.prompt,
        negative_prompt=body.negative_prompt,
        steps=body.steps,
        cfg_scale=body.cfg_scale,
        seed=body.seed,
        width=body.width,
        height=body.height,
        n=n,
        clip_skip=overrides.get("CLIP_stop_at_last_layers", clip_skip),
        sampler=sampler,
    )


def png_base64(image: Image.Image, parameters: str | None) -> str:
    """PNG bytes (with the A1111 ``parameters`` text chunk) as base64, as A1111's API returns them."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    if parameters:
        info.add_text("parameters", parameters)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def build_info(body: Txt2ImgRequest, result: GenerationResult, model_hash: str | None) -> dict[str, Any]:
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
        "denoising_strength": None,
        "extra_generation_params": {"Schedule type": spec.schedule},
        "index_of_first_image": 0,
        "infotexts": [c.parameters for c in result.candidates],
        "styles": [],
        "job_timestamp": time.strftime("%Y%m%d%H%M%S"),
        "clip_skip": request.clip_skip,
        "is_using_inpainting_conditioning": False,
        "version": VERSION,
        "clip_scores": [c.details.get("CLIP score", c.score) for c in result.candidates],
        "reranker": result.reranker_name,
        "reranked": result.reranker_name is not None,
        "score_label": result.score_label,
        "rerank_scores": [c.score for c in result.candidates],
        "rerank_details": [c.details for c in result.candidates],
        "prompt_truncated_for_scoring": result.prompt_truncated_for_scoring,
        "prompt_tokens": result.prompt_tokens.tokens if result.prompt_tokens else None,
        "prompt_chunks": result.prompt_tokens.chunks if result.prompt_tokens else None,
    }


def samplers_list() -> list[dict[str, Any]]:
    """``GET /sdapi/v1/samplers``: every sampler name we accept, A1111's shape."""
    rows = []
    for name, spec in SAMPLERS.items():
        default = spec.default_schedule
        options = {"scheduler": default.lower()} if default not in (None, "Uniform") else {}
        rows.append({"name": name, "aliases": SAMPLER_ALIASES.get(name, []), "options": options})
    return rows


def _free_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


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


def http_error(error: Exception) -> HTTPException:
    """The HTTP answer for an error raised while generating."""
    import torch

    from pipelines.generation.text_to_image import GenerationCancelled
    from pipelines.models.errors import IncompatibleModel, ModelLoadError, ModelNotFound

    if isinstance(error, HTTPException):
        return error
    if isinstance(error, Busy):
        return HTTPException(status_code=503, detail=str(error))
    if isinstance(error, GenerationCancelled):
        return HTTPException(status_code=409, detail=f"interrupted: {error}")
    if isinstance(error, (ModelNotFound, IncompatibleModel)):  # a name or a LoRA the request chose
        return HTTPException(status_code=422, detail=str(error))
    if isinstance(error, (ModelLoadError, OSError)):  # the server's model files, not the request
        return HTTPException(status_code=500, detail=f"model could not be loaded: {error}")
    if isinstance(error, ValueError):
        return HTTPException(status_code=422, detail=str(error))
    _free_memory()
    if isinstance(error, (torch.OutOfMemoryError, MemoryError)):
        return HTTPException(status_code=503, detail="out of memory: try a smaller size or fewer images")
    first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return HTTPException(status_code=500, detail=f"generation failed: {first_line[:300]}")


def build_api_router(engine: Engine, tracker: JobTracker) -> APIRouter:
    """The ``/sdapi/v1`` routes for one engine; no state outside ``engine`` and ``tracker``."""
    router = APIRouter(prefix="/sdapi/v1", tags=["sdapi"])

    @router.post("/txt2img")
    async def txt2img(body: Txt2ImgRequest, http: Request) -> dict[str, Any]:
        from sd_app.a1111_fields import check_options

        try:
            request = to_generation_request(body, engine.clip_skip)
            overrides = check_options(body.override_settings or {}, "override_settings")
        except ValueError as error:
            raise HTTPException(status_code=422, detail=str(error)) from None
        switch = {"checkpoint": overrides.get("sd_model_checkpoint"), "vae": overrides.get("sd_vae")}
        cancel = threading.Event()
        client = http.client.host if http.client else ""

        def work() -> GenerationResult:
            with tracker.job(request.steps, cancel, "api", client=client) as job:
                if not body.override_settings_restore_afterwards and any(switch.values()):
                    engine.switch(**switch)  # A1111: the override stays
                return engine.generate(
                    request,
                    **switch,
                    rerank=body.rerank,
                    rerank_by=body.rerank_by,
                    save=body.save_images,
                    on_step=lambda info: tracker.step(job, info),
                    cancel=cancel,
                )

        result = await run_cancelling_on_disconnect(work, http, cancel)
        images = [png_base64(c.image, c.parameters) for c in result.candidates] if body.send_images else []
        model_hash = result.model_hash
        return {
            "images": images,
            "parameters": body.model_dump(),
            "info": json.dumps(build_info(body, result, model_hash)),
        }

    @router.get("/samplers")
    def samplers() -> list[dict[str, Any]]:
        return samplers_list()

    @router.get("/schedulers")
    def schedulers() -> list[dict[str, Any]]:
        return [{"name": name.lower(), "label": name, "aliases": None} for name in SCHEDULERS]

    @router.get("/progress")
    def progress(skip_current_image: bool = False) -> dict[str, Any]:
        def previews(latents: Any) -> list[Image.Image]:
            return engine.active_pipeline().preview_latents(latents, size=128)

        return progress_payload(tracker, previews, skip_current_image)

    @router.post("/interrupt")
    def interrupt() -> dict[str, Any]:
        return {"interrupted": tracker.interrupt()}

    return router


def progress_payload(
    tracker: JobTracker,
    previews: Callable[[Any], list[Image.Image]],
    skip_current_image: bool = False,
) -> dict[str, Any]:
    """A1111's ``/progress`` answer for the tracker's current job; ``previews`` maps latents to tiles."""
    job = tracker.current()
    now = time.time()
    state = {
        "skipped": False,
        "interrupted": bool(job and job.cancel.is_set()),
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
