"""Image inputs whose unreadable uploads become one message naming the upload.

Gradio's ``Image`` and ``ImageEditor`` open an upload with PIL before any handler runs (their ``preprocess``,
gradio 6.31 ``image_utils.preprocess_image``); a file that is no image (a text file named ``fake.png``) fails
there, and Gradio reports a ``ComponentProcessingError`` without a message: the page shows a bare "Error".
``checked_upload`` makes such an upload an ``UnreadableUpload`` naming the field and the file as it was uploaded
(never the server's temporary copy), and the event's validator (``refuse_unreadable``, Gradio 6's ``validator=``,
run before the event is queued) refuses it with that line under the input: the view's results stay as they were,
with no "Error" over them. A handler reached without the validator (a direct call) refuses it as any bad input.
It wraps the one component's ``preprocess`` rather than subclassing: Gradio writes a ``.pyi`` stub beside the
module of every Component subclass.
"""

from __future__ import annotations

from functools import wraps
from pathlib import Path
from typing import Any, TypeVar

import gradio as gr

C = TypeVar("C", bound=gr.components.Component)


def uploaded_name(payload: Any) -> str:
    """The name the file was uploaded with (``orig_name``; an editor's background's), else its stored name."""
    for data in (payload, getattr(payload, "background", None)):
        name = getattr(data, "orig_name", None) or (Path(data.path).name if getattr(data, "path", None) else None)
        if name:
            return name
    return "the upload"


class UnreadableUpload:
    """What a checked input hands over for an upload that is not a readable image: the message for the user."""

    def __init__(self, message: str) -> None:
        self.message = message

    def __str__(self) -> str:
        return self.message


def refuse_unreadable(*inputs: Any) -> list[dict[str, Any]]:
    """An event's validator: every input valid except an ``UnreadableUpload``, refused with its message."""
    return [gr.validate(not isinstance(value, UnreadableUpload), str(value) if isinstance(value, UnreadableUpload)
                        else "") for value in inputs]


def checked_upload(component: C, field: str) -> C:
    """``component`` (an Image or ImageEditor) handing over an ``UnreadableUpload`` naming ``field`` and the file
    for an upload that is not a readable image."""
    preprocess = component.preprocess

    @wraps(preprocess)
    def checked(payload: Any) -> Any:
        try:
            return preprocess(payload)
        except gr.Error:
            raise
        except Exception:  # noqa: BLE001 - PIL's UnidentifiedImageError, OSError, DecompressionBombError, ...
            return UnreadableUpload(f"{field}: {uploaded_name(payload)} is not a readable image (PNG, JPEG or WebP)")

    component.preprocess = checked  # type: ignore[method-assign]
    return component
