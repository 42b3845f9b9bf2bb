"""Other APIs (Responses, Anthropic Messages) served by the one Chat Completions run.

A route translates its request into a `ChatCompletionRequest` and lets routes/chat.py do
everything: render, tool plan, grammars, engine, detokenizer, stop strings, abort on disconnect,
timeouts, limits, metrics. `ChatBridge` runs that chat response and hands what it would have
sent (the chat.completion body, or each chat.completion.chunk, or an error) to a `ChatSink`,
which re-shapes it into its own API's wire format. No second copy of the streaming logic.

The chat run writes bytes to an ASGI `send`; the bridge decodes them back into the dicts the run
built (one chunk per ASGI message, as generation.Sender writes them). A sink-level hook in
generation.py would save that parse (NOTES-requests.md); the wire format is the contract either way.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from pydantic import ValidationError
from starlette.responses import Response

from dashchat.server.plumbing.errors import APIError
from dashchat.server.protocol import ChatCompletionRequest
from dashchat.server.plumbing.sse import SSE_HEADERS, dumps

try:
    import orjson

    loads: Callable[[bytes], Any] = orjson.loads
except ImportError:  # pragma: no cover - orjson is a server dependency
    import json

    loads = json.loads

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


def to_chat_request(body: dict[str, Any], rename: Callable[[APIError], APIError]) -> ChatCompletionRequest:
    """The translated request, checked by the chat model; what it rejects is the client's 400, named
    (by `rename`) in the client's API where the field maps one to one."""
    from dashchat.server.plumbing.validation import from_validation_errors

    try:
        return ChatCompletionRequest.model_validate(body)
    except ValidationError as exc:
        err = from_validation_errors(exc.errors())
        if err.param:
            err.param = err.param.replace(".function.", ".")  # tools[0].function.name -> tools[0].name
        raise rename(err) from None


def arguments_object(arguments: str) -> dict[str, Any]:
    """A chat tool call's arguments (a JSON string) as the object Anthropic's `input` and Ollama's
    `arguments` are ({} when the model wrote none, or no object)."""
    try:
        value = loads(arguments) if arguments else {}
    except ValueError:  # orjson's and json's decode errors are both ValueErrors
        return {}
    return value if isinstance(value, dict) else {}


def named_event(name: str, obj: Any) -> bytes:
    """An SSE event with an `event:` line (Anthropic's SDK skips events without one)."""
    return b"event: " + name.encode() + b"\ndata: " + dumps(obj) + b"\n\n"


class ChatSink:
    """Receives one chat run's output and writes another API's response to `send`.

    Subclasses implement `on_body` (non-streaming), `on_start` / `on_chunk` / `on_end` (streaming)
    and `error_body`; the plumbing (headers, SSE framing) is here.
    """

    def __init__(self) -> None:
        self._send: Send | None = None
        self.started = False
        self.ended = False

    # -- what subclasses implement -------------------------------------------------------
    def error_body(self, err: APIError) -> Any:
        return err.body()

    async def on_body(self, body: dict[str, Any]) -> None:
        raise NotImplementedError

    async def on_start(self) -> None:
        raise NotImplementedError

    async def on_chunk(self, chunk: dict[str, Any]) -> None:
        raise NotImplementedError

    async def on_stream_error(self, err: APIError) -> None:
        raise NotImplementedError

    async def on_end(self) -> None:
        raise NotImplementedError

    # -- plumbing --------------------------------------------------------------------
    async def send_json(self, status: int, body: Any, headers: list[tuple[bytes, bytes]] | None = None) -> None:
        assert self._send is not None
        self.started = True
        hdrs = [(b"content-type", b"application/json"), *(headers or [])]
        await self._send({"type": "http.response.start", "status": status, "headers": hdrs})
        self.ended = True
        await self._send({"type": "http.response.body", "body": dumps(body)})

    async def send_error(self, err: APIError, headers: list[tuple[bytes, bytes]] | None = None) -> None:
        await self.send_json(err.status, self.error_body(err), headers)

    async def start_stream(self) -> None:
        assert self._send is not None
        self.started = True
        await self._send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})

    async def emit(self, data: bytes) -> None:
        assert self._send is not None
        await self._send({"type": "http.response.body", "body": data, "more_body": True})

    async def end_stream(self) -> None:
        assert self._send is not None
        self.ended = True
        await self._send({"type": "http.response.body", "body": b""})


# A mid-stream error has no HTTP status of its own: recover the one it would have had (errors.py).
_STATUS_BY_CODE = {"server_shutting_down": 503, "engine_error": 503, "engine_failed": 503, "request_timeout": 408}
_STATUS_BY_TYPE = {"invalid_request_error": 400, "authentication_error": 401, "not_found_error": 404,
                   "timeout_error": 408, "rate_limit_error": 429}


def stream_error_status(err: dict[str, Any]) -> int:
    return _STATUS_BY_CODE.get(str(err.get("code")), _STATUS_BY_TYPE.get(str(err.get("type")), 500))


def api_error_from(status: int | None, body: Any, headers: list[tuple[bytes, bytes]] | None = None) -> APIError:
    """An OpenAI-shaped error body (what the chat run sends) back into an APIError; `status` None:
    a mid-stream error, whose status follows from its code and type."""
    err = body.get("error") if isinstance(body, dict) else None
    if not isinstance(err, dict):
        err = {"message": "The server had an error while processing your request.", "type": "server_error"}
    hdrs = {k.decode("latin-1"): v.decode("latin-1") for k, v in headers or [] if k == b"retry-after"}
    if status is None:
        status = stream_error_status(err)
    return APIError(status, str(err.get("message", "")), str(err.get("type", "server_error")),
                    err.get("param"), err.get("code"), hdrs)


class ChatBridge(Response):
    """Runs the chat response `inner` and feeds what it sends to `sink`."""

    def __init__(self, inner: Response, sink: ChatSink) -> None:
        super().__init__()
        self.inner = inner
        self.sink = sink

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        sink = self.sink
        sink._send = send
        status = 200
        streaming = False
        headers: list[tuple[bytes, bytes]] = []
        body: list[bytes] = []

        async def capture(message: dict[str, Any]) -> None:
            nonlocal status, streaming, headers
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = [(k, v) for k, v in message.get("headers", []) if k != b"content-type"]
                content_type = dict(message.get("headers", [])).get(b"content-type", b"")
                streaming = content_type.startswith(b"text/event-stream")
                if streaming:
                    await sink.start_stream()
                    await sink.on_start()
                return
            if message["type"] != "http.response.body":
                return
            data = message.get("body", b"")
            more = message.get("more_body", False)
            if streaming:
                for part in data.split(b"\n\n"):
                    if not part.startswith(b"data: "):
                        continue
                    payload = part[6:]
                    if payload == b"[DONE]":
                        continue
                    obj = loads(payload)
                    if "error" in obj:
                        await sink.on_stream_error(api_error_from(None, obj))
                    else:
                        await sink.on_chunk(obj)
                if not more and not sink.ended:
                    await sink.on_end()
                    await sink.end_stream()
                return
            body.append(data)
            if not more:
                parsed = loads(b"".join(body))
                if status != 200:
                    await sink.send_error(api_error_from(status, parsed, headers), headers)
                else:
                    await sink.on_body(parsed)

        await self.inner(scope, receive, capture)
