"""Where grammars compile: a pool of their own, below the step thread's CPU priority, with a deadline
on every wait and a cache bounded by bytes.

A JSON Schema can take seconds to compile, and a client chooses the schema. So compiles
  - run on `threads` threads of their own (not the default executor that renders prompts), each
    lowering its own CPU priority by `nice` at start (Linux: a thread's nice value is its own), so the
    step thread, which decodes every running stream, wins the cores while one runs;
  - are waited for at most `timeout_s`: then the request gets a 400 naming the schema as too complex.
    A compile that has not started is dropped; one that has cannot be stopped (xgrammar has no
    cancel), so it is abandoned: it finishes on its pool thread, and its result is cached. The pool
    never grows, so abandoned compiles cannot pile up threads;
  - are cached (least recently used first out) up to `cache_entries` and `cache_bytes` of compiled
    grammar (xgrammar's `memory_size_bytes`). A refused schema (ValueError) is cached as a refusal.
The pool's threads are daemons: an abandoned compile never holds up the server's exit.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CompileLimits:
    threads: int = 1
    timeout_s: float = 10.0
    cache_bytes: int = 256 * 1024 * 1024
    cache_entries: int = 256
    nice: int = 10  # how much lower than the server's priority compile threads run (0: the same)


class CompileTimeout(ValueError):
    """A grammar did not compile within the deadline: the request's schema is too complex (a 400)."""


def lower_thread_priority(nice: int) -> None:
    """Lower the calling thread's CPU priority by `nice` (Linux: setpriority on the thread id)."""
    if nice <= 0 or not hasattr(os, "setpriority"):
        return
    tid = threading.get_native_id()
    try:
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + nice))
    except OSError as exc:  # e.g. a sandbox without the syscall: compiles still run, at normal priority
        log.warning("grammar compile threads keep the server's CPU priority: %s", exc)


class CompilePool:
    """A fixed number of daemon threads running submitted calls in order."""

    def __init__(self, threads: int, nice: int = 0) -> None:
        self.size = max(1, threads)
        self._nice = nice
        self._queue: queue.SimpleQueue[tuple[Future[Any], Callable[[], Any]]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self.threads: list[threading.Thread] = []
        self.busy = 0  # calls running now

    def submit(self, fn: Callable[[], Any]) -> Future[Any]:
        fut: Future[Any] = Future()
        self._queue.put((fut, fn))
        with self._lock:
            if len(self.threads) < self.size:  # started on demand, never more than `size`
                t = threading.Thread(target=self._work, name=f"grammar-compile-{len(self.threads)}", daemon=True)
                self.threads.append(t)
                t.start()
        return fut

    def close(self) -> None:
        """Let the threads end once the calls queued before have run (a model being unloaded)."""
        with self._lock:
            for _ in self.threads:
                self._queue.put((None, None))  # type: ignore[arg-type]

    def _work(self) -> None:
        lower_thread_priority(self._nice)
        while True:
            fut, fn = self._queue.get()
            if fut is None:
                return
            if not fut.set_running_or_notify_cancel():
                continue  # dropped before it started
            with self._lock:
                self.busy += 1
            try:
                fut.set_result(fn())
            except BaseException as exc:  # noqa: BLE001 - handed to whoever waits on the future
                fut.set_exception(exc)
            finally:
                with self._lock:
                    self.busy -= 1


@dataclass
class _Entry:
    result: Future[Any]
    task: Future[Any] | None = None
    size: int = 0


class CompileCache:
    """Compiled grammars by key, compiled on the pool on a miss."""

    def __init__(self, limits: CompileLimits, size_of: Callable[[Any], int] | None = None) -> None:
        self.limits = limits
        self.pool = CompilePool(limits.threads, limits.nice)
        self._size_of = size_of or (lambda r: int(getattr(r, "memory_size_bytes", 0) or 0))
        self._items: OrderedDict[str, _Entry] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._items)

    def future(self, key: str, compile_fn: Callable[[], Any]) -> Future[Any]:
        """The compile of `key`: cached, or submitted to the pool now."""
        with self._lock:
            entry = self._items.get(key)
            if entry is not None:
                self._items.move_to_end(key)
                return entry.result
            entry = self._items[key] = _Entry(Future())
            self._evict()
        entry.task = self.pool.submit(lambda: self._run(key, entry, compile_fn))
        return entry.result

    def done(self, key: str) -> bool:
        with self._lock:
            entry = self._items.get(key)
        return entry is not None and entry.result.done()

    def get(self, key: str, compile_fn: Callable[[], Any], what: str) -> Any:
        """The compiled grammar, waiting at most the deadline; CompileTimeout (naming `what`) past it."""
        fut = self.future(key, compile_fn)
        try:
            return fut.result(timeout=self.limits.timeout_s)
        except FutureTimeout:
            pass
        with self._lock:
            entry = self._items.get(key)
            if entry is not None and entry.result is fut and entry.task is not None and entry.task.cancel():
                del self._items[key]  # never started: nothing runs on
        raise CompileTimeout(f"{what} is too complex: it did not compile within {self.limits.timeout_s:g} s.")

    def _run(self, key: str, entry: _Entry, compile_fn: Callable[[], Any]) -> None:
        try:
            result = compile_fn()
        except ValueError as e:  # a schema the compiler refuses: remembered, like a result
            entry.result.set_exception(e)
            return
        except Exception as e:  # noqa: BLE001 - anything else: not cached, the next request tries again
            with self._lock:
                if self._items.get(key) is entry:
                    del self._items[key]
            entry.result.set_exception(e)
            return
        size = self._size_of(result)
        with self._lock:
            if self._items.get(key) is entry:
                if size > self.limits.cache_bytes:
                    del self._items[key]  # larger than the whole cache: keeping it would evict everything
                else:
                    entry.size = size
                    self._bytes += size
                    self._evict()
        entry.result.set_result(result)

    def _evict(self) -> None:
        while self._items and (len(self._items) > self.limits.cache_entries or self._bytes > self.limits.cache_bytes):
            _, old = self._items.popitem(last=False)
            self._bytes -= old.size
