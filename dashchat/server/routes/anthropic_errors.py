"""Anthropic's error shape, `{"type": "error", "error": {"type", "message"}}`, for its routes.

The server raises OpenAI-shaped `APIError`s everywhere; on the Messages routes the app, the
middleware and the stream re-shape them here, keeping the HTTP status (Anthropic's statuses
are the same for everything we raise: 400, 401, 404, 408, 413, 429, 500, 503).
"""

from __future__ import annotations

from typing import Any

from dashchat.server.plumbing.errors import APIError
from dashchat.server.routes.ollama_errors import is_ollama_path, ollama_error_body

MESSAGES_PREFIX = "/v1/messages"

_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                404: "not_found_error", 408: "timeout_error", 413: "request_too_large", 429: "rate_limit_error",
                503: "overloaded_error", 529: "overloaded_error"}


def is_messages_path(path: str) -> bool:
    return path == MESSAGES_PREFIX or path.startswith(MESSAGES_PREFIX + "/")


def anthropic_error_body(err: APIError) -> dict[str, Any]:
    kind = _ERROR_TYPES.get(err.status, "api_error" if err.status >= 500 else "invalid_request_error")
    message = err.message
    if err.param and err.param not in message:
        message = f"{err.param}: {message}"
    return {"type": "error", "error": {"type": kind, "message": message}}


def error_body_for(path: str, err: APIError) -> dict[str, Any]:
    """The error body in the shape of the API the path belongs to (Ollama's, Anthropic's, else OpenAI's)."""
    if is_ollama_path(path):
        return ollama_error_body(err)
    return anthropic_error_body(err) if is_messages_path(path) else err.body()
