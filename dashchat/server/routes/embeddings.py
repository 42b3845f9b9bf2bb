"""POST /v1/embeddings (OpenAI's shape), and Ollama's /api/embed and /api/embeddings.

Every input is one pooling request to the engine (engine/types.py `PoolingParams`): prefill only,
batched with generation in the same steps, with the prefix cache. The engine returns the pooled
final hidden state; the model's own post-processing (Matryoshka truncation, then the
normalisation its sentence-transformers `2_Normalize` module asks for) happens here.
"""

from __future__ import annotations

import asyncio
import base64
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, Literal

import torch
from pydantic import Field

from dashchat.engine.types import PoolingOutput, PoolingParams
from dashchat.models.pooling import EmbeddingSpec
from dashchat.server.generation.runner import EngineResponse, Sender
from dashchat.server.plumbing.errors import APIError, bad_request, from_engine_error
from dashchat.server.plumbing.tenant import cache_salt
from dashchat.server.protocol import _Model
from dashchat.server.routes.anthropic_errors import error_body_for
from dashchat.server.state import ModelView, ServedModel, ServerState

MAX_INPUTS = 2048  # OpenAI's bound on inputs per embeddings request
_IN_FLIGHT = 64  # a request's inputs the engine holds at once (its admission queue is bounded)

TASK_WORDS = {"generate": "text generation", "embed": "embeddings", "score": "scoring and reranking"}


class EmbeddingRequest(_Model):
    model: str | None = None
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1)
    user: str | None = None
    cache_salt: str | None = None


def require_task(state: ServerState | ModelView, name: str, task: str, served: ServedModel) -> ServedModel:
    """The served model `name` (`served`, from `state.use_model`), or a 400 naming it where it is served
    for another task."""
    have = getattr(served, "task", "generate")
    if have != task and not (task == "score" and have == "embed"):  # embedding models score by cosine
        raise bad_request(
            f"The model '{name}' is served for {TASK_WORDS.get(have, have)}; it does not serve "
            f"{TASK_WORDS[task]} (start the server with --task {task} to serve it so).", "model",
            "model_not_supported")
    return served


async def pool_all(served: ServedModel, prompts: list[list[int]], params: PoolingParams,
                   request_id: str) -> list[PoolingOutput]:
    """One pooling request per prompt, at most _IN_FLIGHT at once; the first failure ends them all."""
    pool = getattr(served.engine, "pool", None)
    if pool is None:
        raise bad_request("This server's engine does not serve embeddings or scores; use the native engine.")
    gate = asyncio.Semaphore(_IN_FLIGHT)

    async def one(i: int, ids: list[int]) -> PoolingOutput:
        async with gate:
            return await pool(ids, params, f"{request_id}-{i}")  # type: ignore[no-any-return]

    tasks = [asyncio.ensure_future(one(i, ids)) for i, ids in enumerate(prompts)]
    try:
        return await asyncio.gather(*tasks)
    finally:
        for t in tasks:  # on failure or cancellation: the rest are aborted (pool() frees their KV)
            t.cancel()


def check_prompt_ids(served: ServedModel, ids: list[int], param: str) -> None:
    """The checks the engine would make, as a 400 naming the input."""
    if not ids:
        raise bad_request(f"'{param}' is empty.", param)
    if len(ids) > served.max_model_len:
        raise APIError(400, f"This model's maximum context length is {served.max_model_len} tokens. However, "
                       f"'{param}' has {len(ids)} tokens. Please shorten it.", "invalid_request_error", param,
                       "context_length_exceeded")
    if min(ids) < 0 or max(ids) >= served.vocab_size:
        raise bad_request(f"'{param}' holds token ids outside [0, {served.vocab_size}).", param)


def embedding_spec(served: ServedModel) -> EmbeddingSpec:
    return getattr(served, "pooling", None) or EmbeddingSpec()


def hidden_size(served: ServedModel) -> int:
    config = getattr(served.engine, "model_config", None)
    return config.hidden_size if config is not None else 1 << 30


def check_dimensions(spec: EmbeddingSpec, dimensions: int | None, hidden: int, param: str = "dimensions") -> None:
    if dimensions is None:
        return
    if spec.matryoshka is None:
        raise bad_request("This model does not support 'dimensions': its config declares no Matryoshka "
                          "representation (is_matryoshka / matryoshka_dimensions).", param)
    allowed = spec.matryoshka or range(1, hidden + 1)
    if dimensions not in allowed:
        listed = ", ".join(map(str, spec.matryoshka)) if spec.matryoshka else f"1 to {hidden}"
        raise bad_request(f"'dimensions' must be one of {listed}; got {dimensions}.", param)


def finish_vector(vec: torch.Tensor, spec: EmbeddingSpec, dimensions: int | None) -> torch.Tensor:
    """Matryoshka truncation, then the model's normalisation (so a cut vector is unit length again)."""
    if dimensions is not None:
        vec = vec[:dimensions]
    if spec.normalize:
        vec = torch.nn.functional.normalize(vec, dim=0)
    return vec


async def embed(served: ServedModel, prompts: list[list[int]], dimensions: int | None,
                request_id: str, salt: str | None = None) -> tuple[list[torch.Tensor], int]:
    """The finished vectors of the prompts, and their prompt tokens."""
    spec = embedding_spec(served)
    params = PoolingParams(spec.pooling, cache_salt=cache_salt(salt))
    outputs = await pool_all(served, prompts, params, request_id)
    return [finish_vector(o.hidden, spec, dimensions) for o in outputs], sum(len(p) for p in prompts)


def _prompts(served: ServedModel, value: Any) -> list[list[int]]:
    """OpenAI's `input`: a string, strings, token ids, or lists of token ids."""
    if isinstance(value, str):
        value = [value]
    if not value:
        raise bad_request("'input' must not be empty.", "input")
    if len(value) > MAX_INPUTS and not isinstance(value[0], int):
        raise bad_request(f"'input' takes at most {MAX_INPUTS} entries.", "input")
    if isinstance(value[0], int):
        value = [value]
    prompts = []
    for i, item in enumerate(value):
        ids = served.tokenizer.encode(item, add_special_tokens=True) if isinstance(item, str) else list(item)
        check_prompt_ids(served, ids, f"input[{i}]" if len(value) > 1 else "input")
        prompts.append(ids)
    return prompts


def _encode(vec: torch.Tensor, fmt: str) -> list[float] | str:
    if fmt == "base64":  # what OpenAI's SDK decodes: little-endian float32
        return base64.b64encode(vec.to(torch.float32).numpy().astype("<f4").tobytes()).decode("ascii")
    return vec.tolist()


def json_response(state: ServerState, path: str, request_id: str,
                  work: Callable[[], Awaitable[dict[str, Any]]]) -> EngineResponse:
    """Run `work` under the server's request rules (shutdown, deadline, client gone: abort) and
    answer its JSON, or the error in the shape of the route's API."""

    async def produce(sender: Sender) -> None:
        try:
            body = await work()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - mapped to the API's error shape, logged there
            err = from_engine_error(exc, request_id)
            await sender.json(err.status, error_body_for(path, err), err.headers)
            return
        await sender.json(200, body)

    return EngineResponse(state, produce, request_id)


async def create_embedding(state: ServerState, req: EmbeddingRequest) -> EngineResponse:
    view = await state.use_model(req.model)
    name = view.name
    served = require_task(state, name, "embed", view.served)
    spec = embedding_spec(served)
    check_dimensions(spec, req.dimensions, hidden_size(served))
    prompts = await asyncio.to_thread(_prompts, served, req.input)
    request_id = f"embd-{uuid.uuid4().hex}"

    async def work() -> dict[str, Any]:
        vectors, tokens = await embed(served, prompts, req.dimensions, request_id, req.cache_salt)
        return {"object": "list", "model": name,
                "data": [{"object": "embedding", "index": i, "embedding": _encode(v, req.encoding_format)}
                         for i, v in enumerate(vectors)],
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    return json_response(state, "/v1/embeddings", request_id, work)


# -- Ollama -------------------------------------------------------------------------------------


async def _ollama_served(state: ServerState, name: str, req: Any) -> ServedModel:
    from dashchat.server.model_pool import parse_keep_alive

    try:
        keep_alive = parse_keep_alive(req.keep_alive)
    except ValueError:
        raise bad_request(f'time: invalid duration "{str(req.keep_alive)[:40]}"', "keep_alive") from None
    served = (await state.use_model(name, keep_alive)).served
    asked = req.model
    if getattr(served, "task", "generate") != "embed":
        # Ollama's words for a model without embedding support
        raise bad_request(f'"{asked}" does not support embeddings', "model")
    return served


def _ollama_prompts(served: ServedModel, texts: list[str], truncate: bool) -> list[list[int]]:
    prompts = []
    for i, text in enumerate(texts):
        ids = served.tokenizer.encode(text, add_special_tokens=True)
        if truncate:  # Ollama's default: cut to the context
            ids = ids[: served.max_model_len]
        elif len(ids) > served.max_model_len:
            raise bad_request("the input length exceeds the context length", "input")
        check_prompt_ids(served, ids, f"input[{i}]")
        prompts.append(ids)
    return prompts


async def ollama_embed(state: ServerState, name: str, req: Any) -> EngineResponse:
    """/api/embed: `input` a string or strings -> `embeddings`, in the model's own vector form."""
    served = await _ollama_served(state, name, req)
    texts = [req.input] if isinstance(req.input, str) else list(req.input or [])
    if len(texts) > MAX_INPUTS:
        raise bad_request(f"'input' takes at most {MAX_INPUTS} entries.", "input")
    check_dimensions(embedding_spec(served), req.dimensions, hidden_size(served))
    prompts = await asyncio.to_thread(_ollama_prompts, served, texts, req.truncate is not False)
    started = time.perf_counter_ns()
    request_id = f"embed-{uuid.uuid4().hex}"

    async def work() -> dict[str, Any]:
        vectors, tokens = await embed(served, prompts, req.dimensions, request_id) if prompts else ([], 0)
        return {"model": req.model, "embeddings": [v.tolist() for v in vectors],
                "total_duration": time.perf_counter_ns() - started, "load_duration": 0, "prompt_eval_count": tokens}

    return json_response(state, "/api/embed", request_id, work)


async def ollama_embeddings(state: ServerState, name: str, req: Any) -> EngineResponse:
    """/api/embeddings (the older route): one `prompt` -> `embedding`; an empty prompt, an empty one."""
    served = await _ollama_served(state, name, req)
    prompts = await asyncio.to_thread(_ollama_prompts, served, [req.prompt] if req.prompt else [], True)
    request_id = f"embed-{uuid.uuid4().hex}"

    async def work() -> dict[str, Any]:
        vectors, _ = await embed(served, prompts, None, request_id) if prompts else ([], 0)
        return {"embedding": vectors[0].tolist() if vectors else []}

    return json_response(state, "/api/embeddings", request_id, work)


def add_embedding_routes(app: Any, state: ServerState) -> None:
    @app.post("/v1/embeddings", response_model=None)
    async def embeddings(body: EmbeddingRequest) -> EngineResponse:
        return await create_embedding(state, body)
