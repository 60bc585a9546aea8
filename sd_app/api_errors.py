"""The HTTP answer for an error raised while serving a request: which status, and a ``detail`` a client can read.

The request's own mistakes (bad values, a name not in the model folders, a LoRA for another base) are 422; a
busy queue or memory running out 503; a cancelled job 409 (an interrupted one answers 200 with what it made,
``sd_app.api``); the server's own files or failures 500.
"""

from __future__ import annotations

from fastapi import HTTPException

from sd_app.ui_jobs import Busy


def http_error(error: Exception) -> HTTPException:
    """The HTTP answer for an error raised while generating (memory is freed after an unexpected failure)."""
    import torch

    from pipelines.generation.text_to_image import GenerationCancelled
    from pipelines.models.errors import IncompatibleModel, ModelLoadError, ModelNotFound
    from sd_app.checkpoints import free_memory

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
    free_memory()
    if isinstance(error, (torch.OutOfMemoryError, MemoryError)):
        return HTTPException(status_code=503, detail="out of memory: try a smaller size or fewer images")
    first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return HTTPException(status_code=500, detail=f"generation failed: {first_line[:300]}")
