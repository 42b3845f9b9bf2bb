"""POST /v1/chat/completions."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from contextlib import aclosing
from typing import Any

from dashchat.server.detokenizer import TextStream
from dashchat.server.errors import APIError, bad_request
from dashchat.server.generation import (
    Choice,
    EngineResponse,
    Sender,
    Usage,
    gather_choices,
    run_choices,
)
from dashchat.server.logprobs import chat_entries
from dashchat.server.protocol import ChatCompletionRequest, ChatMessage
from dashchat.server.sampling import build_params, resolve_max_tokens, stop_list
from dashchat.server.sse import DONE, event
from dashchat.server.state import ServerState
from dashchat.server.tool_request import ToolPlan, plan_tools

log = logging.getLogger("dashchat.server")


async def create_chat_completion(state: ServerState, req: ChatCompletionRequest) -> EngineResponse:
    cfg = state.cfg
    model = state.check_model(req.model)
    if len(req.messages) > cfg.max_messages:
        raise bad_request(f"'messages' takes at most {cfg.max_messages} entries.", "messages")
    plan = plan_tools(req, cfg)
    messages = [_template_message(i, m) for i, m in enumerate(req.messages)]
    stops = stop_list(req.stop, cfg)
    prompt_ids = await asyncio.to_thread(_render, state, messages, plan)
    if cfg.log_prompts:
        log.info("prompt (%d tokens): %r", len(prompt_ids), state.tokenizer.decode(prompt_ids, False))
    max_tokens = resolve_max_tokens(req.max_completion_tokens or req.max_tokens, len(prompt_ids),
                                    state.max_model_len, "messages")
    top_n = req.top_logprobs or 0
    # Off the event loop: a new schema compiles for up to seconds, and every stream would stall meanwhile.
    factories = await asyncio.to_thread(_grammar, state, req, plan)
    params = build_params(
        req, max_tokens=max_tokens, vocab_size=state.vocab_size, cfg=cfg,
        logprobs=top_n if req.logprobs else None, factories=factories,
    )
    request_id = f"chatcmpl-{uuid.uuid4().hex}"
    run = _ChatRun(state, req, plan, model, request_id, prompt_ids, params, stops, top_n)
    return EngineResponse(state, run.stream if req.stream else run.full, request_id)


def _template_message(i: int, m: ChatMessage) -> dict[str, Any]:
    """Text-only check; roles, parts and legacy calls are normalized by render_chat_prompt."""
    if isinstance(m.content, list):
        for p in m.content:
            if p.type != "text" or p.text is None:
                raise bad_request(f"Content parts of type '{p.type}' are not supported; only text.",
                                  f"messages[{i}].content")
    return m.model_dump(exclude_none=True)


def _render(state: ServerState, messages: list[dict[str, Any]], plan: ToolPlan) -> list[int]:
    from dashchat.server.chat_template import ChatTemplateError, render_chat_prompt

    try:
        prompt = render_chat_prompt(state.tokenizer, messages, tools=plan.tools if plan.parse else None,
                                    chat_template=state.cfg.chat_template)
    except ChatTemplateError as exc:
        raise bad_request(f"Could not apply the chat template: {exc}", "messages") from None
    return state.tokenizer.encode(prompt, add_special_tokens=False)


def _grammar(state: ServerState, req: ChatCompletionRequest, plan: ToolPlan) -> list[Any]:
    if plan.parse and plan.forced:
        param = "function_call" if plan.legacy else "tool_choice"
        try:
            return [state.grammar(param).tool_calls(plan.forced_tools(), plan.parallel)]
        except ValueError as exc:
            raise bad_request(str(exc), "functions" if plan.legacy else "tools") from None
    rf = req.response_format
    if rf is None or rf.type == "text":
        return _auto_tools(state, plan)
    schema = None  # a response_format wins over auto tool calls: the answer is that JSON
    if rf.type == "json_schema":
        if rf.json_schema is None or rf.json_schema.schema_ is None:
            raise bad_request("'response_format.json_schema.schema' is required for type 'json_schema'.",
                              "response_format")
        schema = rf.json_schema.schema_
    try:
        return [state.grammar("response_format").json_schema(schema)]
    except ValueError as exc:
        raise bad_request(f"Invalid 'response_format': {exc}", "response_format") from None


def _auto_tools(state: ServerState, plan: ToolPlan) -> list[Any]:
    """auto: free text, but once the model starts a call the rest is a valid call (grammar.py).
    Without a grammar engine, auto still works by parsing alone."""
    if not (plan.parse and plan.mode == "auto"):
        return []
    if not getattr(state.engine, "supports_logits_processors", True):  # e.g. DashInfer: no per-token hook
        return []
    try:
        return [state.grammar("tools").triggered_tool_calls(plan.tools, plan.parallel)]
    except (APIError, ValueError) as exc:
        log.debug("auto tool calls unconstrained: %s", exc)
        return []


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
    def __init__(self, state: ServerState, req: ChatCompletionRequest, plan: ToolPlan, model: str,
                 request_id: str, prompt_ids: list[int], params: Any, stops: list[str], top_n: int) -> None:
        self.state, self.req, self.plan = state, req, plan
        self.request_id, self.prompt_ids, self.params, self.top_n = request_id, prompt_ids, params, top_n
        self.created = int(time.time())
        self.base = {"id": request_id, "object": "chat.completion.chunk", "created": self.created,
                     "model": model, "system_fingerprint": state.fingerprint}
        self.model = model
        self.choices = [Choice(i, TextStream(state.pieces, stops, req.skip_special_tokens)) for i in range(req.n)]
        self.usage = Usage()

    def _events(self) -> Any:
        return aclosing(run_choices(self.state, self.prompt_ids, self.params, self.request_id,
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
        text = "".join(c.parts)
        message: dict[str, Any] = {"role": "assistant", "content": text, "refusal": None}
        calls: list[Any] = []
        cut = False
        if self.plan.parse:
            from dashchat.server.tool_parser import ToolCallStreamParser, collect

            parser = ToolCallStreamParser(self.plan.tools)
            content, calls = collect(parser.feed(text) + parser.finish(length=c.finish_reason == "length"))
            cut = parser.cut_call
            message["content"] = content
            if calls and self.plan.legacy:
                message["function_call"] = {"name": calls[0].name, "arguments": calls[0].arguments}
            elif calls:
                message["tool_calls"] = [
                    {"id": t.id, "type": "function", "function": {"name": t.name, "arguments": t.arguments}}
                    for t in calls
                ]
        logprobs = {"content": chat_entries(self.state.pieces, c.logprobs, self.top_n)} if want_lp else None
        return {"index": c.index, "message": message, "logprobs": logprobs,
                "finish_reason": _finish(c, self.plan, bool(calls), cut)}

    # -- streaming --------------------------------------------------------------
    async def stream(self, sender: Sender) -> None:
        include_usage = bool(self.req.stream_options and self.req.stream_options.include_usage)
        base = dict(self.base)
        if include_usage:
            base["usage"] = None
        want_lp = self.params.logprobs is not None
        pieces, top_n = self.state.pieces, self.top_n
        parsers = [self._parser() for _ in self.choices]
        called = [False] * len(self.choices)

        def chunk(index: int, delta: dict[str, Any], finish: str | None = None, lp: Any = None) -> bytes:
            return event({**base, "choices": [{"index": index, "delta": delta, "logprobs": lp,
                                               "finish_reason": finish}]})

        async with self._events() as outputs:
            async for events in outputs:  # the first output: the engine accepted the request
                if not sender.started:
                    await sender.start_stream()
                    for c in self.choices:
                        await sender.chunk(chunk(c.index, {"role": "assistant", "content": ""}))
                for c, text, lps in events:
                    lp = {"content": chat_entries(pieces, lps, top_n)} if want_lp and lps else None
                    parser = parsers[c.index]
                    if parser is None:
                        if text or lp:
                            await sender.chunk(chunk(c.index, {"content": text}, lp=lp))
                    else:
                        feed = parser.feed(text) if text else []
                        if c.finish_reason is not None:
                            feed += parser.finish(length=c.finish_reason == "length")
                        for delta in self._tool_deltas(feed):
                            called[c.index] = called[c.index] or "content" not in delta
                            await sender.chunk(chunk(c.index, delta, lp=lp))
                            lp = None
                    if c.finish_reason is not None:
                        cut = parser is not None and parser.cut_call
                        await sender.chunk(chunk(c.index, {}, _finish(c, self.plan, called[c.index], cut)))
        if not sender.started:  # the engine produced nothing at all
            await sender.start_stream()
        if include_usage:
            await sender.chunk(event({**base, "choices": [], "usage": self.usage.as_dict()}))
        await sender.chunk(DONE)
        await sender.end()

    def _parser(self) -> Any:
        if not self.plan.parse:
            return None
        from dashchat.server.tool_parser import ToolCallStreamParser

        return ToolCallStreamParser(self.plan.tools)

    def _tool_deltas(self, parser_events: list[Any]) -> list[dict[str, Any]]:
        """Parser events -> OpenAI deltas (`tool_calls[]`, or legacy `function_call`)."""
        from dashchat.server.tool_parser import (
            ContentEvent,
            ToolArgumentsEvent,
            ToolCallStartEvent,
        )

        out: list[dict[str, Any]] = []
        legacy = self.plan.legacy
        for ev in parser_events:
            if isinstance(ev, ContentEvent):
                if ev.text:
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
