"""Pure-ASGI middleware: request ids + access log + per-route metrics, body size limit, auth.

Pure ASGI (not BaseHTTPMiddleware) so streams pass through untouched and a client's
disconnect still reaches the route.
"""

from __future__ import annotations

import hmac
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from dashchat.server.routes.anthropic_errors import error_body_for
from dashchat.server.plumbing.errors import APIError
from dashchat.server.plumbing.metrics import Metrics
from dashchat.server.plumbing.sse import dumps
from dashchat.server.plumbing.tenant import enter_tenant, leave_tenant, tenant_of_key
from dashchat.server.plumbing.validation import check_json_body

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

access_log = logging.getLogger("dashchat.access")

_ROUTES = {"/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/version", "/metrics",
           "/openapi.json", "/docs", "/v1/responses", "/v1/messages", "/v1/messages/count_tokens",
           "/tokenize", "/detokenize", "/api/chat", "/api/generate", "/api/tags", "/api/show", "/api/ps",
           "/api/version", "/api/embed", "/api/embeddings"}
_CLIENT_ID = re.compile(r"^[\x21-\x7e]{1,128}$")  # printable, no spaces: safe to log and echo


def route_label(path: str) -> str:
    """Bounded label set: unknown paths must not grow the metrics without limit."""
    if path in _ROUTES:
        return path
    if path.startswith("/v1/models/"):
        return "/v1/models/{id}"
    if path.startswith("/v1/responses/"):
        return "/v1/responses/{id}"
    return "other"


async def send_error(send: Send, err: APIError, extra: list[tuple[bytes, bytes]] | None = None,
                     path: str = "") -> None:
    headers = [(b"content-type", b"application/json")]
    headers += [(k.lower().encode(), v.encode()) for k, v in err.headers.items()]
    await send({"type": "http.response.start", "status": err.status, "headers": headers + (extra or [])})
    await send({"type": "http.response.body", "body": dumps(error_body_for(path, err))})


class RequestContextMiddleware:
    """X-Request-Id (the client's, if sane, else a new one) on every response; one access-log
    line per request; request counts by route and status."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        rid = ""
        for k, v in scope["headers"]:
            if k == b"x-request-id":
                rid = v.decode("latin-1")
                break
        if not _CLIENT_ID.match(rid):
            rid = uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid
        status = 0
        start = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = list(message.get("headers", [])) + [(b"x-request-id", rid.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
            status = status or 499  # nothing sent: the client left first (nginx's "client closed request")
        except BaseException:
            status = status or 500
            raise
        finally:
            path = scope["path"]
            self.metrics.requests.labels(route_label(path), str(status)).inc()
            client = scope.get("client")
            access_log.info('%s "%s %s" %d %.1fms id=%s', f"{client[0]}:{client[1]}" if client else "-",
                            scope["method"], path, status, (time.perf_counter() - start) * 1000, rid)


class BodyLimitMiddleware:
    """413 for bodies over the limit, checked before anything parses them. Holding the whole body,
    it is also where every route's JSON is checked for values nothing behind it can hold
    (validation.check_json_values: 400 naming the field), so no route can forget it."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        for k, v in scope["headers"]:
            if k == b"content-length" and v.isdigit() and int(v) > self.max_bytes:
                return await send_error(send, self._too_large(), path=scope["path"])
        # Buffer the body (it is parsed whole anyway) so a chunked upload is bounded too.
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # client left before finishing the body
            body = message.get("body", b"")
            size += len(body)
            if size > self.max_bytes:
                return await send_error(send, self._too_large(), path=scope["path"])
            chunks.append(body)
            if not message.get("more_body", False):
                break
        content_type = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"content-type"), None)
        if (err := check_json_body(b"".join(chunks), content_type)) is not None:
            return await send_error(send, err, path=scope["path"])
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()  # afterwards: the disconnect, for the routes that watch it

        await self.app(scope, replay, send)

    def _too_large(self) -> APIError:
        return APIError(413, f"Request body is larger than {self.max_bytes} bytes.",
                        "invalid_request_error", None, "request_too_large")


# What answers without a key: the chat page and its assets (a client of the API that asks for the
# key itself), liveness, version and metrics. Every other path needs one, including paths no route
# serves yet, so a route added later is guarded from its first line (and an unknown path tells a
# caller without a key nothing: 401, not 404).
PUBLIC_PATHS = frozenset({"/", "/health", "/version", "/metrics", "/favicon.ico"})
PUBLIC_PREFIXES = ("/ui/",)
DOCS_PATHS = frozenset({"/docs", "/docs/oauth2-redirect", "/openapi.json"})  # public with --enable-docs


def needs_key(path: str, public_docs: bool = False) -> bool:
    if path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES):
        return False
    return not (public_docs and path in DOCS_PATHS)


class AuthMiddleware:
    """API keys on every path but the public ones, as `Authorization: Bearer KEY` (OpenAI) or
    `x-api-key: KEY` (Anthropic); constant-time compare against every key (no early exit). The key
    that matched names the request's tenant (tenant.py)."""

    def __init__(self, app: ASGIApp, keys: list[str], public_docs: bool = False) -> None:
        self.app = app
        self.keys = [k.encode() for k in keys]
        self.tenants = [tenant_of_key(k) for k in self.keys]
        self.public_docs = public_docs

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (scope["type"] != "http" or not needs_key(scope["path"], self.public_docs)
                or scope["method"] == "OPTIONS"):
            return await self.app(scope, receive, send)
        bearer = api_key = b""
        for k, v in scope["headers"]:
            if k == b"authorization" and not bearer:
                scheme, _, rest = v.partition(b" ")
                if scheme.lower() == b"bearer":
                    bearer = rest.strip()
            elif k == b"x-api-key" and not api_key:
                api_key = v.strip()
        tenant = None
        for key, name in zip(self.keys, self.tenants):
            # Either header may carry the key; both are compared, so the time does not tell which.
            if hmac.compare_digest(bearer, key) | hmac.compare_digest(api_key, key):
                tenant = name
        if tenant is not None:
            token = enter_tenant(tenant)
            try:
                return await self.app(scope, receive, send)
            finally:
                leave_tenant(token)
        msg = ("You didn't provide an API key. Pass it as 'Authorization: Bearer YOUR_KEY' or 'x-api-key: YOUR_KEY'."
               if not (bearer or api_key) else "Incorrect API key provided.")
        await send_error(send, APIError(401, msg, "authentication_error", None, "invalid_api_key"),
                         [(b"www-authenticate", b"Bearer")], path=scope["path"])
