"""OpenAI-shaped errors: `{"error": {"message", "type", "param", "code"}}`.

Every failure a client can see goes through `APIError`, so the shape never varies
(FastAPI's own 422 / `{"detail": ...}` bodies are replaced in `app.py`).
"""

from __future__ import annotations

import logging
from typing import Any

from dashchat.engine.types import (
    EngineDead,
    EngineError,
    EngineOverloaded,
    PromptTooLong,
    UnsupportedFeature,
)

log = logging.getLogger("dashchat.server")


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | int | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, "invalid_request_error", param, code)


def model_not_found(model: str) -> APIError:
    return APIError(
        404,
        f"The model '{model}' does not exist or you do not have access to it.",
        "not_found_error",
        "model",
        "model_not_found",
    )


def context_length_exceeded(max_len: int, prompt: int, completion: int | None, param: str) -> APIError:
    if completion is None:
        msg = (
            f"This model's maximum context length is {max_len} tokens. However, your "
            f"prompt is {prompt} tokens, which leaves no room for a completion. "
            "Please reduce the length of the prompt."
        )
    else:
        msg = (
            f"This model's maximum context length is {max_len} tokens. However, you requested "
            f"{prompt + completion} tokens ({prompt} in the prompt, {completion} in the "
            "completion). Please reduce the length of the prompt or completion."
        )
    return APIError(400, msg, "invalid_request_error", param, "context_length_exceeded")


def overloaded(retry_after: int = 1) -> APIError:
    return APIError(
        429,
        "The server is at capacity; please retry shortly.",
        "rate_limit_error",
        None,
        "rate_limit_exceeded",
        headers={"Retry-After": str(retry_after)},
    )


def shutting_down() -> APIError:
    return APIError(503, "The server is shutting down.", "server_error", None, "server_shutting_down")


def request_timeout(seconds: float) -> APIError:
    return APIError(
        408, f"The request did not finish within {seconds:g} s.", "timeout_error", None, "request_timeout"
    )


def internal_error() -> APIError:
    # Never echo exception text: it may carry paths or prompt fragments.
    return APIError(500, "The server had an error while processing your request.", "server_error")


def engine_failed() -> APIError:
    return APIError(503, "The inference engine has stopped after an internal error; retry once the "
                    "server has been restarted.", "server_error", None, "engine_failed")


def from_engine_error(exc: BaseException, request_id: str = "-") -> APIError:
    """Map the engine's errors (types.py) to HTTP; anything else is a plain 500.

    Bodies say what happened in words a client can act on; an engine's own message (which may
    carry raw torch or DashInfer text) goes to the log with the request id, never to the client.
    Messages the server writes for clients (APIError) and the admission refusals pass through."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, EngineOverloaded):
        return overloaded()
    if isinstance(exc, PromptTooLong):
        return APIError(400, str(exc) or "The prompt is too long.", "invalid_request_error",
                        "messages", "context_length_exceeded")
    if isinstance(exc, UnsupportedFeature):
        return bad_request(str(exc) or "This request is not supported by the engine.")
    if isinstance(exc, EngineDead):
        log.error("request %s failed: the engine is dead (%s)", request_id, exc)
        return engine_failed()
    if isinstance(exc, EngineError):
        log.error("request %s failed in the engine: %s", request_id, exc)
        return APIError(503, "The engine could not complete this request; retry it.", "server_error",
                        None, "engine_error")
    log.error("request %s failed", request_id, exc_info=exc)
    return internal_error()
