"""Ollama's error shape, `{"error": "message"}`, for its routes under /api/.

As on the Anthropic routes, the server raises OpenAI-shaped `APIError`s everywhere and the app,
the middleware and the stream re-shape them here, keeping the HTTP status (Ollama answers 400 for
bad input, 404 for a model it does not have, 401/413/429/503 as we do).
"""

from __future__ import annotations

from typing import Any

from dashchat.server.plumbing.errors import APIError

OLLAMA_PREFIX = "/api/"


def is_ollama_path(path: str) -> bool:
    return path.startswith(OLLAMA_PREFIX)


def ollama_error_body(err: APIError) -> dict[str, Any]:
    return {"error": err.message}


def ollama_model_not_found(name: str) -> APIError:
    # Ollama's own words: clients show them, and some match "not found" to offer a pull.
    return APIError(404, f'model "{name}" not found, try pulling it first', "not_found_error", "model",
                    "model_not_found")
