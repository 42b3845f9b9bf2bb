"""POST /v1/chat/completions."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from contextlib import aclosing
from typing import Any

from dashchat.server.text.detokenizer import TextStream
from dashchat.server.plumbing.errors import bad_request
from dashchat.server.routes.embeddings import require_task
from dashchat.server.generation.runner import (
    Choice,
    EngineResponse,
    Sender,
    Usage,
    gather_choices,
    run_choices,
)
from dashchat.server.generation.logprobs import chat_entries
from dashchat.server.protocol import ChatCompletionRequest, ChatMessage
from dashchat.server.generation.sampling import build_params, resolve_max_tokens, stop_list
from dashchat.server.plumbing.sse import DONE, event
from dashchat.server.state import ModelView, ServerState
from dashchat.server.text.pipeline import (
    ChatPrompt,
    ContentEvent,
    OutputEvent,
    ReasoningEvent,
    ToolArgumentsEvent,
    ToolCallStartEvent,
    collect_output,
    grammar_factories,
    render_prompt,
    template_kwargs,
)
from dashchat.server.text.tool_request import ToolPlan, plan_tools
from dashchat.server.media.images import expand_images, for_template, load_images

log = logging.getLogger("dashchat.server")


async def create_chat_completion(server: ServerState | ModelView, req: ChatCompletionRequest) -> EngineResponse:
    state = await server.use_model(req.model)
    cfg, model = state.cfg, state.name
    require_task(state, model, "generate", state.served)
    if len(req.messages) > cfg.max_messages:
        raise bad_request(f"'messages' takes at most {cfg.max_messages} entries.", "messages")
    plan = plan_tools(req, cfg)
    messages, image_urls = for_template([_template_message(i, m) for i, m in enumerate(req.messages)])
    stops = stop_list(req.stop, cfg)
    kwargs = template_kwargs(state, req.chat_template_kwargs)
    images = await load_images(state, model, image_urls)
    prompt = await asyncio.to_thread(render_prompt, state, messages, plan.tools if plan.parse else None, kwargs)
    prompt.ids, image_inputs = expand_images(prompt.ids, images, state.model.vision)
    if cfg.log_prompts:
        log.info("prompt (%d tokens): %r", len(prompt.ids), prompt.text)
    max_tokens = resolve_max_tokens(req.max_completion_tokens or req.max_tokens, len(prompt.ids),
                                    state.max_model_len, "messages")
    top_n = req.top_logprobs or 0
    # Off the event loop: a new schema compiles for up to seconds, and every stream would stall meanwhile.
    factories = await state.run_grammar(_grammar, state, req, plan, prompt)
    params = build_params(
        req, max_tokens=max_tokens, vocab_size=state.vocab_size, cfg=cfg,
        logprobs=top_n if req.logprobs else None, factories=factories,
    )
    params.images = image_inputs
    request_id = f"chatcmpl-{uuid.uuid4().hex}"
    run = _ChatRun(state, req, plan, model, request_id, prompt, params, stops, top_n)
    return EngineResponse(state, run.stream if req.stream else run.full, request_id, prompt_tokens=len(prompt.ids))


def _template_message(i: int, m: ChatMessage) -> dict[str, Any]:
    """Text and image parts only; roles, parts and legacy calls are normalized by render_chat_prompt."""
    if isinstance(m.content, list):
        for j, p in enumerate(m.content):
            if p.type == "image_url" and p.image_url is not None:
                continue
            if p.type != "text" or p.text is None:
                raise bad_request(f"Content parts of type '{p.type}' are not supported; only text and image_url.",
                                  f"messages[{i}].content")
    return m.model_dump(exclude_none=True)


def _grammar(state: ModelView, req: ChatCompletionRequest, plan: ToolPlan, prompt: ChatPrompt) -> list[Any]:
    rf = req.response_format
    json_output = rf is not None and rf.type != "text"
    schema = None
    if rf is not None and rf.type == "json_schema":
        if rf.json_schema is None or rf.json_schema.schema_ is None:
            raise bad_request("'response_format.json_schema.schema' is required for type 'json_schema'.",
                              "response_format")
        schema = rf.json_schema.schema_
    param = "function_call" if plan.legacy else "tool_choice"
    return grammar_factories(state, plan, prompt, json_output=json_output, schema=schema,
                             tools_param="functions" if plan.legacy else "tools", choice_param=param)


def _finish(c: Choice, plan: ToolPlan, called: bool, cut: bool = False) -> str:
    """Calls returned -> "tool_calls" ("function_call" legacy). Cut by max_tokens: still "tool_calls"
    when every call was complete (the cut fell in closing markup); "length" when a call was cut off
    (`cut`): the answer lacks a call the model was writing, and OpenAI clients read "length" as
    "incomplete, retry with more tokens" (vLLM says "tool_calls" for auto even then). The complete
    calls are returned either way; nothing of the cut one reaches content."""
    reason = c.finish_reason or "stop"
    if called and (reason == "stop" or (reason == "length" and not cut)):
        return "function_call" if plan.legacy else "tool_calls"
    return reason


class _ChatRun:
    def __init__(self, state: ModelView, req: ChatCompletionRequest, plan: ToolPlan, model: str,
                 request_id: str, prompt: ChatPrompt, params: Any, stops: list[str], top_n: int) -> None:
        self.state, self.req, self.plan = state, req, plan
        self.request_id, self.prompt, self.params, self.top_n = request_id, prompt, params, top_n
        self.created = int(time.time())
        self.base = {"id": request_id, "object": "chat.completion.chunk", "created": self.created,
                     "model": model, "system_fingerprint": state.fingerprint}
        self.model = model
        tools = plan.tools if plan.parse else None
        self.choices = [Choice(i, TextStream(state.pieces, stops, req.skip_special_tokens),
                               output=prompt.output_parser(tools)) for i in range(req.n)]
        self.usage = Usage()

    def _events(self) -> Any:
        return aclosing(run_choices(self.state, self.prompt.ids, self.params, self.request_id,
                                    self.choices, self.usage))

    # -- non-streaming ----------------------------------------------------------
    async def full(self, sender: Sender) -> None:
        want_lp = self.params.logprobs is not None
        async with self._events() as outputs:
            await gather_choices(outputs, want_lp)
        out_choices = [self._full_choice(c, want_lp) for c in self.choices]
        body = {"id": self.request_id, "object": "chat.completion", "created": self.created,
                "model": self.model, "system_fingerprint": self.state.fingerprint,
                "choices": out_choices, "usage": self.usage.as_dict()}
        await sender.json(200, body)

    def _full_choice(self, c: Choice, want_lp: bool) -> dict[str, Any]:
        answer = collect_output(c.events)
        content = answer.content
        if content is None and not (self.plan.parse or answer.reasoning):
            content = ""  # plain chat: always a string, as before tools and thinking existed
        message: dict[str, Any] = {"role": "assistant", "content": content, "refusal": None}
        if answer.reasoning is not None:
            message["reasoning_content"] = message["reasoning"] = answer.reasoning
        calls = answer.calls
        if calls and self.plan.legacy:
            message["function_call"] = {"name": calls[0].name, "arguments": calls[0].arguments}
        elif calls:
            message["tool_calls"] = [
                {"id": t.id, "type": "function", "function": {"name": t.name, "arguments": t.arguments}}
                for t in calls
            ]
        cut = c.output is not None and c.output.cut_call
        logprobs = {"content": chat_entries(self.state.pieces, c.logprobs, self.top_n)} if want_lp else None
        out = {"index": c.index, "message": message, "logprobs": logprobs,
               "finish_reason": _finish(c, self.plan, bool(calls), cut)}
        if c.text.stop_string is not None:
            out["stop_reason"] = c.text.stop_string  # which stop string ended it (as vLLM says)
        return out

    # -- streaming --------------------------------------------------------------
    async def stream(self, sender: Sender) -> None:
        include_usage = bool(self.req.stream_options and self.req.stream_options.include_usage)
        base = dict(self.base)
        if include_usage:
            base["usage"] = None
        want_lp = self.params.logprobs is not None
        pieces, top_n = self.state.pieces, self.top_n

        def chunk(index: int, delta: dict[str, Any], finish: str | None = None, lp: Any = None,
                  stop: str | None = None) -> bytes:
            choice = {"index": index, "delta": delta, "logprobs": lp, "finish_reason": finish}
            if stop is not None:
                choice["stop_reason"] = stop
            return event({**base, "choices": [choice]})

        async with self._events() as outputs:
            async for events in outputs:  # the first output: the engine accepted the request
                if not sender.started:
                    await sender.start_stream()
                    for c in self.choices:
                        await sender.chunk(chunk(c.index, {"role": "assistant", "content": ""}))
                for ev in events:
                    c = ev.choice
                    lp = {"content": chat_entries(pieces, ev.logprobs, top_n)} if want_lp and ev.logprobs else None
                    deltas = self._deltas(ev.parsed)
                    if not deltas and lp:  # logprobs of tokens whose text is still held back
                        deltas = [{"content": ""}]
                    for delta in deltas:
                        await sender.chunk(chunk(c.index, delta, lp=lp))
                        lp = None
                    if c.finish_reason is not None:
                        assert c.output is not None
                        finish = _finish(c, self.plan, c.output.called, c.output.cut_call)
                        await sender.chunk(chunk(c.index, {}, finish, stop=c.text.stop_string))
        if not sender.started:  # the engine produced nothing at all
            await sender.start_stream()
        if include_usage:
            await sender.chunk(event({**base, "choices": [], "usage": self.usage.as_dict()}))
        await sender.chunk(DONE)
        await sender.end()

    def _deltas(self, parsed: list[OutputEvent]) -> list[dict[str, Any]]:
        """Pipeline events -> OpenAI deltas: `reasoning_content` + `reasoning` (one text, the two
        names clients read), `content`, `tool_calls[]` (or legacy `function_call`)."""
        out: list[dict[str, Any]] = []
        legacy = self.plan.legacy
        for ev in parsed:
            if isinstance(ev, ReasoningEvent):
                out.append({"reasoning_content": ev.text, "reasoning": ev.text})
            elif isinstance(ev, ContentEvent):
                out.append({"content": ev.text})
            elif isinstance(ev, ToolCallStartEvent):
                if legacy:
                    if ev.index == 0:
                        out.append({"function_call": {"name": ev.name, "arguments": ""}})
                else:
                    out.append({"tool_calls": [{"index": ev.index, "id": ev.id, "type": "function",
                                                "function": {"name": ev.name, "arguments": ""}}]})
            elif isinstance(ev, ToolArgumentsEvent):
                if legacy:
                    if ev.index == 0:
                        out.append({"function_call": {"arguments": ev.fragment}})
                else:
                    out.append({"tool_calls": [{"index": ev.index, "function": {"arguments": ev.fragment}}]})
        return out
