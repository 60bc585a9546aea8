"""A1111 routes for what sd-app does not have (styles, face restorers, hypernetworks, scripts), answered in
A1111's shapes with nothing in them, so a client that lists them before it generates works;
``GET /memory``: the machine's RAM and, on CUDA, the GPU's, as A1111 reports them; and ``GET /cmd-flags``:
the options ``sd-app serve`` was started with, as A1111 returns its command line (``vars(cmd_opts)``), with
the credentials masked (A1111 returns its ``--api-auth`` in clear).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from typing import Any

from fastapi import APIRouter

# Words of an option's name that make its value a credential, or where one is: --auth, --auth-file, and any
# later --hf-token, --api-key ... (--max-prompt-tokens counts tokens: not one of these words).
SECRET_WORDS = frozenset({"auth", "token", "password", "passwd", "secret", "key", "credential", "credentials"})
MASK = "********"


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


def public_flags(flags: argparse.Namespace | Mapping[str, Any] | None) -> dict[str, Any]:
    """The serve options as JSON: paths as text, lists of them as lists; a credential option's value is masked
    when set (None when unset), whatever its type."""
    options = vars(flags) if isinstance(flags, argparse.Namespace) else dict(flags or {})
    shown: dict[str, Any] = {}
    for name, value in options.items():
        if callable(value):
            continue  # argparse's set_defaults(func=...), not an option
        if SECRET_WORDS & set(name.lower().split("_")):
            shown[name] = MASK if value not in (None, False, "", []) else value
        else:
            shown[name] = _json_value(value)
    return shown


def _json_value(value: Any) -> Any:
    """JSON's types as they are, lists item by item, anything else (a Path) as its text."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_json_value(item) for item in value]
    return str(value)


def build_listings_router(flags: argparse.Namespace | Mapping[str, Any] | None = None) -> APIRouter:
    """The routes above; ``flags``: the serve options ``GET /cmd-flags`` shows (none for an app built in code)."""
    router = APIRouter(prefix="/sdapi/v1", tags=["sdapi"])
    shown_flags = public_flags(flags)

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

    @router.get("/cmd-flags")
    def cmd_flags() -> dict[str, Any]:
        return dict(shown_flags)

    return router
