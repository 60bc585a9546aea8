"""``sd-app serve``: the Gradio UI and the A1111-compatible API on one FastAPI app, behind one auth.

Auth is HTTP Basic on every path (UI page, Gradio's own routes, ``/sdapi/v1/*``, docs), checked by
one ASGI middleware, so the API is covered exactly as the UI. Browsers ask for the credentials
once; A1111 clients send them as they do for A1111's ``--api-auth``.
Binding to a non-loopback address without auth is refused unless ``--insecure``.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import hmac
import ipaddress
import json
import sys
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sd_app.security import DEFAULT_MAX_BODY_BYTES, AccessPolicy, BodySizeLimit, HostOriginGuard

if TYPE_CHECKING:
    from fastapi import FastAPI

    from sd_app.engine import Engine
    from sd_app.ui_jobs import JobTracker

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860
Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


def parse_credentials(pairs: list[str] | None = None, auth_file: str | Path | None = None) -> dict[str, str]:
    """``user:password`` pairs from ``--auth`` (repeatable, comma-separated) and ``--auth-file`` lines."""
    items: list[str] = []
    for pair in pairs or []:
        items.extend(pair.split(","))
    if auth_file is not None:
        path = Path(auth_file)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as error:
            raise ValueError(f"--auth-file {path}: cannot read it ({error.strerror or error})") from None
        for line in text.splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                items.extend(line.split(","))
    credentials: dict[str, str] = {}
    for item in items:
        user, sep, password = item.strip().partition(":")
        if not sep or not user or not password:
            raise ValueError(f"auth entries must look like user:password, got {item.strip()!r}")
        credentials[user] = password
    if auth_file is not None and not credentials:
        raise ValueError(f"--auth-file {auth_file}: no user:password entries found")
    return credentials


def is_loopback(host: str) -> bool:
    """True for localhost, 127.0.0.0/8 and ::1."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class BasicAuthMiddleware:
    """Pure ASGI HTTP Basic auth (streaming responses and websockets pass through untouched)."""

    def __init__(self, app: Callable[..., Awaitable[None]], credentials: dict[str, str], realm: str = "sd-app") -> None:
        self.app = app
        self.credentials = {u.encode(): p.encode() for u, p in credentials.items()}
        self.realm = realm

    def authorized(self, headers: list[tuple[bytes, bytes]]) -> bool:
        value = next((v for k, v in headers if k.lower() == b"authorization"), b"")
        scheme, _, token = value.partition(b" ")
        if scheme.lower() != b"basic":
            return False
        try:
            user, sep, password = base64.b64decode(token.strip(), validate=True).partition(b":")
        except (binascii.Error, ValueError):
            return False
        expected = self.credentials.get(user)
        # Compare even for unknown users so timing does not reveal which user names exist.
        return bool(sep) and hmac.compare_digest(password, expected or b"\0" * 32) and expected is not None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or self.authorized(scope.get("headers", [])):
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        body = b'{"detail":"authentication required"}'
        await send(
            {
                "type": "http.response.start",
                "status": 401,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"www-authenticate", f'Basic realm="{self.realm}", charset="UTF-8"'.encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


MAX_ECHOED_INPUT = 200  # characters of a refused value a 422 repeats back


def validation_details(errors: Sequence[Any]) -> list[dict[str, Any]]:
    """FastAPI's validation errors (field, message) with each refused value shown only when it is short and
    plain JSON: a 422 never sends a client's megabytes back, and never fails on what it would echo (bytes of a
    form body, NaN, a lone surrogate)."""
    from fastapi.encoders import jsonable_encoder

    details = []
    for error in errors:
        detail = {key: error[key] for key in ("type", "loc", "msg") if key in error}
        if "input" in error:
            try:
                shown = jsonable_encoder(error["input"])
                text = json.dumps(shown, allow_nan=False, ensure_ascii=False)
                text.encode("utf-8")
            except (TypeError, ValueError, UnicodeError):
                shown, text = None, ""
            if text and len(text) <= MAX_ECHOED_INPUT:
                detail["input"] = shown
        details.append(detail)
    return details


def create_app(
    engine: Engine,
    *,
    credentials: dict[str, str] | None = None,
    max_queue: int = 16,
    tracker: JobTracker | None = None,
    policy: AccessPolicy | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    local_paths: bool = False,
    flags: argparse.Namespace | None = None,
) -> FastAPI:
    """FastAPI app with the ``/sdapi/v1`` routes and the Gradio UI at ``/``.

    Outermost first: our own Host names only and no cross-site writes (``policy``, loopback names by
    default), HTTP Basic auth if ``credentials``, then bounded request bodies. Every error is JSON with
    a ``detail``. ``local_paths``: the UI's Rerank view may read typed folders and copy anywhere (only for a
    server that answers on loopback addresses alone). ``flags``: the ``sd-app serve`` options, which
    ``GET /sdapi/v1/cmd-flags`` shows with the credentials masked.
    """
    import gradio as gr
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse

    from sd_app.api import build_api_router
    from sd_app.api_listings import build_listings_router
    from sd_app.api_models import build_models_router
    from sd_app.api_png_info import build_png_info_router
    from sd_app.ui import CSS, build_demo
    from sd_app.ui_jobs import JobTracker

    tracker = tracker or JobTracker(max_waiting=max_queue)
    app = FastAPI(title="sd-app", version="0.1.0")

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Any, error: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": validation_details(error.errors())}, status_code=422)

    @app.exception_handler(Exception)
    async def unexpected(_request: Any, error: Exception) -> JSONResponse:
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        return JSONResponse({"detail": f"internal error: {first_line[:300]}"}, status_code=500)

    app.include_router(build_api_router(engine, tracker))  # before the mount, so these routes win
    app.include_router(build_models_router(engine))
    app.include_router(build_png_info_router(engine))
    app.include_router(build_listings_router(flags))
    demo = build_demo(engine, tracker=tracker, max_queue=max_queue, local_paths=local_paths)
    output_dir = str(Path(engine.output_dir).expanduser().resolve())
    app = gr.mount_gradio_app(
        app, demo, path="/", allowed_paths=[output_dir], show_error=False, css=CSS, footer_links=["api"]
    )
    # Gradio accepts only uploaded files as handler inputs once an app "has launched"; mount_gradio_app
    # never sets that flag (gradio 6.31), which let an API call hand a handler any path on the server.
    demo.has_launched = True
    # The last added runs first: Host and Origin, then auth (a client without the password gets 401 before
    # any of its body is read), then the body's size (a chunked body is read and counted here, whole).
    app.add_middleware(BodySizeLimit, max_bytes=max_body_bytes)
    if credentials:
        app.add_middleware(BasicAuthMiddleware, credentials=credentials)
    app.add_middleware(HostOriginGuard, policy=policy or AccessPolicy.build(DEFAULT_HOST))
    return app


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``sd-app serve``."""
    from sd_app.limits import RequestLimits

    parser.add_argument("--host", default=DEFAULT_HOST, help=f"address to bind (default {DEFAULT_HOST})")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    parser.add_argument("--model", default="embedded", help="'embedded', a diffusers folder or a .safetensors")
    parser.add_argument("--vae", default=None, help="separate VAE .safetensors")
    from sd_app.arguments import add_decoder_argument, add_library_arguments, add_scorer_arguments

    add_library_arguments(parser)
    add_decoder_argument(parser)
    add_scorer_arguments(parser)
    parser.add_argument("--max-loaded", type=int, default=1,
                        help="checkpoints kept in memory when switching (least recently used freed; default 1)")
    parser.add_argument("--reranker", default="embedded", help="CLIP model folder for reranking; 'none' to disable")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--out", type=Path, default=Path("outputs"), help="folder for generated PNGs")
    parser.add_argument(
        "--auth",
        action="append",
        metavar="USER:PASSWORD",
        help="require HTTP Basic auth for UI and API (repeatable, or comma-separated)",
    )
    parser.add_argument("--auth-file", type=Path, default=None, help="file with user:password lines")
    parser.add_argument(
        "--insecure",
        action="store_true",
        help="allow a non-loopback --host without auth (anyone on the network can use it)",
    )
    parser.add_argument("--max-queue", type=int, default=16, help="requests allowed to wait (default 16)")
    parser.add_argument(
        "--allowed-host", action="append", default=[], metavar="NAME",
        help="another Host name to serve (repeatable; loopback names and --host are always served)",
    )
    parser.add_argument(
        "--cors-origin", action="append", default=[], metavar="URL",
        help="let pages of this origin (http://host:port) call the API from a browser (repeatable)",
    )
    limits = RequestLimits()
    parser.add_argument("--max-body-mb", type=float, default=DEFAULT_MAX_BODY_BYTES / 2**20,
                        help=f"largest request body in MiB (default {DEFAULT_MAX_BODY_BYTES // 2**20})")
    parser.add_argument("--max-prompt-tokens", type=int, default=limits.max_prompt_tokens,
                        help=f"longest prompt in CLIP tokens (default {limits.max_prompt_tokens})")
    parser.add_argument("--max-pixels", type=int, default=limits.max_image_pixels,
                        help=f"largest image, width x height (default {limits.max_image_pixels})")
    parser.add_argument("--max-work", type=int, default=limits.max_pixel_steps,
                        help=f"largest width x height x steps x images per request (default {limits.max_pixel_steps})")
    parser.add_argument("--max-waiting-per-client", type=int, default=4,
                        help="requests one client address may have waiting (default 4)")


def run_serve(args: argparse.Namespace) -> int:
    """Start the server (blocks until interrupted)."""
    import uvicorn

    from sd_app.arguments import scorer_specs
    from sd_app.checks import check_output_folder
    from sd_app.engine import Engine
    from sd_app.limits import RequestLimits
    from sd_app.ui_jobs import JobTracker

    credentials = parse_credentials(args.auth, args.auth_file)
    if not is_loopback(args.host) and not credentials and not args.insecure:
        raise ValueError(
            f"refusing to serve on {args.host} without auth: anyone on the network could use it. "
            "Add --auth user:password (or --auth-file FILE), or --insecure if you really mean it"
        )
    if not 1 <= args.port <= 65535:
        raise ValueError(f"--port must be between 1 and 65535, got {args.port}")
    if args.max_queue < 1:
        raise ValueError(f"--max-queue must be at least 1, got {args.max_queue}")
    if args.max_waiting_per_client < 1:
        raise ValueError(f"--max-waiting-per-client must be at least 1, got {args.max_waiting_per_client}")
    if not args.max_body_mb > 0:
        raise ValueError(f"--max-body-mb must be positive, got {args.max_body_mb}")
    limits = RequestLimits(
        max_prompt_tokens=args.max_prompt_tokens, max_image_pixels=args.max_pixels, max_pixel_steps=args.max_work
    )
    policy = AccessPolicy.build(args.host, args.allowed_host, args.cors_origin)
    check_output_folder(args.out, "--out")
    reranker = None if str(args.reranker).lower() == "none" else args.reranker
    if args.max_loaded < 1:
        raise ValueError(f"--max-loaded must be at least 1, got {args.max_loaded}")
    from pipelines.generation.request import GenerationRequest

    # A1111's names and ranges, or a clear error, as generate checks them
    vae_decoder = GenerationRequest(vae_decoder=args.vae_decoder, clip_skip=args.clip_skip).vae_decoder
    engine = Engine(
        model=args.model, vae=args.vae, reranker=reranker, output_dir=args.out, device=args.device, limits=limits,
        models_dirs=args.models_dir, max_loaded=args.max_loaded, clip_skip=args.clip_skip, scorers=scorer_specs(args),
        vae_decoder=vae_decoder,
    )
    engine.library()  # a missing --models-dir fails now, with its name
    engine.check_selection()  # so does a bad --model or --vae (loaded by the first request, in its thread)
    tracker = JobTracker(max_waiting=args.max_queue, max_waiting_per_client=args.max_waiting_per_client)
    app = create_app(
        engine, credentials=credentials or None, max_queue=args.max_queue, tracker=tracker, policy=policy,
        max_body_bytes=int(args.max_body_mb * 2**20),
        local_paths=is_loopback(args.host) and not args.allowed_host, flags=args,
    )
    from sd_app.lifetime import resume_gc

    resume_gc()  # paused by main while the UI and the API loaded
    shown = f"[{args.host}]" if ":" in args.host else args.host
    print(
        f"sd-app: serving on http://{shown}:{args.port} (UI at /, API at /sdapi/v1)"
        + (" with auth" if credentials else ""),
        file=sys.stderr,
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=5)
    return 0
