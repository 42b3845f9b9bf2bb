"""Helpers shared by the DashInfer engine tests."""

from __future__ import annotations

import asyncio
import importlib.util
import time

from engine_helpers import collect

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


def greedy(max_tokens: int = 16, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, **kw)


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
