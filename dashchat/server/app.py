"""The FastAPI application: routes, error handlers, middleware."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import Response

from dashchat import __version__
from dashchat.engine.types import Engine
from dashchat.server.routes.anthropic_errors import error_body_for
from dashchat.server.config import ServerConfig
from dashchat.server.model_pool import ModelPool, ReleaseLeases, model_status
from dashchat.server.plumbing.errors import APIError, internal_error
from dashchat.server.plumbing.metrics import CONTENT_TYPE
from dashchat.server.plumbing.middleware import (
    AuthMiddleware,
    BodyLimitMiddleware,
    RequestContextMiddleware,
)
from dashchat.server.protocol import ChatCompletionRequest, CompletionRequest
from dashchat.server.routes.chat import create_chat_completion
from dashchat.server.routes.completions import create_completion
from dashchat.server.routes.embeddings import add_embedding_routes
from dashchat.server.routes.rerank import add_rerank_routes
from dashchat.server.routes.messages import add_messages_routes
from dashchat.server.routes.ollama import add_ollama_routes
from dashchat.server.routes.tokenize import add_tokenize_routes
from dashchat.server.routes.responses import add_responses_routes
from dashchat.server.plumbing.sse import dumps
from dashchat.server.state import ServerState
from dashchat.server.plumbing.validation import from_validation_errors
from dashchat.server.web import mount_web_ui

log = logging.getLogger("dashchat.server")


class JSON(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return dumps(content)


def _error(err: APIError, path: str = "") -> JSON:
    # Anthropic's routes answer in Anthropic's error shape, everything else in OpenAI's.
    return JSON(error_body_for(path, err), status_code=err.status, headers=err.headers)


def model_architecture(engine: Engine) -> str | None:
    """The Hugging Face architecture the model runs as (e.g. Qwen2ForCausalLM): which family's code
    serves it. From the native engine's config, else from the model folder's config.json."""
    config = getattr(engine, "model_config", None)
    if config is not None:
        return config.architecture
    model_dir = getattr(getattr(engine, "args", None), "model_dir", None)
    try:
        return json.loads((Path(model_dir) / "config.json").read_text())["architectures"][0]
    except (TypeError, OSError, ValueError, KeyError, IndexError):
        return None


def build_app(models: Engine | ModelPool, cfg: ServerConfig) -> FastAPI:
    """`models`: the pool of models to serve, or one engine (served for the app's whole life)."""
    if any(not k.strip() for k in cfg.api_keys):
        raise ValueError("API keys must be non-empty strings (an empty key would match an empty header)")
    state = ServerState(models, cfg)
    pool = state.pool

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        pool.shutdown()

    # The OpenAPI description is always there (clients and fuzzers read it); Swagger UI loads its
    # scripts from a CDN, so /docs only on request (--enable-docs), never ReDoc.
    app = FastAPI(title="dashchat", version=__version__, lifespan=lifespan, default_response_class=JSON,
                  docs_url="/docs" if cfg.enable_docs else None, openapi_url="/openapi.json", redoc_url=None)
    app.state.server = state

    # -- errors: always {"error": {...}} ----------------------------------------
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> Response:
        return _error(exc, request.url.path)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> Response:
        return _error(from_validation_errors(exc.errors()), request.url.path)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        msg = f"{request.method} {request.url.path}: {exc.detail}"
        return _error(APIError(exc.status_code, msg, kind, None, None, dict(exc.headers or {})), request.url.path)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        log.error("unhandled error on %s", request.url.path, exc_info=exc)
        return _error(internal_error(), request.url.path)

    # -- routes ---------------------------------------------------------------------
    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(body: ChatCompletionRequest) -> Response:
        return await create_chat_completion(state, body)

    @app.post("/v1/completions", response_model=None)
    async def completions(body: CompletionRequest) -> Response:
        return await create_completion(state, body)

    add_responses_routes(app, state)
    add_messages_routes(app, state)
    add_tokenize_routes(app, state)
    add_ollama_routes(app, state)
    add_embedding_routes(app, state)
    add_rerank_routes(app, state)

    def model_card(name: str) -> dict[str, Any]:
        entry = pool.entry(name)
        engine = entry.served.engine if entry.served is not None else None
        return {"id": name, "object": "model", "created": state.created, "owned_by": "dashchat",
                "max_model_len": entry.served.max_model_len if engine is not None else entry.spec.max_model_len,
                "architecture": model_architecture(engine) if engine is not None else entry.spec.architecture,
                "status": model_status(entry)}

    @app.get("/v1/models")
    async def list_models() -> Response:
        return JSON({"object": "list", "data": [model_card(n) for n in pool.names]})

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str) -> Response:
        return JSON(model_card(model_id))  # an unknown id: 404 model_not_found

    @app.get("/health")
    async def health() -> Response:
        # 200 while the server serves; the body says which models are loaded. An engine that died
        # (or lost a tensor-parallel rank) cannot serve again: 503, and the server exits.
        if state.draining:
            return JSON({"status": "shutting_down"}, status_code=503)
        if not state.engine_healthy():
            return JSON({"status": "engine_failed"}, status_code=503)
        return JSON({"status": "ok", "models": {e.name: model_status(e)["value"] for e in pool.entries}})

    @app.get("/version")
    async def version() -> Response:
        loaded = [e.served.engine for e in pool.loaded()]
        engine = loaded[0] if loaded else None
        return JSON({"version": __version__, "engine": getattr(engine, "name", cfg.engine_name),
                     "models": pool.names,
                     "architecture": model_architecture(engine) if engine is not None else None,
                     "tensor_parallel_size": getattr(engine, "tensor_parallel_size", 1)})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)

    if cfg.web_ui:
        mount_web_ui(app)

    # -- middleware (last added = outermost) -------------------------------------------
    app.add_middleware(ReleaseLeases)  # innermost: a request's model leases end with its response
    app.add_middleware(BodyLimitMiddleware, max_bytes=cfg.max_request_bytes)
    if cfg.api_keys:
        app.add_middleware(AuthMiddleware, keys=cfg.api_keys, public_docs=cfg.enable_docs)
    if cfg.allowed_origins:
        app.add_middleware(CORSMiddleware, allow_origins=cfg.allowed_origins, allow_methods=["*"],
                           allow_headers=["*"], expose_headers=["X-Request-Id"])
    app.add_middleware(RequestContextMiddleware, metrics=state.metrics)
    return app


def server_state(app: FastAPI) -> ServerState:
    return app.state.server  # type: ignore[no-any-return]

