"""A1111's ``POST /sdapi/v1/png-info``: the generation parameters written in an image a client sends.

Body ``{"image": base64 or data URL}``; answer ``{"info": the parameters text ("" when there is none),
"items": the image's other text chunks, "parameters": the text parsed as A1111 parses it}``. The image
is only opened to read its text chunks (within the upload limits of ``sd_app.images``).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, HTTPException
from pydantic import BaseModel, ConfigDict


class PngInfoRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    image: str


def png_info_payload(data: str) -> dict[str, Any]:
    """The answer for one base64 image; ValueError when it is not a readable image."""
    from sd_app.images import decode_image_as_sent
    from sd_app.metadata import a1111_parameters, read_png_parameters

    image = decode_image_as_sent(data, "image")
    text = read_png_parameters(image) or ""
    items = {key: value for key, value in image.info.items() if key != "parameters" and isinstance(value, str)}
    return {"info": text, "items": items, "parameters": a1111_parameters(text) if text else {}}


def build_png_info_router() -> APIRouter:
    router = APIRouter(prefix="/sdapi/v1", tags=["sdapi"])

    @router.post("/png-info")
    def png_info(body: PngInfoRequest) -> dict[str, Any]:
        try:
            return png_info_payload(body.image)
        except ValueError as error:
            raise HTTPException(status_code=422, detail=str(error)) from None

    return router
