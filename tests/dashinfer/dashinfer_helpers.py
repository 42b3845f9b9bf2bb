"""Helpers shared by the DashInfer engine tests."""

from __future__ import annotations

import asyncio
import importlib.util
import itertools
import time

from dashchat.engine.types import CompletionDelta, SamplingParams


def _have_dashinfer() -> bool:
    # tests/ may be on sys.path, where this folder is a namespace portion named "dashinfer": look for the module.
    try:
        return importlib.util.find_spec("dashinfer.allspark") is not None
    except ImportError:
        return False


HAVE_DASHINFER = _have_dashinfer()
SKIP_REASON = "dashinfer is not installed (pip install -e '.[dashinfer]')"

MAX_MODEL_LEN = 256  # DashInfer warms up with a max-length prompt: keep start-up short
_ids = itertools.count()


def greedy(max_tokens: int = 16, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, **kw)


async def collect(engine, prompt: list[int], params: SamplingParams, request_id: str | None = None,
                  delay: float = 0.0) -> dict[int, CompletionDelta]:
    """Run one request to the end; per choice index the joined delta (tokens, logprobs, finish)."""
    await asyncio.sleep(delay)
    out: dict[int, CompletionDelta] = {}
    async for o in engine.generate(prompt, params, request_id or f"test-{next(_ids)}"):
        for d in o.deltas:
            acc = out.setdefault(d.index, CompletionDelta(d.index, [], [] if d.logprobs is not None else None))
            acc.token_ids += d.token_ids
            if d.logprobs is not None:
                acc.logprobs += d.logprobs
            acc.finish_reason = d.finish_reason or acc.finish_reason
    return out


def run(engine, prompt: list[int], params: SamplingParams) -> dict[int, CompletionDelta]:
    return asyncio.run(collect(engine, prompt, params))


def wait_idle(engine, timeout: float = 5.0) -> bool:
    """Whether the engine has no request left (running or queued) within `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stats = engine.stats()
        if stats.num_running == 0 and stats.num_waiting == 0:
            return True
        time.sleep(0.02)
    return False
