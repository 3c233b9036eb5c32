"""Pure-ASGI middlewares (safe for streaming): API-key auth, X-Request-Id, body-size limit,
and per-endpoint request counting."""

from __future__ import annotations

import hmac
import json
import uuid
from typing import Any

from .errors import error_body
from .metrics import ServerMetrics

Scope = dict[str, Any]

OPEN_PATHS = frozenset({"/health", "/metrics", "/ping"})


async def _send_json(send: Any, status: int, body: dict[str, Any],
                     headers: list[tuple[bytes, bytes]] | None = None) -> None:
    payload = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(payload)).encode())] + (headers or [])})
    await send({"type": "http.response.body", "body": payload})


def _header(scope: Scope, name: bytes) -> bytes | None:
    for k, v in scope.get("headers", ()):
        if k.lower() == name:
            return v
    return None


def _route_path(scope: Scope) -> str:
    path = scope.get("path", "")
    root = scope.get("root_path", "")
    return path[len(root):] if root and path.startswith(root) else path


class APIKeyMiddleware:
    """`Authorization: Bearer <key>` on every route except health and metrics."""

    def __init__(self, app: Any, api_key: str) -> None:
        self.app = app
        self._key = api_key.encode()

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("method") == "OPTIONS" or \
                _route_path(scope) in OPEN_PATHS:
            return await self.app(scope, receive, send)
        auth = _header(scope, b"authorization") or b""
        scheme, _, token = auth.partition(b" ")
        if scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self._key):
            return await self.app(scope, receive, send)
        await _send_json(send, 401, error_body("invalid or missing API key", "authentication_error",
                                               None, "invalid_api_key"),
                         [(b"www-authenticate", b"Bearer")])


class RequestIdMiddleware:
    """Echo the client's X-Request-Id (or a fresh one) on the response; handlers read it
    from scope["state"]["request_id"] to name engine requests."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = _header(scope, b"x-request-id")
        rid = given.decode("latin-1")[:128] if given else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid

        async def send_with_id(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers.append((b"x-request-id", rid.encode("latin-1")))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_id)


class BodyLimitMiddleware:
    """413 for bodies over the limit: early from Content-Length, else while reading."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = _header(scope, b"content-length")
        too_big = error_body(f"request body exceeds the limit of {self.max_bytes} bytes",
                             "invalid_request_error", None, "request_too_large")
        if length is not None:
            try:
                n = int(length)
            except ValueError:
                return await _send_json(send, 400, error_body("bad Content-Length header",
                                                              "invalid_request_error"))
            if n > self.max_bytes:
                return await _send_json(send, 413, too_big)
            return await self.app(scope, receive, send)
        # No Content-Length (chunked): read up to the limit before the app sees anything.
        chunks, seen, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return  # client went away while sending
            chunks.append(message.get("body", b""))
            seen += len(chunks[-1])
            if seen > self.max_bytes:
                return await _send_json(send, 413, too_big)
            more = message.get("more_body", False)
        replayed = False

        async def replay_receive() -> dict[str, Any]:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay_receive, send)


class MetricsMiddleware:
    """Count responses by endpoint and status for /metrics."""

    def __init__(self, app: Any, metrics: ServerMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = _route_path(scope)
        endpoint = path if path in _KNOWN_ENDPOINTS else "other"

        async def counting_send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                self.metrics.record_http(endpoint, message["status"])
            await send(message)

        await self.app(scope, receive, counting_send)


_KNOWN_ENDPOINTS = frozenset({
    "/health", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions", "/generate",
    "/model_info", "/server_info", "/flush_cache", "/abort_request", "/tokenize", "/detokenize",
})
