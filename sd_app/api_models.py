"""A1111's model routes: the model library's listings, options (switching checkpoint, VAE, clip skip), refresh.

``GET /sdapi/v1/sd-models | sd-vae | loras | embeddings | options``, ``POST /sdapi/v1/options`` and
``POST /sdapi/v1/refresh-checkpoints | refresh-vae | refresh-loras | refresh-embeddings``, in A1111's
shapes. ``POST /options`` takes ``sd_model_checkpoint``, ``sd_vae``, ``CLIP_stop_at_last_layers`` and
``sd_vae_decode_method`` (``Full`` or ``TAESD``, the default of requests that do not say);
any other option is refused by name (422), nothing is set then. A switch waits for the running job.
Entries add sd-app's own fields (``size``, ``base_model``, ``refused``: pickles are listed, never loaded).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, HTTPException, Request

from sd_app.a1111_fields import check_options
from sd_app.checkpoints import vae_shown

if TYPE_CHECKING:
    from sd_app.engine import Engine


def checkpoint_rows(engine: Engine) -> list[dict[str, Any]]:
    """``GET /sd-models``: the selected checkpoint first when it is no library entry, then the library's."""
    library = engine.library()
    rows = []
    selected, _ = engine.selection()
    entries = [e for e in library.files("checkpoint") if e.refused is None]
    in_library = any(str(e.path) == selected or (e.folder == "shipped" and selected == "embedded") for e in entries)
    if not in_library:
        components = engine.pipeline().components  # a path or a cached repo id outside the folders
        title = f"{components.name} [{components.model_hash}]" if components.model_hash else components.name
        rows.append({"title": title, "model_name": components.name, "hash": components.model_hash, "sha256": None,
                     "filename": components.source or selected, "config": None})
    for entry in entries:
        sha256 = library.hashes.sha256(entry.weights)
        rows.append({
            "title": f"{entry.name} [{sha256[:10]}]", "model_name": Path(entry.name).stem if entry.format != "diffusers"
            else entry.name, "hash": sha256[:10], "sha256": sha256, "filename": str(entry.path), "config": None,
            "size": entry.size, "format": entry.format,
        })
    return rows


def selected_title(engine: Engine) -> str:
    """The ``sd_model_checkpoint`` value of the selection, A1111's title ``name [hash]``."""
    selected, _ = engine.selection()
    for row in checkpoint_rows(engine):
        if row["filename"] == selected or (selected == "embedded" and row["model_name"] == "shapes-tiny"):
            return row["title"]
    return checkpoint_rows(engine)[0]["title"]


def options_payload(engine: Engine) -> dict[str, Any]:
    """``GET /options``: the options sd-app has (A1111's names)."""
    return {
        "sd_model_checkpoint": selected_title(engine),
        "sd_vae": vae_shown(engine.library(), engine.vae),
        "CLIP_stop_at_last_layers": engine.clip_skip,
        "sd_vae_decode_method": engine.vae_decoder,
        "sd_checkpoints_limit": engine.max_loaded,
        "samples_format": "png",
    }


def lora_rows(engine: Engine) -> list[dict[str, Any]]:
    """``GET /loras``: name, alias (kohya's ``ss_output_name``), path, metadata; plus hash, base model, refusal."""
    library = engine.library()
    rows = []
    for entry in library.files("lora"):
        row = library.describe(entry)
        rows.append({"name": entry.name, "alias": row["metadata"].get("ss_output_name", entry.stem),
                     "path": str(entry.path), "metadata": row["metadata"], "hash": row["hash"],
                     "base_model": row["base_model"], "size": entry.size, "refused": row["refused"]})
    return rows


def embedding_rows(engine: Engine) -> dict[str, dict[str, Any]]:
    """``GET /embeddings``: A1111's {"loaded": {name: {...}}, "skipped": {...}} for the running text encoder."""
    from pipelines.models.errors import ModelLoadError
    from pipelines.models.library import read_header

    library = engine.library()
    width = int(engine.active_pipeline().components.text_encoder.config.hidden_size)
    loaded: dict[str, Any] = {}
    skipped: dict[str, Any] = {}
    for entry in library.files("embedding"):
        info: dict[str, Any] = {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None, "shape": None,
                                "vectors": None, "path": str(entry.path), "refused": entry.refused}
        if entry.refused is None:
            try:
                shapes = list(read_header(entry.path).shapes.values())
            except ModelLoadError as error:
                info["refused"] = str(error)
            else:
                shape = shapes[0] if len(shapes) == 1 else None
                if shape:
                    info["shape"], info["vectors"] = shape[-1], (shape[0] if len(shape) == 2 else 1)
                    info["hash"] = library.short_hash(entry)
        fits = info["refused"] is None and info["shape"] == width
        (loaded if fits else skipped)[entry.stem] = info
    return {"loaded": loaded, "skipped": skipped}


def build_models_router(engine: Engine) -> APIRouter:
    """The model routes for one engine (model calls run in worker threads: loading and hashing block)."""
    import anyio

    router = APIRouter(prefix="/sdapi/v1", tags=["sdapi"])

    async def in_thread(work: Any) -> Any:
        from sd_app.api_errors import http_error

        try:
            return await anyio.to_thread.run_sync(work)
        except Exception as error:  # noqa: BLE001 - mapped to an HTTP answer
            raise http_error(error) from None

    @router.get("/sd-models")
    async def sd_models() -> list[dict[str, Any]]:
        return await in_thread(lambda: checkpoint_rows(engine))

    @router.get("/sd-vae")
    async def sd_vae() -> list[dict[str, Any]]:
        return await in_thread(lambda: [{"model_name": e.name, "filename": str(e.path)}
                                        for e in engine.library().files("vae") if e.refused is None])

    @router.get("/loras")
    async def loras() -> list[dict[str, Any]]:
        return await in_thread(lambda: lora_rows(engine))

    @router.get("/embeddings")
    async def embeddings() -> dict[str, dict[str, Any]]:
        return await in_thread(lambda: embedding_rows(engine))

    @router.get("/options")
    async def get_options() -> dict[str, Any]:
        return await in_thread(lambda: options_payload(engine))

    @router.post("/options")
    async def set_options(http: Request) -> dict[str, Any]:
        try:
            body = await http.json()
        except ValueError:
            raise HTTPException(status_code=422, detail="the body must be a JSON object of options") from None
        try:
            wanted = check_options(body)
        except ValueError as error:
            raise HTTPException(status_code=422, detail=str(error)) from None
        return await in_thread(lambda: apply_options(engine, wanted))

    for kind, route in (("checkpoint", "checkpoints"), ("vae", "vae"), ("lora", "loras"), ("embedding", "embeddings")):
        router.add_api_route(f"/refresh-{route}", _refresher(engine, kind), methods=["POST"])
    return router


def client_switch(engine: Engine, wanted: Mapping[str, Any]) -> tuple[str | None, str | None]:
    """The checkpoint and VAE that options (or a request's ``override_settings``) name, as the engine's selection
    (None: unchanged): library names only, or the running selection as ``GET /options`` shows it; a path is
    refused (ModelNotFound, 422) before anything is read (``sd_app.checkpoints.client_selection``)."""
    from sd_app.checkpoints import client_selection

    def spellings(value: str) -> set[str]:  # as the server was given it, and as a path made absolute
        path = Path(value).expanduser()
        return {value, str(path.resolve())} if path.exists() else {value}

    def shown() -> tuple[set[str], set[str]]:
        vae = vae_shown(engine.library(), engine.vae)
        return {selected_title(engine), *spellings(str(engine.model))}, {vae, *spellings(engine.vae or vae)}

    return client_selection(engine.library(), wanted.get("sd_model_checkpoint"), wanted.get("sd_vae"), shown)


def check_server_options(engine: Engine, wanted: Mapping[str, Any]) -> None:
    """ValueError when options set on the server's command line are sent at another value than theirs."""
    limit = wanted.get("sd_checkpoints_limit", engine.max_loaded)
    if limit != engine.max_loaded or isinstance(limit, bool):
        raise ValueError(f"sd_checkpoints_limit is the server's --max-loaded ({engine.max_loaded}); it is not set "
                         f"over HTTP, got {limit!r}")


def apply_options(engine: Engine, wanted: Mapping[str, Any]) -> dict[str, Any]:
    """Switch checkpoint / VAE (after the running job) and set the default clip skip and VAE decoder; the
    options after. Nothing changes when any value is refused (a clip skip beyond the text encoder's layers of the
    checkpoint selected after, too)."""
    check_server_options(engine, wanted)
    checkpoint, vae = client_switch(engine, wanted)
    clip_skip = wanted.get("CLIP_stop_at_last_layers")  # checked against the (new) checkpoint's text encoder
    if checkpoint is not None or vae is not None:
        engine.switch(checkpoint=checkpoint, vae=vae, clip_skip=clip_skip)
    elif clip_skip is not None:
        engine.set_clip_skip(clip_skip)
    if "sd_vae_decode_method" in wanted:
        engine.vae_decoder = wanted["sd_vae_decode_method"]
    return options_payload(engine)


def _refresher(engine: Engine, kind: str) -> Any:
    def refresh() -> None:
        engine.library().refresh(kind)

    return refresh
