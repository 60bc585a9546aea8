"""A1111's ``POST /sdapi/v1/png-info``: the generation parameters written in an image a client sends.

Body ``{"image": base64 or data URL}``; answer ``{"info": the parameters text ("" when there is none),
"items": the image's other text chunks, "parameters": the text parsed as A1111 parses it}``. The image
is only opened to read its text chunks (within the upload limits of ``sd_app.images``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, HTTPException
from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:
    from pipelines.models.library import ModelLibrary
    from sd_app.engine import Engine


class PngInfoRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    image: str


def png_info_payload(data: str, library: ModelLibrary | None = None) -> dict[str, Any]:
    """The answer for one base64 image; ValueError when it is not a readable image. With a ``library``, the parsed
    ``Prompt`` names the local LoRAs its ``Lora hashes`` give, as A1111's ``pnginfoapi`` runs its
    ``infotext_pasted`` callbacks (``info`` stays the text as written)."""
    from sd_app.images import decode_image_as_sent
    from sd_app.metadata import a1111_parameters, read_png_parameters, with_local_loras

    image = decode_image_as_sent(data, "image")
    text = read_png_parameters(image) or ""
    items = {key: value for key, value in image.info.items() if key != "parameters" and isinstance(value, str)}
    parameters = with_local_loras(a1111_parameters(text), library, key="Prompt") if text else {}
    return {"info": text, "items": items, "parameters": parameters}


def build_png_info_router(engine: Engine | None = None) -> APIRouter:
    """``POST /png-info``; with an ``engine``, LoRAs found by hash in its model library."""
    router = APIRouter(prefix="/sdapi/v1", tags=["sdapi"])

    @router.post("/png-info")
    def png_info(body: PngInfoRequest) -> dict[str, Any]:
        try:
            return png_info_payload(body.image, engine.library() if engine is not None else None)
        except ValueError as error:
            raise HTTPException(status_code=422, detail=str(error)) from None

    return router
