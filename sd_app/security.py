"""Who may talk to the server: its own Host names only, no cross-site writes, bounded request bodies.

DNS rebinding (a foreign page whose name resolves to 127.0.0.1) is stopped by serving only the Host
names the server answers to; cross-site requests (a foreign ``Origin``, e.g. a ``text/plain`` POST that
needs no preflight) are refused on every state-changing method; CORS headers reach only origins the
user named with ``--cors-origin``. The same rules hold with and without auth, because a browser sends a
site's stored credentials along with its cross-site requests. Pure ASGI, so streaming responses and
server-sent events pass through untouched.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]

LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
CORS_HEADERS = (b"access-control-allow-origin", b"access-control-allow-credentials")
DEFAULT_MAX_BODY_BYTES = 50 * 2**20  # room for a few base64 PNGs (img2img) and nothing like 20 MB prompts


def host_name(value: str) -> str:
    """The host of a ``Host`` header or URL authority, lower-case, without port or IPv6 brackets."""
    text = value.strip().lower()
    if text.startswith("["):
        return text[1 : text.find("]")] if "]" in text else text
    if text.count(":") == 1:
        text = text.split(":", 1)[0]
    return text.rstrip(".")


def normalise_origin(origin: str) -> str:
    """``scheme://host[:port]`` of an origin, lower-case; ValueError for anything else."""
    parts = urlsplit(origin.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.path not in ("", "/"):
        raise ValueError(f"--cors-origin must look like http://host[:port], got {origin!r}")
    return f"{parts.scheme}://{parts.netloc.lower()}"


@dataclass(frozen=True)
class AccessPolicy:
    """Host names the server answers to and origins allowed to make cross-site requests."""

    allowed_hosts: frozenset[str]
    cors_origins: frozenset[str] = field(default_factory=frozenset)

    @classmethod
    def build(cls, bind_host: str, extra_hosts: Iterable[str] = (), cors_origins: Iterable[str] = ()) -> AccessPolicy:
        hosts = {*LOOPBACK_NAMES, *(host_name(h) for h in extra_hosts)}
        if host_name(bind_host) not in ("0.0.0.0", "::", ""):  # a wildcard bind names no host
            hosts.add(host_name(bind_host))
        return cls(frozenset(hosts), frozenset(normalise_origin(o) for o in cors_origins))

    def host_allowed(self, host_header: str | None) -> bool:
        return host_header is not None and host_name(host_header) in self.allowed_hosts

    def same_site(self, origin: str, host_header: str) -> bool:
        """An origin naming one of our hosts, at the port the request came to."""
        parts = urlsplit(origin)
        request_host = host_header.strip().lower()
        return parts.hostname is not None and host_name(parts.netloc) in self.allowed_hosts and (
            parts.netloc.lower() == request_host
        )


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return value.decode("latin-1")
    return None


async def _reject(send: Send, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


class HostOriginGuard:
    """403 for a foreign ``Host``, 403 for state-changing requests from a foreign ``Origin``, and CORS
    headers only for the origins of ``--cors-origin``."""

    def __init__(self, app: App, policy: AccessPolicy) -> None:
        self.app = app
        self.policy = policy

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        host = _header(scope, b"host")
        if not self.policy.host_allowed(host):
            await self._refuse(scope, send, f"host {host!r} is not served here; add it with --allowed-host")
            return
        origin = _header(scope, b"origin")
        foreign = origin is not None and origin != "null" and not self.policy.same_site(origin, host or "")
        opted_in = origin is not None and origin.lower() in self.policy.cors_origins
        if origin == "null" or (foreign and not opted_in):
            if scope["type"] == "websocket" or scope.get("method", "GET") not in SAFE_METHODS:
                await self._refuse(scope, send, f"cross-site request from {origin!r} refused; see --cors-origin")
                return
        if scope["type"] == "http" and opted_in and scope.get("method") == "OPTIONS":
            await self._preflight(send, origin or "")
            return
        await self.app(scope, receive, self._cors_filter(send, origin if opted_in else None))

    async def _refuse(self, scope: Scope, send: Send, detail: str) -> None:
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
        else:
            await _reject(send, 403, detail)

    @staticmethod
    async def _preflight(send: Send, origin: str) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": 204,
                "headers": [
                    (b"access-control-allow-origin", origin.encode()),
                    (b"access-control-allow-credentials", b"true"),
                    (b"access-control-allow-methods", b"GET, POST, OPTIONS"),
                    (b"access-control-allow-headers", b"authorization, content-type"),
                    (b"vary", b"Origin"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": b""})

    @staticmethod
    def _cors_filter(send: Send, allowed_origin: str | None) -> Send:
        """Drop every CORS header the app set; add ours for an opted-in origin."""

        async def filtered(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() not in CORS_HEADERS]
                if allowed_origin is not None:
                    headers += [
                        (b"access-control-allow-origin", allowed_origin.encode()),
                        (b"access-control-allow-credentials", b"true"),
                        (b"vary", b"Origin"),
                    ]
                message = {**message, "headers": headers}
            await send(message)

        return filtered


class BodySizeLimit:
    """413 for request bodies over ``max_bytes``: by Content-Length, or, for a body sent without one (chunked),
    by reading it here first, so the app never sees a part of it."""

    def __init__(self, app: App, max_bytes: int = DEFAULT_MAX_BODY_BYTES) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        detail = f"request body larger than the server's limit of {self.max_bytes} bytes"
        length = _header(scope, b"content-length")
        if length is not None:  # the server (h11) never delivers more than it says
            if length.strip().isdigit() and int(length) > self.max_bytes:
                await _reject(send, 413, detail)
                return
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        received = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away before sending it all
                return
            chunks.append(message.get("body", b""))
            received += len(chunks[-1])
            if received > self.max_bytes:
                await _reject(send, 413, detail)
                return
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:  # the whole body once, then the connection's own messages (disconnect)
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        await self.app(scope, replay, send)


