"""POST /v1/messages and /v1/messages/count_tokens (Anthropic's Messages API).

As /v1/responses does, the request becomes a Chat Completions request and runs through
routes/chat.py (chat_bridge.py); the chat output is re-shaped into content blocks (`thinking`,
`text`, `tool_use`) and, when streaming, Anthropic's events (`message_start`,
`content_block_start` / `_delta` / `_stop`, `message_delta`, `message_stop`). Every error on these
routes has Anthropic's shape, `{"type": "error", "error": {"type", "message"}}` (app.py picks the
shape by path; `anthropic_error_body` maps the status to Anthropic's error type).
"""

from __future__ import annotations

import json
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import JSONResponse, Response

from dashchat.server.routes.anthropic_errors import MESSAGES_PREFIX, anthropic_error_body
from dashchat.server.routes.chat_bridge import ChatBridge, ChatSink, arguments_object, named_event, to_chat_request
from dashchat.server.plumbing.errors import APIError, bad_request
from dashchat.server.state import ServerState


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True, protected_namespaces=())


# -- request -----------------------------------------------------------------------------


class ImageSource(_Model):
    type: str | None = None  # base64 or url (checked where it is read, so the error names the image)
    media_type: str | None = None
    data: str | None = None
    url: str | None = None


class ContentBlock(_Model):
    type: Literal["text", "tool_use", "tool_result", "thinking", "redacted_thinking", "image", "document",
                  "search_result", "server_tool_use", "web_search_tool_result"]
    text: str | None = None
    # tool_use
    id: str | None = None
    name: str | None = None
    input: dict[str, Any] | None = None
    # tool_result
    tool_use_id: str | None = None
    content: list[ContentBlock] | str | None = None
    is_error: bool | None = None
    # thinking
    thinking: str | None = None
    signature: str | None = None
    # image
    source: ImageSource | None = None


class InputMessage(_Model):
    role: Literal["user", "assistant"]
    content: list[ContentBlock] | str  # list first: a bad block's error names the block


class SystemBlock(_Model):
    type: Literal["text"]
    text: str


class ToolDef(_Model):
    name: str = Field(min_length=1, max_length=128)
    description: str | None = None
    input_schema: dict[str, Any] | None = None
    type: str | None = None


class ToolChoice(_Model):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool | None = None


class ThinkingConfig(_Model):
    type: Literal["enabled", "disabled", "adaptive"]
    budget_tokens: int | None = Field(default=None, ge=0)


class CountTokensRequest(_Model):
    model: str
    messages: list[InputMessage] = Field(min_length=1)
    system: list[SystemBlock] | str | None = None
    tools: list[ToolDef] | None = None
    tool_choice: ToolChoice | None = None
    thinking: ThinkingConfig | None = None


class MessagesRequest(CountTokensRequest):
    max_tokens: int = Field(ge=1)
    stop_sequences: list[str] | None = None
    temperature: float | None = Field(default=None, ge=0.0, le=1.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0)
    stream: bool = False
    metadata: dict[str, Any] | None = None
    ignore_eos: bool | None = None  # dashchat's extension, as on Chat Completions
    # Prefix-cache salt (vLLM's field): only requests with the same salt (and API key) share cached
    # prompt blocks, so the time to first token tells nothing about prompts salted otherwise.
    cache_salt: str | None = Field(default=None, min_length=1, max_length=256)


# -- request -> chat ------------------------------------------------------------------------


def _block_text(blocks: str | list[ContentBlock] | None, param: str) -> str:
    if blocks is None:
        return ""
    if isinstance(blocks, str):
        return blocks
    out = []
    for i, b in enumerate(blocks):
        if b.type != "text" or b.text is None:
            raise bad_request(f"Content blocks of type '{b.type}' are not supported here; only text.",
                              f"{param}[{i}].type")
        out.append(b.text)
    return "".join(out)


def _image_url(block: ContentBlock, where: str) -> str:
    """An image block's source as a URL the chat path takes (base64 -> a data URL)."""
    src = block.source
    if src is None:
        raise bad_request("An image block needs a 'source'.", f"{where}.source")
    if src.type == "base64":
        if not src.data or not src.media_type:
            raise bad_request("A base64 image source needs 'media_type' and 'data'.", f"{where}.source")
        return f"data:{src.media_type};base64,{src.data}"
    if src.type == "url" and src.url:
        return src.url
    if src.type is None:
        raise bad_request("An image block's source needs a 'type': base64 (or url).", f"{where}.source.type")
    raise bad_request(f"Image sources of type '{src.type}' are not supported; send base64 data.", f"{where}.source")


def chat_messages(req: CountTokensRequest) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    if req.system:
        system = req.system if isinstance(req.system, str) else "".join(b.text for b in req.system)
        out.append({"role": "system", "content": system})
    for i, m in enumerate(req.messages):
        param = f"messages[{i}].content"
        if isinstance(m.content, str):
            out.append({"role": m.role, "content": m.content})
            continue
        text: list[str] = []
        parts: list[dict[str, Any]] = []  # text and images in order, where the user turn has images
        calls: list[dict[str, Any]] = []
        thinking: list[str] = []
        for j, b in enumerate(m.content):
            where = f"{param}[{j}]"
            if b.type == "text":
                if b.text is None:
                    raise bad_request("Missing required parameter: 'text'.", f"{where}.text")
                text.append(b.text)
                parts.append({"type": "text", "text": b.text})
            elif b.type == "image" and m.role == "user":
                parts.append({"type": "image_url", "image_url": {"url": _image_url(b, where)}})
            elif b.type == "tool_use" and m.role == "assistant":
                if not b.id or not b.name:
                    raise bad_request("A tool_use block needs 'id' and 'name'.", where)
                calls.append({"id": b.id, "type": "function",
                              "function": {"name": b.name, "arguments": json.dumps(b.input or {})}})
            elif b.type == "tool_result" and m.role == "user":
                if not b.tool_use_id:
                    raise bad_request("Missing required parameter: 'tool_use_id'.", f"{where}.tool_use_id")
                result = _block_text(b.content, f"{where}.content")
                if b.is_error:
                    result = f"Error: {result}"
                out.append({"role": "tool", "tool_call_id": b.tool_use_id, "content": result})
            elif b.type == "thinking" and m.role == "assistant":
                thinking.append(b.thinking or "")
            elif b.type == "redacted_thinking" and m.role == "assistant":
                continue  # opaque to us: nothing to render
            else:
                raise bad_request(f"Content blocks of type '{b.type}' are not supported in {m.role} messages.",
                                  f"{where}.type")
        if m.role == "assistant":
            turn: dict[str, Any] = {"role": "assistant", "content": "".join(text) if text or not calls else None}
            if calls:
                turn["tool_calls"] = calls
            if thinking:
                turn["reasoning_content"] = "".join(thinking)
            out.append(turn)
        elif any(p["type"] == "image_url" for p in parts):
            out.append({"role": "user", "content": parts})
        elif text or not any(b.type == "tool_result" for b in m.content):
            out.append({"role": "user", "content": "".join(text)})
    return out


def _chat_request(req: CountTokensRequest, model: str) -> dict[str, Any]:
    chat: dict[str, Any] = {"model": model, "messages": chat_messages(req)}
    for i, t in enumerate(req.tools or []):
        if t.type not in (None, "custom"):
            raise bad_request(f"Tools of type '{t.type}' (server tools) are not supported by this server; "
                              "only custom tools with an input_schema are.", f"tools[{i}].type")
    if req.tools:
        chat["tools"] = [{"type": "function", "function": {
            "name": t.name, **({"description": t.description} if t.description else {}),
            "parameters": t.input_schema or {"type": "object", "properties": {}}}} for t in req.tools]
    choice = req.tool_choice
    if choice is not None:
        if choice.type == "tool":
            if not choice.name:
                raise bad_request("tool_choice of type 'tool' needs a 'name'.", "tool_choice.name")
            chat["tool_choice"] = {"type": "function", "function": {"name": choice.name}}
        elif req.tools:
            chat["tool_choice"] = {"auto": "auto", "any": "required", "none": "none"}[choice.type]
        if choice.disable_parallel_tool_use and req.tools:
            chat["parallel_tool_calls"] = False
    if req.thinking is not None:
        # Thinking templates (Qwen3) read enable_thinking; others ignore it.
        chat["chat_template_kwargs"] = {"enable_thinking": req.thinking.type != "disabled"}
    return chat


_PARAMS = {"max_completion_tokens": "max_tokens", "stop": "stop_sequences"}


def _rename_param(err: APIError) -> APIError:
    if err.param in _PARAMS:
        err.param = _PARAMS[err.param]
    elif err.param and err.param.startswith("messages["):  # chat indices shift (system, tool results)
        err.param = "messages"
    return err


# -- response shapes --------------------------------------------------------------------------

_STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use", "function_call": "tool_use"}


def _stop_reason(finish: str | None, stop_sequence: str | None = None) -> str:
    if stop_sequence is not None and finish == "stop":
        return "stop_sequence"
    return _STOP_REASONS.get(finish or "stop", "end_turn")


def _matched_stop(choice: dict[str, Any]) -> str | None:
    """The stop string that ended the chat choice (its vLLM-style `stop_reason`), if one did."""
    stop = choice.get("stop_reason")
    return stop if isinstance(stop, str) else None


class MessagesSink(ChatSink):
    def __init__(self, model: str, prompt_tokens: int | None = None) -> None:
        super().__init__()
        self.model = model
        self.id = f"msg_{uuid.uuid4().hex}"
        self.prompt_tokens = prompt_tokens
        self.index = -1  # the content block being streamed
        self.open: str | None = None  # its type
        self.finish: str | None = None
        self.stop_sequence: str | None = None
        self.usage: dict[str, Any] | None = None
        self.failed = False

    def error_body(self, err: APIError) -> Any:
        return anthropic_error_body(_rename_param(err))

    def _usage(self) -> dict[str, Any]:
        u = self.usage or {}
        cached = (u.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
        return {"input_tokens": int(u.get("prompt_tokens", self.prompt_tokens or 0)),
                "output_tokens": int(u.get("completion_tokens", 0)),
                "cache_creation_input_tokens": 0, "cache_read_input_tokens": int(cached or 0)}

    def _message(self, content: list[dict[str, Any]], stop_reason: str | None) -> dict[str, Any]:
        return {"id": self.id, "type": "message", "role": "assistant", "model": self.model, "content": content,
                "stop_reason": stop_reason, "stop_sequence": self.stop_sequence, "usage": self._usage()}

    # -- non-streaming ---------------------------------------------------------------
    async def on_body(self, body: dict[str, Any]) -> None:
        choice = body["choices"][0]
        msg = choice["message"]
        self.usage = body.get("usage")
        content: list[dict[str, Any]] = []
        if msg.get("reasoning_content"):
            content.append({"type": "thinking", "thinking": msg["reasoning_content"], "signature": ""})
        if msg.get("content"):
            content.append({"type": "text", "text": msg["content"]})
        for c in msg.get("tool_calls") or []:
            content.append({"type": "tool_use", "id": c["id"], "name": c["function"]["name"],
                            "input": arguments_object(c["function"]["arguments"])})
        self.stop_sequence = _matched_stop(choice)
        stop_reason = _stop_reason(choice.get("finish_reason"), self.stop_sequence)
        await self.send_json(200, self._message(content, stop_reason))

    # -- streaming -------------------------------------------------------------------
    async def event(self, obj: dict[str, Any]) -> None:
        await self.emit(named_event(obj["type"], obj))

    async def on_start(self) -> None:
        start = self._message([], None)
        start["usage"]["output_tokens"] = 0
        await self.event({"type": "message_start", "message": start})

    async def _open(self, kind: str, call: dict[str, Any] | None = None) -> None:
        if self.open == kind and kind != "tool_use":
            return
        await self._close()
        self.index += 1
        self.open = kind
        if kind == "text":
            block: dict[str, Any] = {"type": "text", "text": ""}
        elif kind == "thinking":
            block = {"type": "thinking", "thinking": "", "signature": ""}
        else:
            assert call is not None
            block = {"type": "tool_use", "id": call["id"], "name": call["function"]["name"], "input": {}}
        await self.event({"type": "content_block_start", "index": self.index, "content_block": block})

    async def _close(self) -> None:
        if self.open is None:
            return
        self.open = None
        await self.event({"type": "content_block_stop", "index": self.index})

    async def _delta(self, delta: dict[str, Any]) -> None:
        await self.event({"type": "content_block_delta", "index": self.index, "delta": delta})

    async def on_chunk(self, chunk: dict[str, Any]) -> None:
        if chunk.get("usage"):
            self.usage = chunk["usage"]
        for choice in chunk.get("choices") or []:
            delta = choice.get("delta") or {}
            if delta.get("reasoning_content"):
                await self._open("thinking")
                await self._delta({"type": "thinking_delta", "thinking": delta["reasoning_content"]})
            if delta.get("content"):
                await self._open("text")
                await self._delta({"type": "text_delta", "text": delta["content"]})
            for call in delta.get("tool_calls") or []:
                if call.get("id"):
                    await self._open("tool_use", call)
                fragment = (call.get("function") or {}).get("arguments")
                if fragment and self.open == "tool_use":
                    await self._delta({"type": "input_json_delta", "partial_json": fragment})
            if choice.get("finish_reason"):
                self.finish = choice["finish_reason"]
                self.stop_sequence = _matched_stop(choice)

    async def on_stream_error(self, err: APIError) -> None:
        self.failed = True
        await self.event(anthropic_error_body(err))

    async def on_end(self) -> None:
        if self.failed:
            return
        await self._close()
        usage = self._usage()
        await self.event({"type": "message_delta",
                          "delta": {"stop_reason": _stop_reason(self.finish, self.stop_sequence),
                                    "stop_sequence": self.stop_sequence},
                          "usage": {"output_tokens": usage["output_tokens"], "input_tokens": usage["input_tokens"],
                                    "cache_read_input_tokens": usage["cache_read_input_tokens"]}})
        await self.event({"type": "message_stop"})


# -- routes ---------------------------------------------------------------------------------


async def create_message(server: ServerState, req: MessagesRequest) -> Response:
    from dashchat.server.routes.chat import create_chat_completion

    state = await server.use_model(req.model)
    model = state.name
    chat = _chat_request(req, model)
    chat.update(max_completion_tokens=req.max_tokens, stream=req.stream, stop=req.stop_sequences,
                temperature=req.temperature, top_p=req.top_p, top_k=req.top_k, ignore_eos=req.ignore_eos,
                cache_salt=req.cache_salt)
    if req.stream:
        chat["stream_options"] = {"include_usage": True}
    if req.stop_sequences is not None and len(req.stop_sequences) > state.cfg.max_stop:
        raise bad_request(f"'stop_sequences' takes at most {state.cfg.max_stop} sequences.", "stop_sequences")
    chat_req = to_chat_request({k: v for k, v in chat.items() if v is not None}, _rename_param)
    try:
        inner = await create_chat_completion(state, chat_req)
    except APIError as err:
        raise _rename_param(err) from None
    return ChatBridge(inner, MessagesSink(model, getattr(inner, "prompt_tokens", None)))


async def count_tokens(server: ServerState, req: CountTokensRequest) -> Response:
    import asyncio

    from dashchat.server.media.images import expand_images, for_template, load_images
    from dashchat.server.text.pipeline import render_prompt, template_kwargs
    from dashchat.server.text.tool_request import plan_tools

    state = await server.use_model(req.model)
    model = state.name
    chat_req = to_chat_request(_chat_request(req, model), _rename_param)
    try:
        # The same render as generation (text_pipeline.py): the count is what /v1/messages would use.
        plan = plan_tools(chat_req, state.cfg)
        messages, urls = for_template([m.model_dump(exclude_none=True) for m in chat_req.messages])
        kwargs = template_kwargs(state, chat_req.chat_template_kwargs)
        images = await load_images(state, model, urls)  # an image counts as the tokens it becomes
        prompt = await asyncio.to_thread(render_prompt, state, messages, plan.tools if plan.parse else None, kwargs)
        ids, _ = expand_images(prompt.ids, images, state.model.vision)
    except APIError as err:
        raise _rename_param(err) from None
    return JSONResponse({"input_tokens": len(ids)})


def add_messages_routes(app: Any, state: ServerState) -> None:
    @app.post(MESSAGES_PREFIX, response_model=None)
    async def messages(body: MessagesRequest) -> Response:
        return await create_message(state, body)

    @app.post(MESSAGES_PREFIX + "/count_tokens", response_model=None)
    async def messages_count_tokens(body: CountTokensRequest) -> Response:
        return await count_tokens(state, body)
