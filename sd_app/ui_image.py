"""The Image to image view's inputs: the editor's picture and painted mask, and the request they make.

Gradio's ``ImageEditor`` hands over ``{"background", "layers", "composite"}``; the init image is the
background (transparency flattened over white), the mask is wherever any layer was painted (white =
repaint), or an uploaded mask image. Everything else is the same settings object the CLI and API build,
through ``pipelines.generation.masks.image_conditioning``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pipelines.generation.request import GenerationRequest

if TYPE_CHECKING:
    from PIL import Image

INPAINT_AREAS = ("Whole picture", "Only masked")
MASK_MODES = ("Inpaint masked", "Inpaint not masked")
SIDES = ("left", "right", "top", "bottom")


def _flatten(image: Image.Image) -> Image.Image:
    from PIL import Image

    if image.mode in ("RGBA", "LA", "P"):
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def editor_inputs(value: Any) -> tuple[Image.Image | None, Image.Image | None]:
    """(init image, painted mask or None) from an ImageEditor value (a dict) or a plain image."""
    from PIL import Image, ImageChops

    if value is None:
        return None, None
    if isinstance(value, Image.Image):
        return _flatten(value), None
    background = value.get("background") if isinstance(value, dict) else None
    if background is None:
        return None, None
    init = _flatten(background)
    mask = None
    for layer in value.get("layers") or []:
        if layer is None:
            continue
        alpha = layer.convert("RGBA").getchannel("A")
        if alpha.size != init.size:
            alpha = alpha.resize(init.size, Image.Resampling.NEAREST)
        painted = alpha.point(lambda a: 255 if a > 0 else 0)
        mask = painted if mask is None else ImageChops.lighter(mask, painted)
    if mask is not None and mask.getextrema()[1] == 0:
        mask = None  # an empty layer is no mask
    return init, mask


def image_request(
    base: dict[str, Any],
    editor: Any,
    uploaded_mask: Image.Image | None,
    strength: float,
    mask_blur: int,
    masked_content: str,
    inpaint_area: str,
    padding: int,
    mask_mode: str,
    resize_mode: str,
    outpaint: int,
    sides: list[str] | None,
) -> tuple[GenerationRequest, list[str]]:
    """The img2img / inpaint request for the view's fields (``base``: the ``GenerationRequest`` settings the
    Generate view also has: prompt, sampler, steps, CFG, seed, n, width, height).

    A width or height of 0 takes the init image's (floored to a multiple of 8). ValueError names the
    field at fault; the notes say what was adjusted (a resized mask, an outpainting canvas).
    """
    from pipelines.generation.masks import generation_size, image_conditioning
    from sd_app.ui_uploads import UnreadableUpload

    for upload in (editor, uploaded_mask):
        if isinstance(upload, UnreadableUpload):  # the event's validator refuses it first (sd_app.ui_uploads)
            raise ValueError(str(upload))
    init, painted = editor_inputs(editor)
    if init is None:
        raise ValueError("init image: upload or send an image to Image to image first")
    mask = uploaded_mask.convert("L") if uploaded_mask is not None else painted
    if inpaint_area not in INPAINT_AREAS:
        raise ValueError(f"inpaint area must be one of {', '.join(INPAINT_AREAS)}, got {inpaint_area!r}")
    if mask_mode not in MASK_MODES:
        raise ValueError(f"mask mode must be one of {', '.join(MASK_MODES)}, got {mask_mode!r}")
    pad = None
    if outpaint:
        chosen = [side for side in (sides or []) if side in SIDES]
        if not chosen:
            raise ValueError("outpaint: choose at least one side")
        pad = {side: int(outpaint) for side in chosen}
    image, notes = image_conditioning(
        init,
        mask,
        outpaint=pad,
        strength=float(strength),
        mask_blur=int(mask_blur),
        masked_content=masked_content,
        inpaint_full_res=inpaint_area == "Only masked",
        padding=int(padding),
        invert_mask=mask_mode == "Inpaint not masked",
        resize_mode=resize_mode,
    )
    own_width, own_height = generation_size(image.init_image)
    size = {"width": base.get("width") or own_width, "height": base.get("height") or own_height}
    return GenerationRequest(**{**base, **size}, image=image), notes
