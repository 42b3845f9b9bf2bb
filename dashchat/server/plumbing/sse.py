"""JSON and server-sent-event encoding (orjson when present: it is the per-chunk cost)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

try:
    import orjson

    dumps: Callable[[Any], bytes] = orjson.dumps
except ImportError:  # pragma: no cover - orjson is a server dependency

    def dumps(obj: Any) -> bytes:
        return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()


DONE = b"data: [DONE]\n\n"

SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),  # nginx: do not buffer the stream
]
JSON_HEADERS = [(b"content-type", b"application/json")]


def event(obj: Any) -> bytes:
    return b"data: " + dumps(obj) + b"\n\n"
