"""Init images and masks as users hand them over: files (CLI, UI) and base64 strings (A1111 API).

Anything that is not a readable image becomes a ValueError naming the field, so the CLI exits 2, the
API answers 422 and the UI shows a message. Images with transparency are flattened over white (A1111's
default img2img background); masks are read as 8-bit grey (white = repaint).
"""

from __future__ import annotations

import base64
import binascii
import io
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from PIL import Image

MAX_PIXELS = 2048 * 2048 * 4  # bigger uploads are refused before decoding (a decompression bomb guard)


def _flatten(image: Image.Image) -> Image.Image:
    from PIL import Image

    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _open(data: bytes | Path, field: str) -> Image.Image:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as opened:
            if opened.width * opened.height > MAX_PIXELS:
                raise ValueError(f"{field} is {opened.width}x{opened.height}, too large (at most 2048x2048 used)")
            opened.load()
            return opened.copy()
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError, SyntaxError) as error:
        raise ValueError(f"{field} is not a readable image ({type(error).__name__})") from None


def open_image_file(path: str | Path, field: str, mask: bool = False) -> Image.Image:
    """An image file as RGB (or grey for a mask); ValueError naming ``field`` if missing or unreadable."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{field} {path}: no such file")
    image = _open(path, f"{field} {path}")
    return image.convert("L") if mask else _flatten(image)


def decode_image(data: str, field: str, mask: bool = False) -> Image.Image:
    """A base64 image (optionally a ``data:image/...;base64,`` URL, as A1111 clients send) as RGB or grey."""
    image = decode_image_as_sent(data, field)
    return image.convert("L") if mask else _flatten(image)


def decode_image_as_sent(data: str, field: str) -> Image.Image:
    """A base64 image (or ``data:`` URL) in its own mode, with its text chunks (``image.info``)."""
    if not isinstance(data, str) or not data.strip():
        raise ValueError(f"{field} must be a base64-encoded image, got {data!r}"[:200])
    text = data.strip()
    if text.startswith("data:"):
        text = text.partition(",")[2]
    try:
        raw = base64.b64decode(text, validate=False)
    except (binascii.Error, ValueError):
        raise ValueError(f"{field} is not valid base64") from None
    return _open(raw, field)
