"""Ollama's API beside OpenAI's: /api/chat, /api/generate, /api/tags, /api/show, /api/ps,
/api/version, /api/embed (and the older /api/embeddings).

As /v1/messages and /v1/responses do, a chat or generate request is translated and run by the one
generation path: /api/chat and /api/generate become a Chat Completions request (routes/chat.py:
template, tool plan, grammars for `format`, engine, stop strings, limits, metrics); a `raw` or
`template` generate becomes a text completion (routes/completions.py) of the prompt as written.
ollama_stream.py re-shapes the output into Ollama's NDJSON lines or body. Ollama's field names map
as follows: `options` (num_predict, temperature, top_p, top_k, min_p, seed, stop, repeat_penalty,
presence/frequency_penalty) to the sampling fields, `format` ("json" or a JSON schema) to
response_format, `tools` to tools (calls come back with arguments as an object), `think` to the
template's enable_thinking and the `thinking` field. Options that tune llama.cpp's runner
(num_ctx, num_thread, num_gpu, ...) are accepted and have no effect here. `keep_alive` is Ollama's:
how long the model stays loaded once idle after this request (the model pool, model_pool.py; 0:
unload it now, unless other requests use it).
Errors have Ollama's shape, `{"error": "..."}` (ollama_errors.py).
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Callable
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.responses import JSONResponse, Response

from dashchat.server.plumbing.errors import APIError, bad_request
from dashchat.server.plumbing.validation import check_json_body
from dashchat.server.protocol import CompletionRequest
from dashchat.server.routes.chat_bridge import ChatBridge, to_chat_request
from dashchat.server.routes.embeddings import ollama_embed, ollama_embeddings
from dashchat.server.routes.ollama_models import (
    ModelFacts,
    now_iso,
    ps_body,
    read_model_facts,
    served_name,
    show_body,
    tags_body,
    version_body,
)
from dashchat.server.routes.ollama_stream import OllamaSink
from dashchat.server.routes.ollama_template import render_go_template
from dashchat.server.model_pool import parse_keep_alive
from dashchat.server.state import ModelView, ServerState


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True, protected_namespaces=())


# -- requests ------------------------------------------------------------------------------


class Options(_Model):
    """The options that change what dashchat generates; the rest of Ollama's (runner settings,
    mirostat, typical_p, ...) are ignored, as Ollama ignores options it does not know."""

    num_predict: int | None = None  # -1 (no limit) and -2 (fill the context): up to the context's end
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = None  # negative: a random seed, as Ollama's -1
    stop: list[str] | str | None = None
    repeat_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    num_ctx: int | None = None  # accepted: the context is the server's --max-model-len


class _Request(_Model):
    model: str = ""
    stream: bool = True  # Ollama streams unless told not to
    options: Options | None = None
    format: Literal["", "json"] | dict[str, Any] | None = None
    keep_alive: float | str | None = None
    think: bool | Literal["high", "medium", "low", "max"] | None = None
    logprobs: bool | None = None


class ToolCallFunction(_Model):
    name: str
    arguments: dict[str, Any] | str = Field(default_factory=dict)


class ToolCall(_Model):
    id: str | None = None
    function: ToolCallFunction


class Message(_Model):
    role: str
    content: str = ""
    thinking: str | None = None
    images: list[str] | None = None
    tool_calls: list[ToolCall] | None = None
    tool_name: str | None = None
    tool_call_id: str | None = None


class FunctionDef(_Model):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None


class ToolDef(_Model):
    type: Literal["function"] = "function"
    function: FunctionDef


class ChatRequest(_Request):
    messages: list[Message] = Field(default_factory=list)
    tools: list[ToolDef] | None = None


class GenerateRequest(_Request):
    prompt: str = ""
    suffix: str | None = None
    system: str | None = None
    template: str | None = None
    context: list[int] | None = None
    raw: bool = False
    images: list[str] | None = None


class ShowRequest(_Model):
    model: str = ""
    name: str = ""  # older clients' spelling of `model`
    verbose: bool = False


class EmbedRequest(_Model):
    model: str = ""
    input: str | list[str] | None = None
    truncate: bool | None = None
    dimensions: int | None = None
    options: Options | None = None
    keep_alive: float | str | None = None


class EmbeddingsRequest(_Model):
    model: str = ""
    prompt: str | None = None
    options: Options | None = None
    keep_alive: float | str | None = None


# -- checks -----------------------------------------------------------------------------------

def _keep_alive(value: float | str | None) -> float | None:
    """Seconds (negative: forever), or None when not given; Ollama's error for text that is no duration."""
    try:
        return parse_keep_alive(value)
    except ValueError:
        raise bad_request(f'time: invalid duration "{str(value)[:40]}"', "keep_alive") from None


def _check_request(state: ServerState, req: _Request) -> tuple[str, float | None]:
    """The checks that need no loaded model; returns the served name and the keep-alive."""
    name = served_name(state, req.model)
    keep_alive = _keep_alive(req.keep_alive)
    if req.logprobs:
        raise bad_request("'logprobs' is not supported on Ollama's API here; /v1/chat/completions returns them.",
                          "logprobs")
    return name, keep_alive


async def _use_model(state: ServerState, req: _Request, name: str, keep_alive: float | None) -> ModelView:
    """The model (loaded if it is not), then the checks that need it."""
    view = await state.use_model(name, keep_alive)
    if req.think not in (None, False) and view.reasoning is None:
        raise bad_request(f'"{req.model}" does not support thinking', "think")
    return view


def _no_images(model: str, images: list[str] | None, param: str) -> None:
    if images:
        raise bad_request(f'"{model}" does not support vision: it is a text-only model.', param)


# Chat Completions field -> the Ollama field a client wrote, for the errors the chat run raises.
_PARAMS = {
    "max_completion_tokens": "options.num_predict", "max_tokens": "options.num_predict",
    "temperature": "options.temperature", "top_p": "options.top_p", "top_k": "options.top_k",
    "min_p": "options.min_p", "seed": "options.seed", "stop": "options.stop",
    "repetition_penalty": "options.repeat_penalty", "presence_penalty": "options.presence_penalty",
    "frequency_penalty": "options.frequency_penalty", "response_format": "format",
    "chat_template_kwargs": "think", "tool_choice": "tools", "functions": "tools",
}
_HEAD = re.compile(r"[A-Za-z_]+")


def _renamer(extra: dict[str, str] | None = None) -> Callable[[APIError], APIError]:
    table = {**_PARAMS, **(extra or {})}

    def rename(err: APIError) -> APIError:
        head = _HEAD.match(err.param or "")
        if head and head.group(0) in table:
            old, new_head = err.param or "", table[head.group(0)]
            new = new_head + old[head.end():]
            err.message = err.message.replace(f"'{old}'", f"'{new}'").replace(f"'{head.group(0)}'", f"'{new_head}'")
            err.param = new
        # the schema's own errors name where the chat request holds it
        err.message = err.message.replace("'response_format.json_schema.schema'", "'format'")
        return err

    return rename


# -- translation ------------------------------------------------------------------------------


def _sampling(opts: Options | None) -> dict[str, Any]:
    """Ollama's options as sampling fields (None: the server's default, as on /v1)."""
    if opts is None:
        return {}
    seed = opts.seed if opts.seed is not None and opts.seed >= 0 else None
    limit = opts.num_predict if opts.num_predict is not None and opts.num_predict > 0 else None
    return {"temperature": opts.temperature, "top_p": opts.top_p, "top_k": opts.top_k, "min_p": opts.min_p,
            "seed": seed, "stop": opts.stop, "repetition_penalty": opts.repeat_penalty,
            "presence_penalty": opts.presence_penalty, "frequency_penalty": opts.frequency_penalty,
            "max_tokens": limit}


def _response_format(fmt: str | dict[str, Any] | None) -> dict[str, Any] | None:
    if not fmt:
        return None
    if fmt == "json":
        return {"type": "json_object"}
    return {"type": "json_schema", "json_schema": {"name": "response", "schema": fmt}}


def _arguments_text(args: dict[str, Any] | str) -> str:
    return args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)


def chat_messages(req: ChatRequest, vision: bool = False) -> list[dict[str, Any]]:
    """Ollama's messages in Chat Completions' shape. Tool calls get ids (Ollama's often have none);
    a tool result answers the call it names (`tool_call_id`, else the first unanswered call of its
    `tool_name`, else the first unanswered call), as results follow their calls in order."""
    out: list[dict[str, Any]] = []
    pending: list[tuple[str, str]] = []  # (name, id) of the latest assistant turn's unanswered calls
    for i, m in enumerate(req.messages):
        role = m.role.lower()
        if not vision:
            _no_images(req.model, m.images, f"messages[{i}].images")
        if role not in ("system", "user", "assistant", "tool"):
            raise bad_request(f"Invalid role '{m.role[:40]}' in messages[{i}]: use system, user, assistant or tool.",
                              f"messages[{i}].role")
        turn: dict[str, Any] = {"role": role, "content": m.content}
        if m.images:  # a vision model: Ollama's bare base64 images as chat image parts
            turn["content"] = [{"type": "text", "text": m.content or ""}] + [
                {"type": "image_url", "image_url": {"url": "data:application/octet-stream;base64," + b64}}
                for b64 in m.images]
        if role == "assistant":
            if m.thinking:
                turn["reasoning_content"] = m.thinking
            if m.tool_calls:
                calls = [{"id": c.id or f"call_{i}_{j}", "type": "function",
                          "function": {"name": c.function.name, "arguments": _arguments_text(c.function.arguments)}}
                         for j, c in enumerate(m.tool_calls)]
                turn["tool_calls"] = calls
                pending = [(c["function"]["name"], c["id"]) for c in calls]
        elif role == "tool":
            answered = next((p for p in pending if p[1] == m.tool_call_id), None)
            answered = answered or next((p for p in pending if p[0] == m.tool_name), None)
            answered = answered or (pending[0] if pending else None)
            if answered is not None:
                pending.remove(answered)
            call_id = m.tool_call_id or (answered[1] if answered else None)
            if call_id is not None:
                turn["tool_call_id"] = call_id
            if m.tool_name:
                turn["name"] = m.tool_name
        out.append(turn)
    return out


def _thinking_kwargs(think: bool | str | None) -> dict[str, Any] | None:
    # Thinking templates (Qwen3) read enable_thinking; others ignore it.
    return None if think is None else {"enable_thinking": think is not False}


def _loaded(req: _Request, kind: str, keep_alive: float | None) -> JSONResponse:
    """A request without a prompt loads the model (done by now), and with keep_alive 0 unloads it
    (once this request has ended, if no other uses it), as in Ollama."""
    body: dict[str, Any] = {"model": req.model, "created_at": now_iso()}
    if kind == "chat":
        body["message"] = {"role": "assistant", "content": ""}
    else:
        body["response"] = ""
    return JSONResponse({**body, "done": True, "done_reason": "unload" if keep_alive == 0 else "load"})


def _without_none(body: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in body.items() if v is not None}


async def _run_chat(state: ModelView, req: _Request, kind: str, started: int, messages: list[dict[str, Any]],
                    tools: list[dict[str, Any]] | None, rename: Callable[[APIError], APIError]) -> Response:
    from dashchat.server.routes.chat import create_chat_completion

    sampling = _sampling(req.options)
    sampling["max_completion_tokens"] = sampling.pop("max_tokens", None)
    body = {"model": state.name, "messages": messages, "tools": tools, **sampling,
            "response_format": _response_format(req.format), "chat_template_kwargs": _thinking_kwargs(req.think),
            "stream": True, "stream_options": {"include_usage": True}}
    chat_req = to_chat_request(_without_none(body), rename)
    try:
        inner = await create_chat_completion(state, chat_req)
    except APIError as err:
        raise rename(err) from None
    return ChatBridge(inner, OllamaSink(req.model, kind, req.stream, started, req.think is not False, rename))


async def _run_completion(state: ModelView, req: GenerateRequest, started: int, prompt: str) -> Response:
    from dashchat.server.plumbing.validation import from_validation_errors
    from dashchat.server.routes.completions import create_completion

    rename = _renamer()
    body = {"model": state.name, "prompt": prompt, **_without_none(_sampling(req.options)),
            "stream": True, "stream_options": {"include_usage": True}}
    body.setdefault("max_tokens", None)  # Ollama's default: to the end of the context, not 16 tokens
    try:
        comp_req = CompletionRequest.model_validate(body)
    except ValidationError as exc:
        raise rename(from_validation_errors(exc.errors())) from None
    try:
        inner = await create_completion(state, comp_req)
    except APIError as err:
        raise rename(err) from None
    return ChatBridge(inner, OllamaSink(req.model, "generate", req.stream, started, False, rename))


# -- routes -----------------------------------------------------------------------------------


async def ollama_chat(state: ServerState, req: ChatRequest) -> Response:
    started = time.perf_counter_ns()
    name, keep_alive = _check_request(state, req)
    view = await _use_model(state, req, name, keep_alive)
    if not req.messages:
        return _loaded(req, "chat", keep_alive)
    tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None
    messages = chat_messages(req, vision=view.model.vision is not None)
    return await _run_chat(view, req, "chat", started, messages, tools, _renamer())


async def ollama_generate(state: ServerState, req: GenerateRequest) -> Response:
    started = time.perf_counter_ns()
    name, keep_alive = _check_request(state, req)
    _no_images(req.model, req.images, "images")
    if req.raw and (req.template or req.system or req.context):
        raise bad_request("raw mode does not support template, system, or context", "raw")
    if req.context:
        raise bad_request("'context' is not supported by this server: send the conversation as messages to "
                          "/api/chat.", "context")
    if req.suffix:
        raise bad_request(f'"{req.model}" does not support insert', "suffix")
    view = await _use_model(state, req, name, keep_alive)
    if not req.prompt:
        return _loaded(req, "generate", keep_alive)
    if req.raw or req.template:
        if req.format:
            raise bad_request("'format' with 'raw' or 'template' is not supported by this server.", "format")
        prompt = req.prompt if req.raw else render_go_template(req.template or "", req.system or "", req.prompt)
        return await _run_completion(view, req, started, prompt)
    messages = ([{"role": "system", "content": req.system}] if req.system else [])
    messages.append({"role": "user", "content": req.prompt})
    return await _run_chat(view, req, "generate", started, messages, None, _renamer({"messages": "prompt"}))


class _AnyBodyIsJSON(APIRoute):
    """Ollama reads every body as JSON whatever its content type, and its documented commands
    (`curl URL -d '{...}'`) send form-encoded ones: read them as JSON too, with the checks the body
    middleware makes only on JSON-typed bodies (validation.check_json_body)."""

    def get_route_handler(self) -> Callable[[Request], Any]:
        handler = super().get_route_handler()

        async def as_json(request: Request) -> Response:
            body = await request.body()
            if (err := check_json_body(body, None)) is not None:
                raise err
            headers = [(k, v) for k, v in request.scope["headers"] if k != b"content-type"]
            scope = {**request.scope, "headers": [*headers, (b"content-type", b"application/json")]}

            async def replay() -> dict[str, Any]:
                return {"type": "http.request", "body": body, "more_body": False}

            return await handler(Request(scope, replay))  # type: ignore[no-any-return]

        return as_json


def add_ollama_routes(app: Any, state: ServerState) -> None:
    facts: dict[str, ModelFacts] = {}  # by model (its first served name)
    api = APIRouter(route_class=_AnyBodyIsJSON)

    async def model_facts() -> dict[str, ModelFacts]:
        for entry in state.pool.entries:  # read once: the served files do not change while they are served
            if entry.name not in facts:
                facts[entry.name] = await asyncio.to_thread(read_model_facts, state, entry.name)
        return facts

    @api.post("/api/chat", response_model=None)
    async def api_chat(body: ChatRequest) -> Response:
        return await ollama_chat(state, body)

    @api.post("/api/generate", response_model=None)
    async def api_generate(body: GenerateRequest) -> Response:
        return await ollama_generate(state, body)

    @api.api_route("/api/tags", methods=["GET", "HEAD"], response_model=None)
    async def api_tags() -> Response:
        return JSONResponse(tags_body(state, await model_facts()))

    @api.post("/api/show", response_model=None)
    async def api_show(body: ShowRequest) -> Response:
        name = body.model or body.name
        entry = state.pool.entry(served_name(state, name))
        return JSONResponse(show_body((await model_facts())[entry.name], name))

    @api.get("/api/ps", response_model=None)
    async def api_ps() -> Response:
        return JSONResponse(ps_body(state, await model_facts()))

    @api.api_route("/api/version", methods=["GET", "HEAD"], response_model=None)
    async def api_version() -> Response:
        return JSONResponse(version_body())

    @api.post("/api/embed", response_model=None)
    async def api_embed(body: EmbedRequest) -> Response:
        return await ollama_embed(state, served_name(state, body.model), body)

    @api.post("/api/embeddings", response_model=None)
    async def api_embeddings(body: EmbeddingsRequest) -> Response:
        return await ollama_embeddings(state, served_name(state, body.model), body)

    app.include_router(api)
