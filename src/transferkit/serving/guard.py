"""The outer ASGI layer of ``transferkit serve``: every request passes here before any route sees it.

It bounds the body (``Content-Length`` and the bytes actually received: a larger body is read and discarded up
to a drain limit, so that the client reads a clean 413 instead of a reset connection, and beyond it the
connection is closed), checks the optional bearer token (constant-time comparison; the health probes stay open
for orchestrators), and records each request's count and latency for ``/metrics`` under its route template.
"""

from __future__ import annotations

import hmac
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

logger = logging.getLogger(__name__)

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

#: paths open without a token: Kubernetes-style liveness / readiness probes
OPEN_PATHS = frozenset({"/v2/health/live", "/v2/health/ready"})


async def send_error(send: Send, status: int, message: str, headers: list[tuple[bytes, bytes]] | None = None,
                     close: bool = False) -> None:
    """A one-line JSON error ``{"error": message}``."""
    body = json.dumps({"error": message}).encode()
    extra = [(b"connection", b"close")] if close else []
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *(headers or []), *extra]})
    await send({"type": "http.response.body", "body": body})


class RequestGuard:
    """Body limit + bearer token + per-route request metrics around an ASGI ``app``.

    ``observe(route, method, status, seconds)`` is called once per HTTP request."""

    def __init__(self, app: Callable, *, max_body: int, token: str | None,
                 observe: Callable[[str, str, int, float], None], drain_limit: int | None = None) -> None:
        self.app = app
        self.max_body = max_body
        self.token = token.encode() if token else None
        self.observe = observe
        self.drain_limit = drain_limit if drain_limit is not None else max(4 * max_body, 64 * 2**20)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = {"code": 500}

        async def tracked_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = int(message["status"])
            await send(message)

        try:
            await self._handle(scope, receive, tracked_send)
        except Exception:  # a route failed after (or while) answering: never let it reach the server loop
            logger.exception("request %s %s failed", scope.get("method"), scope.get("path"))
        finally:
            self.observe(self._template(scope), scope.get("method", ""), status["code"],
                         time.perf_counter() - started)

    def _template(self, scope: Scope) -> str:
        """The route template (``/v2/models/{name}/infer``) of a request, also when the guard answered it."""
        route = scope.get("route")
        if route is None:
            from starlette.routing import Match

            route = next((r for r in getattr(self.app, "routes", []) if r.matches(scope)[0] != Match.NONE), None)
        return getattr(route, "path", None) or "unmatched"

    async def _handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = {k.decode("latin-1").lower(): v for k, v in scope.get("headers", [])}
        declared = headers.get("content-length")
        try:
            length = int(declared) if declared is not None else None
        except ValueError:
            await send_error(send, 400, "invalid Content-Length header", close=True)
            return
        if length is not None and length > self.drain_limit:
            await send_error(send, 413, f"request body of {length:,} bytes exceeds the limit of "
                                        f"{self.max_body:,} bytes", close=True)
            return
        body, received, complete = await self._read_body(receive)
        if body is None:
            if complete is None:
                return  # the client went away
            await send_error(send, 413, f"request body of {received:,}+ bytes exceeds the limit of "
                                        f"{self.max_body:,} bytes", close=not complete)
            return
        if self.token is not None and scope.get("path") not in OPEN_PATHS and not self._authorised(headers):
            await send_error(send, 401, "missing or wrong bearer token",
                             headers=[(b"www-authenticate", b'Bearer realm="transferkit"')])
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _read_body(self, receive: Receive) -> tuple[bytes | None, int, bool | None]:
        """``(body, bytes received, complete)``; body None when it exceeded ``max_body`` (the rest is drained up to
        ``drain_limit``); complete None when the client disconnected."""
        chunks: list[bytes] = []
        received = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None, received, None
            piece = message.get("body", b"")
            received += len(piece)
            if received <= self.max_body:
                chunks.append(piece)
            else:
                chunks = []
            if not message.get("more_body", False):
                return (b"".join(chunks) if received <= self.max_body else None), received, True
            if received > self.drain_limit:
                return None, received, False

    def _authorised(self, headers: dict[str, bytes]) -> bool:
        assert self.token is not None
        value = headers.get("authorization", b"")
        scheme, _, credentials = value.partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(credentials.strip(), self.token)
