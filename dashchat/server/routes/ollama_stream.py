"""Ollama's response shapes for /api/chat and /api/generate, fed by the one chat (or completion) run.

The Ollama routes always run the inner request as a stream (with usage): Ollama's numbers
(`prompt_eval_duration` up to the first token, `eval_duration` after it) need the time of the first
token, which a whole-body response hides. With `"stream": false` the sink gathers the stream and
writes one JSON body at the end, as Ollama itself does; an error then still gets its HTTP status,
since nothing was sent before it.

Streamed, each line is one JSON object (NDJSON): text as it comes, tool calls once each is
complete (Ollama's arguments are an object, not a string to concatenate), then a last line with
`done: true`, `done_reason` and the counts and durations (nanoseconds). An error after the first
line is a line `{"error": "..."}`, which Ollama's clients raise.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from dashchat.server.plumbing.errors import APIError
from dashchat.server.plumbing.sse import dumps
from dashchat.server.routes.chat_bridge import ChatSink, arguments_object
from dashchat.server.routes.ollama_errors import ollama_error_body
from dashchat.server.routes.ollama_models import now_iso

NDJSON_HEADERS = [(b"content-type", b"application/x-ndjson"), (b"cache-control", b"no-cache"),
                  (b"x-accel-buffering", b"no")]


class OllamaSink(ChatSink):
    """`kind` "chat": text in `message` ({role, content, thinking, tool_calls}); "generate": in
    `response` and `thinking`. `started_ns`: when the request arrived (perf_counter_ns)."""

    def __init__(self, model: str, kind: str, stream: bool, started_ns: int, show_thinking: bool,
                 rename: Callable[[APIError], APIError]) -> None:
        super().__init__()
        self.model, self.kind, self.stream = model, kind, stream
        self.show_thinking = show_thinking
        self.rename = rename
        self.t_start = started_ns
        self.t_submit = time.perf_counter_ns()  # the request is prepared and goes to the engine
        self.t_first: int | None = None
        self.content: list[str] = []
        self.thinking: list[str] = []
        self.calls: dict[int, dict[str, str]] = {}
        self.finish: str | None = None
        self.usage: dict[str, Any] = {}
        self.failed = False

    def error_body(self, err: APIError) -> Any:
        return ollama_error_body(self.rename(err))

    # -- the shapes -----------------------------------------------------------------------
    def _part(self, content: str, thinking: str = "", calls: list[dict[str, Any]] | None = None,
              ) -> dict[str, Any]:
        out: dict[str, Any] = {"model": self.model, "created_at": now_iso()}
        if self.kind == "chat":
            message: dict[str, Any] = {"role": "assistant", "content": content}
            if thinking:
                message["thinking"] = thinking
            if calls:
                message["tool_calls"] = calls
            out["message"] = message
        else:
            out["response"] = content
            if thinking:
                out["thinking"] = thinking
        return out

    def _tool_calls(self) -> list[dict[str, Any]]:
        return [{"id": c["id"], "function": {"index": i, "name": c["name"], "arguments": arguments_object(c["arguments"])}}
                for i, c in sorted(self.calls.items())]

    def _final(self, content: str, thinking: str, calls: list[dict[str, Any]]) -> dict[str, Any]:
        end = time.perf_counter_ns()
        first = self.t_first or end
        out = self._part(content, thinking, calls)
        out.update(done=True, done_reason="length" if self.finish == "length" else "stop",
                   total_duration=end - self.t_start, load_duration=self.t_submit - self.t_start,
                   prompt_eval_count=int(self.usage.get("prompt_tokens", 0)),
                   prompt_eval_duration=max(first - self.t_submit, 1),
                   eval_count=int(self.usage.get("completion_tokens", 0)),
                   eval_duration=max(end - first, 1))
        return out

    async def _line(self, obj: dict[str, Any]) -> None:
        await self.emit(dumps(obj) + b"\n")

    # -- the run's output ------------------------------------------------------------------
    async def start_stream(self) -> None:
        self.started = True
        if self.stream:  # else: one JSON body (or error) at the end
            assert self._send is not None
            await self._send({"type": "http.response.start", "status": 200, "headers": NDJSON_HEADERS})

    async def end_stream(self) -> None:
        if self.stream:
            await super().end_stream()

    async def on_start(self) -> None:
        self.t_first = time.perf_counter_ns()

    async def on_body(self, body: dict[str, Any]) -> None:  # never: the inner run always streams
        raise AssertionError("the Ollama routes run their inner request as a stream")

    async def on_chunk(self, chunk: dict[str, Any]) -> None:
        if chunk.get("usage"):
            self.usage = chunk["usage"]
        for choice in chunk.get("choices") or []:
            delta = choice.get("delta")
            if delta is None:  # a completion chunk (raw or templated generate)
                delta = {"content": choice.get("text")}
            thinking = (delta.get("reasoning_content") or "") if self.show_thinking else ""
            content = delta.get("content") or ""
            for call in delta.get("tool_calls") or []:
                slot = self.calls.setdefault(call.get("index", 0), {"id": "", "name": "", "arguments": ""})
                fn = call.get("function") or {}
                slot["id"] = call.get("id") or slot["id"]
                slot["name"] = fn.get("name") or slot["name"]
                slot["arguments"] += fn.get("arguments") or ""
            if choice.get("finish_reason"):
                self.finish = choice["finish_reason"]
            if not (content or thinking):
                continue
            if self.stream:
                await self._line({**self._part(content, thinking), "done": False})
            else:
                self.content.append(content)
                self.thinking.append(thinking)

    async def on_stream_error(self, err: APIError) -> None:
        self.failed = True
        if self.stream:
            await self._line(self.error_body(err))
        else:
            await self.send_error(err)

    async def on_end(self) -> None:
        if self.failed:
            return
        calls = self._tool_calls()
        if not self.stream:
            await self.send_json(200, self._final("".join(self.content), "".join(self.thinking), calls))
            return
        if calls:  # as Ollama: the calls in a line of their own, then the closing line
            await self._line({**self._part("", calls=calls), "done": False})
        await self._line(self._final("", "", []))
