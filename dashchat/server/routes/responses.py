"""POST /v1/responses (OpenAI's Responses API), GET/DELETE /v1/responses/{id}.

The request becomes a Chat Completions request (input items -> chat messages, `instructions` ->
a system message first, function tools -> chat tools, `text.format` -> `response_format`) and runs
through routes/chat.py via chat_bridge.py; the chat output is re-shaped into output items
(`reasoning`, `message`, `function_call`) and, when streaming, into the typed events in OpenAI's
order, each with `type` and a `sequence_number` counting from 0.

Stateless unless `store` (default true, as OpenAI has it): then the response and its conversation
go into a bounded in-memory store (response_store.py) for `previous_response_id` and GET by id.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, model_validator
from starlette.responses import JSONResponse, Response

from dashchat.server.routes.chat_bridge import ChatBridge, ChatSink, named_event, to_chat_request
from dashchat.server.plumbing.errors import APIError, bad_request
from dashchat.server.plumbing.tenant import current_tenant
from dashchat.server.routes.response_store import ResponseStore
from dashchat.server.state import ServerState


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True, protected_namespaces=())


# -- request -----------------------------------------------------------------------------


class InputContentPart(_Model):
    type: Literal["input_text", "output_text", "text", "refusal", "input_image", "input_file", "input_audio",
                  "reasoning_text", "summary_text"]
    text: str | None = None
    refusal: str | None = None
    image_url: str | None = None  # input_image: a base64 data URL (or http(s) where the server allows it)
    file_id: str | None = None
    detail: str | None = None


class MessageItem(_Model):
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: list[InputContentPart] | str
    id: str | None = None
    status: str | None = None


class FunctionCallItem(_Model):
    type: Literal["function_call"]
    call_id: str = Field(min_length=1)
    name: str = Field(min_length=1)
    arguments: str
    id: str | None = None
    status: str | None = None


class FunctionCallOutputItem(_Model):
    type: Literal["function_call_output"]
    call_id: str = Field(min_length=1)
    output: list[InputContentPart] | str
    id: str | None = None
    status: str | None = None


class ReasoningItem(_Model):
    type: Literal["reasoning"]
    id: str | None = None
    summary: list[InputContentPart] = Field(default_factory=list)
    content: list[InputContentPart] | None = None
    encrypted_content: str | None = None


class ItemReference(_Model):
    type: Literal["item_reference"]
    id: str


_ITEM_TAGS = {"message": "Message", "function_call": "FunctionCall", "function_call_output": "FunctionCallOutput",
              "reasoning": "Reasoning", "item_reference": "ItemReference"}


def _item_tag(value: Any) -> str | None:
    # Capitalized tags: validation.param_path drops them, so errors name input[i].field.
    kind = value.get("type") if isinstance(value, dict) else getattr(value, "type", None)
    return _ITEM_TAGS.get(kind) if isinstance(kind, str) else None


InputItem = Annotated[
    Annotated[MessageItem, Tag("Message")] | Annotated[FunctionCallItem, Tag("FunctionCall")]
    | Annotated[FunctionCallOutputItem, Tag("FunctionCallOutput")] | Annotated[ReasoningItem, Tag("Reasoning")]
    | Annotated[ItemReference, Tag("ItemReference")],
    Discriminator(_item_tag, custom_error_type="invalid_input_item",
                  custom_error_message="unknown input item type; expected one of " + ", ".join(_ITEM_TAGS)),
]


def _default_message_type(value: Any) -> Any:
    # EasyInputMessage may leave out "type": a dict with a role is a message.
    if isinstance(value, list):
        return [dict(v, type="message") if isinstance(v, dict) and "type" not in v and "role" in v else v
                for v in value]
    return value


class FormatConfig(_Model):
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    description: str | None = None
    strict: bool | None = None


class TextConfig(_Model):
    format: FormatConfig | None = None
    verbosity: str | None = None


class ReasoningConfig(_Model):
    effort: Literal["none", "minimal", "low", "medium", "high", "xhigh"] | None = None
    summary: Literal["auto", "concise", "detailed"] | None = None
    generate_summary: str | None = None


class FunctionChoice(_Model):
    type: Literal["function"]
    name: str = Field(min_length=1)


class ResponsesRequest(_Model):
    model: str | None = None
    input: list[InputItem] | str  # list first: a bad item's error names the item, not 'not a string'
    instructions: str | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    text: TextConfig | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    ignore_eos: bool | None = None  # dashchat's extension, as on Chat Completions
    # Prefix-cache salt (vLLM's field): only requests with the same salt (and API key) share cached
    # prompt blocks, so the time to first token tells nothing about prompts salted otherwise.
    cache_salt: str | None = Field(default=None, min_length=1, max_length=256)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    reasoning: ReasoningConfig | None = None
    stream: bool = False
    store: bool = True
    previous_response_id: str | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None
    background: bool | None = None
    truncation: Literal["auto", "disabled"] | None = None
    seed: int | None = None  # extension, as vLLM has it

    @model_validator(mode="before")
    @classmethod
    def _message_types(cls, data: Any) -> Any:
        if isinstance(data, dict) and "input" in data:
            data = {**data, "input": _default_message_type(data["input"])}
        return data


# -- request -> chat ------------------------------------------------------------------------


def _text(parts: str | list[InputContentPart], param: str, allowed: tuple[str, ...]) -> str:
    if isinstance(parts, str):
        return parts
    out = []
    for i, p in enumerate(parts):
        if p.type not in allowed:
            raise bad_request(f"Content of type '{p.type}' is not supported here; only {', '.join(allowed)}.",
                              f"{param}[{i}].type")
        out.append(p.text if p.text is not None else (p.refusal or ""))
    return "".join(out)


def _parts_with_images(parts: list[InputContentPart], param: str) -> list[dict[str, Any]]:
    """A message's text and input_image parts -> chat content parts (text, image_url)."""
    out: list[dict[str, Any]] = []
    for i, p in enumerate(parts):
        if p.type == "input_image":
            if not p.image_url:
                raise bad_request("An input_image needs 'image_url' (a data URL); 'file_id' is not supported.",
                                  f"{param}[{i}].image_url")
            out.append({"type": "image_url", "image_url": {"url": p.image_url}})
        elif p.type in ("input_text", "text", "output_text"):
            out.append({"type": "text", "text": p.text or ""})
        else:
            raise bad_request(f"Content of type '{p.type}' is not supported here; only input_text and input_image.",
                              f"{param}[{i}].type")
    return out


def input_messages(items: str | list[Any]) -> list[dict[str, Any]]:
    """Input items -> chat messages. Consecutive function calls become one assistant turn (with the
    text before them, if any); reasoning items go with the assistant turn that follows."""
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    messages: list[dict[str, Any]] = []
    reasoning: list[str] = []

    def assistant_turn() -> dict[str, Any]:
        if messages and messages[-1]["role"] == "assistant":
            return messages[-1]  # text and calls of one turn arrive as separate items
        turn: dict[str, Any] = {"role": "assistant", "content": ""}
        if reasoning:
            turn["reasoning_content"] = "".join(reasoning)
            reasoning.clear()
        messages.append(turn)
        return turn

    for i, item in enumerate(items):
        param = f"input[{i}]"
        if isinstance(item, MessageItem):
            if item.role == "assistant":
                turn = assistant_turn()
                turn["content"] += _text(item.content, f"{param}.content",
                                         ("output_text", "input_text", "text", "refusal"))
            elif isinstance(item.content, list) and any(p.type == "input_image" for p in item.content):
                messages.append({"role": item.role, "content": _parts_with_images(item.content, f"{param}.content")})
            else:
                text = _text(item.content, f"{param}.content", ("input_text", "text", "output_text"))
                messages.append({"role": item.role, "content": text})
        elif isinstance(item, FunctionCallItem):
            assistant_turn().setdefault("tool_calls", []).append(
                {"id": item.call_id, "type": "function", "function": {"name": item.name, "arguments": item.arguments}})
        elif isinstance(item, FunctionCallOutputItem):
            messages.append({"role": "tool", "tool_call_id": item.call_id,
                             "content": _text(item.output, f"{param}.output", ("input_text", "text", "output_text"))})
        elif isinstance(item, ReasoningItem):
            reasoning.extend(p.text or "" for p in item.content or [])
        else:  # item_reference
            raise bad_request("Input items of type 'item_reference' are not supported; send the item itself.",
                              f"{param}.type")
    for m in messages:
        if m["role"] == "assistant" and not m["content"] and m.get("tool_calls"):
            m["content"] = None
    return messages


def chat_tools(tools: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
    if tools is None:
        return None
    out = []
    for i, t in enumerate(tools):
        kind = t.get("type")
        if kind != "function":
            raise bad_request(
                f"Tools of type '{kind}' are not supported by this server; only 'function' tools are.",
                f"tools[{i}].type")
        name = t.get("name")
        if not isinstance(name, str) or not name:
            raise bad_request("Missing required parameter: 'name'.", f"tools[{i}].name")
        fn: dict[str, Any] = {"name": name}
        for key in ("description", "parameters", "strict"):
            if t.get(key) is not None:
                fn[key] = t[key]
        out.append({"type": "function", "function": fn})
    return out


def chat_tool_choice(choice: str | dict[str, Any] | None) -> Any:
    if choice is None or isinstance(choice, str):
        return choice
    try:
        named = FunctionChoice.model_validate(choice)
    except Exception:  # noqa: BLE001 - pydantic's ValidationError: any non-function choice
        raise bad_request(
            f"Invalid value for 'tool_choice': {json.dumps(choice)[:200]}; expected 'none', 'auto', 'required' "
            "or {\"type\": \"function\", \"name\": ...} (built-in tools are not supported).", "tool_choice") from None
    return {"type": "function", "function": {"name": named.name}}


def chat_response_format(text: TextConfig | None) -> dict[str, Any] | None:
    fmt = text.format if text else None
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return {"type": "json_object"}
    if fmt.schema_ is None:
        raise bad_request("Missing required parameter: 'text.format.schema'.", "text.format.schema")
    return {"type": "json_schema", "json_schema": {"name": fmt.name or "response", "schema": fmt.schema_,
                                                   "strict": fmt.strict}}


_PARAMS = {"response_format": "text.format", "max_completion_tokens": "max_output_tokens",
           "max_tokens": "max_output_tokens", "messages": "input"}


def _rename_param(err: APIError) -> APIError:
    if err.param in _PARAMS:
        err.param = _PARAMS[err.param]
    elif err.param and err.param.startswith("messages["):  # a chat message's index is not an input item's
        err.param = "input"
    return err


# -- response shapes --------------------------------------------------------------------------


def _new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def _usage(u: dict[str, Any] | None) -> dict[str, Any]:
    u = u or {}
    details = u.get("completion_tokens_details") or {}
    prompt = int(u.get("prompt_tokens", 0))
    completion = int(u.get("completion_tokens", 0))
    return {"input_tokens": prompt,
            "input_tokens_details": {"cached_tokens": int((u.get("prompt_tokens_details") or {}).get(
                "cached_tokens", 0))},
            "output_tokens": completion,
            "output_tokens_details": {"reasoning_tokens": int(details.get("reasoning_tokens", 0))},
            "total_tokens": prompt + completion}


def _message_item(item_id: str, text: str, status: str) -> dict[str, Any]:
    return {"id": item_id, "type": "message", "role": "assistant", "status": status,
            "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}] if status != "in_progress"
            else []}


def _reasoning_item(item_id: str, text: str | None, status: str) -> dict[str, Any]:
    content = [] if text is None else [{"type": "reasoning_text", "text": text}]
    return {"id": item_id, "type": "reasoning", "summary": [], "content": content, "status": status}


def _call_item(item_id: str, call_id: str, name: str, arguments: str, status: str) -> dict[str, Any]:
    return {"id": item_id, "type": "function_call", "call_id": call_id, "name": name, "arguments": arguments,
            "status": status}


class _Turn:
    """One /v1/responses request, translated: what the response object echoes, and the store hook."""

    def __init__(self, state: ServerState, store: ResponseStore, req: ResponsesRequest, model: str,
                 history: list[dict[str, Any]], new_messages: list[dict[str, Any]]) -> None:
        self.state, self.store, self.req, self.model = state, store, req, model
        self.history, self.new_messages = history, new_messages
        self.owner = current_tenant()  # only the key that made it reads, continues or deletes it
        self.id = _new_id("resp")
        self.created_at = int(time.time())

    def response(self, status: str, output: list[dict[str, Any]], usage: dict[str, Any] | None,
                 finish: str | None = None, error: dict[str, Any] | None = None) -> dict[str, Any]:
        req = self.req
        fmt: dict[str, Any] = {"type": "text"}
        if req.text and req.text.format:
            fmt = req.text.format.model_dump(by_alias=True, exclude_none=True)
        incomplete = {"reason": "max_output_tokens"} if finish == "length" else None
        return {
            "id": self.id, "object": "response", "created_at": self.created_at, "status": status,
            "background": False, "error": error, "incomplete_details": incomplete,
            "instructions": req.instructions, "max_output_tokens": req.max_output_tokens, "model": self.model,
            "output": output, "parallel_tool_calls": req.parallel_tool_calls is not False,
            "previous_response_id": req.previous_response_id,
            "reasoning": req.reasoning.model_dump(exclude_none=True) if req.reasoning else {"effort": None,
                                                                                           "summary": None},
            "store": req.store, "temperature": 1.0 if req.temperature is None else req.temperature,
            "text": {"format": fmt}, "tool_choice": req.tool_choice or "auto", "tools": req.tools or [],
            "top_p": 1.0 if req.top_p is None else req.top_p, "truncation": req.truncation or "disabled",
            "usage": usage, "user": req.user, "metadata": req.metadata or {},
            **({"completed_at": int(time.time())} if status == "completed" else {}),
        }

    def save(self, response: dict[str, Any], output: list[dict[str, Any]]) -> None:
        if not self.req.store:
            return
        turn: dict[str, Any] = {"role": "assistant", "content": None}
        text = "".join(c["text"] for o in output if o["type"] == "message" for c in o["content"])
        reasoning = "".join(c["text"] for o in output if o["type"] == "reasoning" for c in o["content"])
        calls = [{"id": o["call_id"], "type": "function", "function": {"name": o["name"], "arguments": o["arguments"]}}
                 for o in output if o["type"] == "function_call"]
        if text or not calls:
            turn["content"] = text
        if calls:
            turn["tool_calls"] = calls
        if reasoning:
            turn["reasoning_content"] = reasoning
        self.store.put(response, [*self.history, *self.new_messages, turn], self.owner)


def _status(finish: str | None) -> str:
    return "incomplete" if finish == "length" else "completed"


class ResponsesSink(ChatSink):
    def __init__(self, turn: _Turn) -> None:
        super().__init__()
        self.turn = turn
        self.seq = 0
        self.output: list[dict[str, Any]] = []
        self.open: dict[str, Any] | None = None  # the output item being streamed
        self.open_text: list[str] = []
        self.finish: str | None = None
        self.usage: dict[str, Any] | None = None
        self.failed = False

    def error_body(self, err: APIError) -> Any:
        return _rename_param(err).body()

    # -- non-streaming ---------------------------------------------------------------
    async def on_body(self, body: dict[str, Any]) -> None:
        choice = body["choices"][0]
        msg = choice["message"]
        finish = choice.get("finish_reason")
        status = _status(finish)
        output: list[dict[str, Any]] = []
        reasoning = msg.get("reasoning_content")
        if reasoning:
            output.append(_reasoning_item(_new_id("rs"), reasoning, "completed"))
        calls = msg.get("tool_calls") or []
        if msg.get("content") or not calls:
            output.append(_message_item(_new_id("msg"), msg.get("content") or "", status))
        for c in calls:
            output.append(_call_item(_new_id("fc"), c["id"], c["function"]["name"], c["function"]["arguments"],
                                     "completed"))
        response = self.turn.response(status, output, _usage(body.get("usage")), finish)
        self.turn.save(response, output)
        await self.send_json(200, response)

    # -- streaming -------------------------------------------------------------------
    async def event(self, obj: dict[str, Any]) -> None:
        obj["sequence_number"] = self.seq
        self.seq += 1
        await self.emit(named_event(obj["type"], obj))

    async def on_start(self) -> None:
        created = self.turn.response("in_progress", [], None)
        await self.event({"type": "response.created", "response": created})
        await self.event({"type": "response.in_progress", "response": created})

    async def _open(self, kind: str, call: dict[str, Any] | None = None) -> None:
        if self.open is not None and self.open["type"] == kind and kind != "function_call":
            return
        await self._close()
        index = len(self.output)
        if kind == "message":
            item = _message_item(_new_id("msg"), "", "in_progress")
            part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        elif kind == "reasoning":
            item = _reasoning_item(_new_id("rs"), None, "in_progress")
            part = {"type": "reasoning_text", "text": ""}
        else:
            assert call is not None
            item = _call_item(_new_id("fc"), call["id"], call["function"]["name"], "", "in_progress")
            part = None
        self.open, self.open_text = item, []
        self.output.append(item)
        await self.event({"type": "response.output_item.added", "output_index": index, "item": dict(item)})
        if part is not None:
            await self.event({"type": "response.content_part.added", "item_id": item["id"], "output_index": index,
                              "content_index": 0, "part": part})

    async def _close(self) -> None:
        item = self.open
        if item is None:
            return
        self.open = None
        index = len(self.output) - 1
        text = "".join(self.open_text)
        base = {"item_id": item["id"], "output_index": index}
        if item["type"] == "message":
            status = _status(self.finish)
            part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
            await self.event({"type": "response.output_text.done", **base, "content_index": 0, "text": text,
                              "logprobs": []})
            await self.event({"type": "response.content_part.done", **base, "content_index": 0, "part": part})
            item.update(status=status, content=[part])
        elif item["type"] == "reasoning":
            part = {"type": "reasoning_text", "text": text}
            await self.event({"type": "response.reasoning_text.done", **base, "content_index": 0, "text": text})
            await self.event({"type": "response.content_part.done", **base, "content_index": 0, "part": part})
            item.update(status="completed", content=[part])
        else:
            await self.event({"type": "response.function_call_arguments.done", **base, "name": item["name"],
                              "arguments": text})
            item.update(status="completed", arguments=text)
        await self.event({"type": "response.output_item.done", "output_index": index, "item": item})

    async def on_chunk(self, chunk: dict[str, Any]) -> None:
        if chunk.get("usage"):
            self.usage = chunk["usage"]
        for choice in chunk.get("choices") or []:
            delta = choice.get("delta") or {}
            reasoning = delta.get("reasoning_content")
            if reasoning:
                await self._open("reasoning")
                self.open_text.append(reasoning)
                await self.event({"type": "response.reasoning_text.delta", "item_id": self.open["id"],  # type: ignore[index]
                                  "output_index": len(self.output) - 1, "content_index": 0, "delta": reasoning})
            content = delta.get("content")
            if content:
                await self._open("message")
                self.open_text.append(content)
                await self.event({"type": "response.output_text.delta", "item_id": self.open["id"],  # type: ignore[index]
                                  "output_index": len(self.output) - 1, "content_index": 0, "delta": content,
                                  "logprobs": []})
            for call in delta.get("tool_calls") or []:
                if call.get("id"):
                    await self._open("function_call", call)
                fragment = (call.get("function") or {}).get("arguments")
                if fragment and self.open is not None and self.open["type"] == "function_call":
                    self.open_text.append(fragment)
                    await self.event({"type": "response.function_call_arguments.delta", "item_id": self.open["id"],
                                      "output_index": len(self.output) - 1, "delta": fragment})
            if choice.get("finish_reason"):
                self.finish = choice["finish_reason"]

    async def on_stream_error(self, err: APIError) -> None:
        self.failed = True
        await self.event({"type": "error", "code": err.code or err.type, "message": err.message, "param": err.param})
        failed = self.turn.response("failed", self.output, _usage(self.usage),
                                    error={"code": "server_error", "message": err.message})
        await self.event({"type": "response.failed", "response": failed})

    async def on_end(self) -> None:
        if self.failed:
            return
        if not self.output:  # nothing generated at all: still one (empty) message, as non-streaming has
            await self._open("message")
        await self._close()
        status = _status(self.finish)
        response = self.turn.response(status, self.output, _usage(self.usage), self.finish)
        self.turn.save(response, self.output)
        await self.event({"type": "response.completed" if status == "completed" else "response.incomplete",
                          "response": response})


# -- routes ---------------------------------------------------------------------------------


def previous_not_found(rid: str) -> APIError:
    return APIError(404, f"Previous response with id '{rid}' not found.", "invalid_request_error",
                    "previous_response_id", "previous_response_not_found")


def response_not_found(rid: str) -> APIError:
    return APIError(404, f"Response with id '{rid}' not found.", "invalid_request_error", "response_id",
                    "response_not_found")


async def create_response(state: ServerState, store: ResponseStore, req: ResponsesRequest) -> Response:
    from dashchat.server.routes.chat import create_chat_completion

    view = await state.use_model(req.model)
    model = view.name
    if req.background:
        raise bad_request("'background' responses are not supported; send the request without it.", "background")
    history: list[dict[str, Any]] = []
    if req.previous_response_id is not None:
        stored = store.get(req.previous_response_id, current_tenant())
        if stored is None:
            raise previous_not_found(req.previous_response_id)
        history = stored.conversation
    new_messages = input_messages(req.input)
    system = [{"role": "system", "content": req.instructions}] if req.instructions else []
    chat: dict[str, Any] = {
        "model": model, "messages": [*system, *history, *new_messages], "stream": req.stream,
        "tools": chat_tools(req.tools), "tool_choice": chat_tool_choice(req.tool_choice),
        "parallel_tool_calls": req.parallel_tool_calls, "response_format": chat_response_format(req.text),
        "max_completion_tokens": req.max_output_tokens, "ignore_eos": req.ignore_eos, "temperature": req.temperature,
        "top_p": req.top_p,
        "seed": req.seed, "user": req.user, "cache_salt": req.cache_salt,
    }
    if req.stream:
        chat["stream_options"] = {"include_usage": True}
    if req.reasoning is not None and req.reasoning.effort is not None:
        # Thinking templates (Qwen3) read enable_thinking; others ignore it.
        chat["chat_template_kwargs"] = {"enable_thinking": req.reasoning.effort != "none"}
    if not chat["messages"]:
        raise bad_request("'input' must hold at least one message.", "input")
    chat_req = to_chat_request({k: v for k, v in chat.items() if v is not None}, _rename_param)
    try:
        inner = await create_chat_completion(view, chat_req)
    except APIError as err:
        raise _rename_param(err) from None
    return ChatBridge(inner, ResponsesSink(_Turn(state, store, req, model, history, new_messages)))


def add_responses_routes(app: Any, state: ServerState) -> None:
    store = ResponseStore(state.cfg.responses_store_entries, state.cfg.responses_store_bytes)
    app.state.responses_store = store

    @app.post("/v1/responses", response_model=None)
    async def responses(body: ResponsesRequest) -> Response:
        return await create_response(state, store, body)

    @app.get("/v1/responses/{response_id}")
    async def get_response(response_id: str) -> Response:
        stored = store.get(response_id, current_tenant())
        if stored is None:
            raise response_not_found(response_id)
        return JSONResponse(stored.response)

    @app.delete("/v1/responses/{response_id}")
    async def delete_response(response_id: str) -> Response:
        if not store.delete(response_id, current_tenant()):
            raise response_not_found(response_id)
        return JSONResponse({"id": response_id, "object": "response", "deleted": True})
