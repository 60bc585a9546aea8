"""A1111 routes for what sd-app does not have (styles, face restorers, hypernetworks, scripts), answered in
A1111's shapes with nothing in them, so a client that lists them before it generates works; and
``GET /memory``: the machine's RAM and, on CUDA, the GPU's, as A1111 reports them.
"""

from __future__ import annotations

import os
from typing import Any

from fastapi import APIRouter


def ram() -> dict[str, Any]:
    """Total, free and used physical memory in bytes (POSIX ``sysconf``); an error entry where unknown."""
    try:
        page = os.sysconf("SC_PAGE_SIZE")
        total, free = os.sysconf("SC_PHYS_PAGES") * page, os.sysconf("SC_AVPHYS_PAGES") * page
    except (ValueError, OSError, AttributeError):
        return {"error": "unavailable on this system"}
    return {"free": free, "used": total - free, "total": total}


def cuda_memory() -> dict[str, Any]:
    """A1111's ``cuda.system`` numbers (bytes) of the current device, or an error entry without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return {"error": "no CUDA device"}
    free, total = torch.cuda.mem_get_info()
    return {"system": {"free": free, "used": total - free, "total": total},
            "active": {"current": torch.cuda.memory_allocated(), "peak": torch.cuda.max_memory_allocated()}}


def build_listings_router() -> APIRouter:
    router = APIRouter(prefix="/sdapi/v1", tags=["sdapi"])

    @router.get("/prompt-styles")
    def prompt_styles() -> list[dict[str, Any]]:
        return []

    @router.get("/face-restorers")
    def face_restorers() -> list[dict[str, Any]]:
        return []

    @router.get("/hypernetworks")
    def hypernetworks() -> list[dict[str, Any]]:
        return []

    @router.get("/scripts")
    def scripts() -> dict[str, list[str]]:
        return {"txt2img": [], "img2img": []}

    @router.get("/script-info")
    def script_info() -> list[dict[str, Any]]:
        return []

    @router.get("/memory")
    def memory() -> dict[str, Any]:
        return {"ram": ram(), "cuda": cuda_memory()}

    return router
