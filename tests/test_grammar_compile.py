"""Grammar compiles run on their own bounded pool, below the server's CPU priority, with a deadline on
every wait and a cache bounded by bytes. These check the mechanism, never the machine's speed: slow
compiles are stand-ins that block on an event the test releases."""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack
from typing import Any

import pytest

from dashchat.server.text.grammar_compile import CompileCache, CompileLimits, CompileTimeout

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "server"))


def _poll(cond: Any, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


class _Blocked:
    """A compile that runs until released (a stand-in for one that cannot be cancelled)."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.running = 0
        self.most = 0
        self.done = 0
        self._lock = threading.Lock()

    def __call__(self, value: Any = "compiled") -> Any:
        with self._lock:
            self.running += 1
            self.most = max(self.most, self.running)
        self.release.wait(60)
        with self._lock:
            self.running -= 1
            self.done += 1
        return value


def test_pool_never_runs_more_than_its_threads() -> None:
    cache = CompileCache(CompileLimits(threads=2, timeout_s=60))
    blocked = _Blocked()
    futures = [cache.future(f"k{i}", blocked) for i in range(6)]
    _poll(lambda: blocked.running == 2)
    assert len(cache.pool.threads) == 2
    blocked.release.set()
    for f in futures:
        assert f.result(timeout=60) == "compiled"
    assert blocked.most == 2 and len(cache.pool.threads) == 2


@pytest.mark.skipif(not hasattr(os, "setpriority"), reason="per-thread priority is a Linux feature")
def test_compile_threads_run_below_the_server_priority() -> None:
    cache = CompileCache(CompileLimits(threads=1, nice=5))
    own = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    theirs = cache.future("nice", lambda: os.getpriority(os.PRIO_PROCESS, threading.get_native_id())).result(60)
    assert theirs == min(19, own + 5)
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == own  # the caller's own is untouched


def test_deadline_abandons_a_running_compile_which_finishes_in_the_pool() -> None:
    cache = CompileCache(CompileLimits(threads=1, timeout_s=0.05))
    blocked = _Blocked()
    with pytest.raises(CompileTimeout, match="The schema is too complex"):
        cache.get("heavy", blocked, "The schema")
    assert blocked.running == 1  # could not be stopped: still running, on the pool's one thread
    # A second request for a queued schema times out too, and its compile is dropped before it starts.
    with pytest.raises(CompileTimeout):
        cache.get("queued", lambda: "never", "The schema")
    assert "queued" not in cache._items  # noqa: SLF001 - the entry went with the dropped compile
    blocked.release.set()
    _poll(lambda: blocked.done == 1 and cache.pool.busy == 0)
    assert len(cache.pool.threads) == 1
    assert cache.get("heavy", blocked, "The schema") == "compiled"  # the abandoned result is cached
    assert blocked.done == 1


def test_cache_is_bounded_by_bytes() -> None:
    sizes = {"a": 40, "b": 40, "c": 40, "huge": 500}
    cache = CompileCache(CompileLimits(cache_bytes=100), size_of=lambda r: sizes[r])
    for key in ("a", "b"):
        cache.get(key, lambda key=key: key, "x")
    assert cache.nbytes == 80 and len(cache) == 2
    cache.get("a", lambda: "a", "x")  # a is now the most recently used
    cache.get("c", lambda: "c", "x")
    assert cache.nbytes == 80 and cache.done("a") and cache.done("c") and not cache.done("b")
    cache.get("huge", lambda: "huge", "x")  # larger than the whole cache: served, not kept
    assert not cache.done("huge") and cache.nbytes == 80


def test_refused_schema_is_remembered_and_other_failures_are_not() -> None:
    cache = CompileCache(CompileLimits())
    calls = []

    def refuse() -> None:
        calls.append(1)
        raise ValueError("unsupported")

    for _ in range(2):
        with pytest.raises(ValueError, match="unsupported"):
            cache.get("r", refuse, "x")
    assert len(calls) == 1

    def crash() -> None:
        calls.append(2)
        raise RuntimeError("boom")

    for _ in range(2):
        with pytest.raises(RuntimeError):
            cache.get("c", crash, "x")
    assert calls.count(2) == 2


# ---------------------------------------------------------------- over HTTP: each API's 400

_stack = ExitStack()


@pytest.fixture(autouse=True)
def _close_clients() -> Iterator[None]:
    yield
    _stack.close()


SCHEMA = {"type": "object", "properties": {f"f{i}": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{3,6}$"}
                                           for i in range(8)}}


def test_compile_deadline_is_a_400_in_each_api_shape() -> None:
    """A tiny deadline: a new schema cannot compile in time, whatever the machine; the request gets a
    400 naming the schema (in OpenAI's, the Responses' and Anthropic's shapes), never a 500 or a hang."""
    pytest.importorskip("xgrammar")
    from server_fakes import ScriptedEngine
    from starlette.testclient import TestClient

    from dashchat.server.app import build_app, server_state
    from dashchat.server.config import ServerConfig

    cfg = ServerConfig(served_model_names=["m"], grammar_compile_timeout_s=0.05)
    app = build_app(ScriptedEngine(max_model_len=8192), cfg)
    c = _stack.enter_context(TestClient(app))
    # The compile thread is busy (a compile that runs until released): every new schema misses its deadline.
    blocked = _Blocked()
    pool = server_state(app).grammar("response_format").compiles.pool
    pool.submit(blocked)
    _poll(lambda: blocked.running == 1)
    msgs = [{"role": "user", "content": "hi"}]
    r = c.post("/v1/chat/completions", json={"messages": msgs, "response_format": {
        "type": "json_schema", "json_schema": {"name": "s", "schema": SCHEMA}}})
    assert r.status_code == 400, r.text
    assert "too complex" in r.json()["error"]["message"] and r.json()["error"]["param"] == "response_format"
    r = c.post("/v1/responses", json={"input": "hi", "text": {"format": {
        "type": "json_schema", "name": "s", "schema": {**SCHEMA, "title": "other"}}}})
    assert r.status_code == 400 and "too complex" in r.json()["error"]["message"]
    tool = {"name": "f", "input_schema": {**SCHEMA, "title": "third"}}
    r = c.post("/v1/messages", json={"model": "m", "max_tokens": 8, "messages": msgs, "tools": [tool],
                                     "tool_choice": {"type": "any"}})
    assert r.status_code == 400 and r.json()["type"] == "error" and "too complex" in r.json()["error"]["message"]
    blocked.release.set()
    _poll(lambda: pool.busy == 0)
    assert len(pool.threads) == 1  # nothing piled up behind the abandoned compiles
