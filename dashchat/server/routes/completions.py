"""POST /v1/completions (legacy text completions: prompt string, token list, or a batch of them)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

from dashchat.server.text.detokenizer import TextStream
from dashchat.server.plumbing.errors import bad_request
from dashchat.server.routes.embeddings import require_task
from dashchat.server.generation.runner import (
    Choice,
    EngineResponse,
    Event,
    Sender,
    Usage,
    gather_choices,
    run_choices,
)
from dashchat.server.generation.logprobs import completion_logprobs
from dashchat.server.protocol import CompletionRequest
from dashchat.server.generation.sampling import build_params, resolve_max_tokens, stop_list
from dashchat.server.plumbing.sse import DONE, event
from dashchat.server.state import ModelView, ServerState

_MAX_PROMPTS = 16


async def create_completion(server: ServerState | ModelView, req: CompletionRequest) -> EngineResponse:
    state = await server.use_model(req.model)
    cfg, model = state.cfg, state.name
    require_task(state, model, "generate", state.served)
    if req.suffix:
        raise bad_request("'suffix' is not supported.", "suffix")
    if req.best_of is not None and req.best_of != req.n:
        raise bad_request("'best_of' must equal 'n' (no server-side ranking).", "best_of")
    if req.echo and req.logprobs is not None:
        raise bad_request("'echo' with 'logprobs' (prompt logprobs) is not supported.", "echo")
    prompts = await asyncio.to_thread(_tokenize, state, req.prompt)
    stops = stop_list(req.stop, cfg)
    jobs = []
    for p_ids in prompts:
        max_tokens = resolve_max_tokens(req.max_tokens, len(p_ids), state.max_model_len, "prompt")
        params = build_params(req, max_tokens=max_tokens, vocab_size=state.vocab_size, cfg=cfg,
                              logprobs=req.logprobs)
        jobs.append((p_ids, params))
    request_id = f"cmpl-{uuid.uuid4().hex}"
    run = _CompletionRun(state, req, model, request_id, jobs, stops)
    return EngineResponse(state, run.stream if req.stream else run.full, request_id)


def _tokenize(state: ModelView, prompt: Any) -> list[list[int]]:
    if isinstance(prompt, str):
        batch: list[Any] = [prompt]
    elif prompt and all(isinstance(t, int) for t in prompt):
        batch = [prompt]
    else:
        batch = list(prompt)
    if not batch:
        raise bad_request("'prompt' must not be empty.", "prompt")
    if len(batch) > _MAX_PROMPTS:
        raise bad_request(f"'prompt' takes at most {_MAX_PROMPTS} prompts.", "prompt")
    out = []
    for p in batch:
        ids = state.tokenizer.encode(p, add_special_tokens=True) if isinstance(p, str) else list(p)
        if not ids:
            raise bad_request("'prompt' must not be empty.", "prompt")
        if any(not 0 <= t < state.vocab_size for t in ids):
            raise bad_request(f"'prompt' has token ids outside [0, {state.vocab_size}).", "prompt")
        out.append(ids)
    return out


class _CompletionRun:
    def __init__(self, state: ModelView, req: CompletionRequest, model: str, request_id: str,
                 jobs: list[tuple[list[int], Any]], stops: list[str]) -> None:
        self.state, self.req, self.model, self.request_id, self.jobs = state, req, model, request_id, jobs
        self.created = int(time.time())
        n = req.n
        # Choice index = prompt index * n + sample index, as OpenAI numbers them.
        self.groups = [[Choice(p * n + j, TextStream(state.pieces, stops, req.skip_special_tokens))
                        for j in range(n)] for p in range(len(jobs))]
        self.usages = [Usage() for _ in jobs]
        self.top_n = req.logprobs or 0

    def _echo(self, p: int) -> str:
        return self.state.tokenizer.decode(self.jobs[p][0]) if self.req.echo else ""

    def _usage(self) -> dict[str, Any]:
        total = Usage(sum(u.prompt_tokens for u in self.usages), sum(u.cached_tokens for u in self.usages),
                      sum(u.completion_tokens for u in self.usages))
        return total.as_dict()

    def _outputs(self) -> AsyncIterator[list[Event]]:
        streams = [
            run_choices(self.state, ids, params, f"{self.request_id}-{p}", self.groups[p], self.usages[p])
            for p, (ids, params) in enumerate(self.jobs)
        ]
        return streams[0] if len(streams) == 1 else _merge(streams)

    async def full(self, sender: Sender) -> None:
        want_lp = self.req.logprobs is not None
        async with aclosing(self._outputs()) as outputs:
            await gather_choices(outputs, want_lp)
        choices = []
        for p, group in enumerate(self.groups):
            echo = self._echo(p)
            for c in group:
                lp = completion_logprobs(self.state.pieces, c.logprobs, self.top_n, len(echo)) if want_lp else None
                choices.append({"index": c.index, "text": echo + "".join(c.parts), "logprobs": lp,
                                "finish_reason": c.finish_reason or "stop"})
        await sender.json(200, {"id": self.request_id, "object": "text_completion", "created": self.created,
                                "model": self.model, "system_fingerprint": self.state.fingerprint,
                                "choices": choices, "usage": self._usage()})

    async def stream(self, sender: Sender) -> None:
        include_usage = bool(self.req.stream_options and self.req.stream_options.include_usage)
        base: dict[str, Any] = {"id": self.request_id, "object": "text_completion", "created": self.created,
                                "model": self.model, "system_fingerprint": self.state.fingerprint}
        if include_usage:
            base["usage"] = None
        want_lp = self.req.logprobs is not None
        offsets = {c.index: 0 for g in self.groups for c in g}

        def chunk(index: int, text: str, finish: str | None = None, lp: Any = None) -> bytes:
            return event({**base, "choices": [{"index": index, "text": text, "logprobs": lp,
                                               "finish_reason": finish}]})

        async with aclosing(self._outputs()) as outputs:
            async for events in outputs:
                if not sender.started:
                    await sender.start_stream()
                    for p, group in enumerate(self.groups):
                        echo = self._echo(p)
                        for c in group:
                            if echo:
                                offsets[c.index] = len(echo)
                                await sender.chunk(chunk(c.index, echo))
                for ev in events:
                    c, text, lps = ev.choice, ev.text, ev.logprobs
                    lp = None
                    if want_lp and lps:
                        lp = completion_logprobs(self.state.pieces, lps, self.top_n, offsets[c.index])
                    offsets[c.index] += len(text)
                    if text or lp or c.finish_reason:
                        await sender.chunk(chunk(c.index, text, c.finish_reason, lp))
        if not sender.started:
            await sender.start_stream()
        if include_usage:
            await sender.chunk(event({**base, "choices": [], "usage": self._usage()}))
        await sender.chunk(DONE)
        await sender.end()


async def _merge(streams: list[AsyncIterator[list[Event]]]) -> AsyncIterator[list[Event]]:
    """Interleave several engine requests' outputs as they come; closing stops them all."""
    queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()

    async def pump(i: int, s: AsyncIterator[list[Event]]) -> None:
        try:
            async with aclosing(s) as it:  # type: ignore[type-var]
                async for item in it:
                    await queue.put((0, item))
            await queue.put((1, None))
        except BaseException as exc:  # noqa: BLE001 - delivered to the consumer, which re-raises
            await queue.put((2, exc))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        live = len(tasks)
        while live:
            kind, item = await queue.get()
            if kind == 0:
                yield item
            elif kind == 1:
                live -= 1
            else:
                raise item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
