"""Running one engine request for one HTTP request.

`EngineResponse` is a raw ASGI response that runs a producer coroutine while watching
three things: the client hanging up (abort at once, say nothing), the per-request
deadline and server shutdown (abort, then tell the client with a clean error). Errors
before the first byte become HTTP errors; after it, `data: {"error": ...}` ends the stream.

`run_choices` turns engine outputs into per-choice text (detokenized, cut at stop strings) and,
for chat-shaped routes, into parsed events (a choice's `output`, text_pipeline.OutputParser:
reasoning, content, tool calls); it makes sure the engine request is aborted whenever iteration
stops early.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from starlette.responses import Response

from dashchat.engine.types import (
    EngineError,
    RequestOutput,
    SamplingParams,
    TokenLogprob,
)
from dashchat.server.text.detokenizer import TextStream
from dashchat.server.plumbing.errors import (
    APIError,
    from_engine_error,
    request_timeout,
    shutting_down,
)
from dashchat.server.plumbing.sse import DONE, JSON_HEADERS, SSE_HEADERS, dumps, event
from dashchat.server.state import ModelView, ServerState

if TYPE_CHECKING:
    from dashchat.server.text.pipeline import OutputEvent, OutputParser

log = logging.getLogger("dashchat.server")

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


class Sender:
    """Tracks what was already sent, so an error is reported the only way still possible."""

    def __init__(self, send: Send) -> None:
        self._send = send
        self.started = False  # headers sent
        self.streaming = False
        self.ended = False

    async def json(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
        hdrs = list(JSON_HEADERS)
        hdrs += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
        self.started = True
        await self._send({"type": "http.response.start", "status": status, "headers": hdrs})
        self.ended = True
        await self._send({"type": "http.response.body", "body": dumps(body)})

    async def start_stream(self) -> None:
        self.started = self.streaming = True
        await self._send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})

    async def chunk(self, data: bytes) -> None:
        await self._send({"type": "http.response.body", "body": data, "more_body": True})

    async def end(self) -> None:
        self.ended = True
        await self._send({"type": "http.response.body", "body": b""})

    async def error(self, err: APIError) -> None:
        if self.ended:
            return
        if not self.started:
            await self.json(err.status, err.body(), err.headers)
        elif self.streaming:  # an error event, then the [DONE] every stream ends with
            await self.chunk(event(err.body()))
            await self.chunk(DONE)
            await self.end()


Producer = Callable[[Sender], Awaitable[None]]


class EngineResponse(Response):
    # A Response subclass only so FastAPI passes it through untouched; it sends its own headers.
    def __init__(self, state: ServerState | ModelView, produce: Producer, request_id: str,
                 prompt_tokens: int | None = None) -> None:
        super().__init__()
        self.state = state
        self.produce = produce
        self.request_id = request_id
        self.prompt_tokens = prompt_tokens  # known before generation (chat): routes that announce it early

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        state = self.state
        sender = Sender(send)
        if state.draining:
            await sender.error(shutting_down())
            return
        state.begin()
        producer = asyncio.create_task(self.produce(sender))
        watchers = [asyncio.create_task(_wait_disconnect(receive)), asyncio.create_task(state.abort_all.wait())]
        try:
            timeout = state.cfg.request_timeout_s or None
            done, _ = await asyncio.wait([producer, *watchers], timeout=timeout,
                                         return_when=asyncio.FIRST_COMPLETED)
            if producer in done:
                exc = producer.exception()
            else:
                reason = "disconnect" if watchers[0] in done else "shutdown" if watchers[1] in done else "timeout"
                state.metrics.aborted.labels(reason).inc()
                log.info("request %s aborted: %s", self.request_id, reason)
                await _cancel(producer, self.request_id)
                exc = None if reason == "disconnect" else (
                    shutting_down() if reason == "shutdown" else request_timeout(timeout or 0))
            if exc is not None:
                await sender.error(from_engine_error(exc, self.request_id))  # logs what a client must not see
        except asyncio.CancelledError:  # the server itself cancelled us (forced shutdown)
            await _cancel(producer, self.request_id)
            raise
        finally:
            for w in watchers:
                w.cancel()
            state.end()


async def _cancel(task: asyncio.Task[Any], request_id: str) -> None:
    """Cancel the producer and wait until it has ended. Its cancellation is what we asked for; an error
    it raised on its way out is logged (the client is told why it was aborted); a cancellation of
    the caller itself propagates."""
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        if not task.cancelled() or _being_cancelled():
            raise
    except Exception:
        log.exception("request %s: the producer failed while it was being cancelled", request_id)


def _being_cancelled() -> bool:
    current = asyncio.current_task()
    cancelling = getattr(current, "cancelling", None)  # Python 3.11+
    return bool(cancelling()) if cancelling is not None else False


async def _wait_disconnect(receive: Receive) -> None:
    # The body has been read by now, so the next message can only be the disconnect.
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


@dataclass
class Choice:
    index: int
    text: TextStream
    # Chat-shaped routes: the text as reasoning / content / tool-call events (None: raw text only).
    output: OutputParser | None = None
    num_tokens: int = 0
    finish_reason: str | None = None
    # Used by non-streaming responses.
    parts: list[str] = field(default_factory=list)
    events: list[OutputEvent] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)


@dataclass
class Usage:
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    reasoning_tokens: int | None = None  # chat-shaped routes: shown as completion_tokens_details

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": self.cached_tokens},
        }
        if self.reasoning_tokens is not None:
            out["completion_tokens_details"] = {"reasoning_tokens": self.reasoning_tokens}
        return out


@dataclass
class Event:
    """What one engine output added to one choice."""

    choice: Choice
    text: str  # new text (detokenized, cut at stop strings)
    logprobs: list[TokenLogprob] | None
    parsed: list[OutputEvent]  # `text` through the choice's OutputParser ([] without one); on the
    # choice's last event this includes what the parser held back until the end


async def run_choices(
    state: ModelView,
    prompt_ids: list[int],
    params: SamplingParams,
    request_id: str,
    choices: Sequence[Choice],
    usage: Usage,
) -> AsyncIterator[list[Event]]:
    """Yields, per engine output, the new text of each choice that changed.

    A choice ends at its engine finish or at a stop string; when all have ended the
    engine request is aborted (n > 1 with stop strings) or has finished by itself.
    """
    engine = state.engine
    metrics = state.metrics
    start = last = time.perf_counter()
    first = True
    finished = False
    gen = engine.generate(prompt_ids, params, request_id)
    try:
        async for out in gen:
            now = time.perf_counter()
            if first:
                first = False
                usage.prompt_tokens = out.num_prompt_tokens
                usage.cached_tokens = out.num_cached_tokens
                metrics.prompt_tokens.inc(out.num_prompt_tokens)
                metrics.ttft.observe(now - start)
            else:
                metrics.itl.observe(now - last)
            last = now
            events = _apply(out, choices)
            finished = out.finished
            yield events
            if finished or all(c.finish_reason for c in choices):
                break
    finally:
        n = sum(c.num_tokens for c in choices)
        usage.completion_tokens = n
        if any(c.output is not None for c in choices):
            usage.reasoning_tokens = sum(c.output.reasoning_tokens for c in choices if c.output is not None)
        metrics.generation_tokens.inc(n)
        if isinstance(state, ModelView):
            metrics.model_generation_tokens.labels(state.name).inc(n)
        metrics.e2e.observe(time.perf_counter() - start)
        if not finished:
            await _close(gen)
            await engine.abort(request_id)


async def _close(gen: Any) -> None:
    aclose = getattr(gen, "aclose", None)
    if aclose is not None:
        try:
            await aclose()
        except Exception:
            log.debug("closing engine stream failed", exc_info=True)


def _apply(out: RequestOutput, choices: Sequence[Choice]) -> list[Event]:
    events: list[Event] = []
    for d in out.deltas:
        c = choices[d.index]
        if c.finish_reason is not None:
            continue  # already cut at a stop string; the engine had not noticed yet
        ids, logprobs = d.token_ids, d.logprobs
        if len(ids) == 1:
            text = c.text.add(ids)
        else:  # several tokens (speculative decoding): a stop string ends the choice at its own token
            text = ""
            for n, token in enumerate(ids, 1):
                text += c.text.add([token])
                if c.text.stopped:
                    ids, logprobs = ids[:n], None if logprobs is None else logprobs[:n]
                    break
        c.num_tokens += len(ids)
        if c.text.stopped:
            c.finish_reason = "stop"
        elif d.finish_reason is not None:
            if d.finish_reason == "abort":  # never shown to clients: the request failed
                raise EngineError("the engine aborted the request")
            text += c.text.finish()
            c.finish_reason = "stop" if c.text.stopped else d.finish_reason
        parsed: list[OutputEvent] = []
        if c.output is not None:
            parsed = c.output.feed(text, len(ids))
            if c.finish_reason is not None:
                parsed += c.output.finish(length=c.finish_reason == "length")
        events.append(Event(c, text, logprobs, parsed))
    return events


async def gather_choices(outputs: AsyncIterator[list[Event]], want_logprobs: bool) -> None:
    """Non-streaming responses: collect each choice's text, parsed events and logprobs to the end."""
    async for events in outputs:
        for ev in events:
            c = ev.choice
            if ev.text:
                c.parts.append(ev.text)
            c.events.extend(ev.parsed)
            if want_logprobs and ev.logprobs:
                c.logprobs.extend(ev.logprobs)
