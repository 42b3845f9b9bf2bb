"""The models a server can serve, loaded on first use and unloaded when idle.

One `ModelSpec` per model (its served names, how to build its engine, its memory estimate, its own
ServerConfig for per-model settings); one `_Entry` per spec holds what is loaded now. The contract
(docs/DESIGN.md, "Model pool"):

- `acquire(name)` returns a `Lease` on the loaded model, loading it first if needed. Requests that
  arrive while it loads wait for the same load. A load that fails, or that cannot make room, is a 503
  with Retry-After; the next request tries again.
- Loads run one at a time. Before one, idle models (no lease held) are unloaded, least recently used
  first, until `max_loaded` and `max_memory_bytes` hold; if the models in use leave no room, 503.
- A lease is released when its request's response has ended. A model whose last lease is released
  stays loaded for its keep-alive (negative: forever; 0: unloads now), then unloads. A model with
  leases held is never unloaded: an unload waits for them (a client's keep_alive 0 while other
  requests run is ignored, unless the operator allows clients to unload, then it happens as soon as
  they end; a request arriving meanwhile uses the loaded copy and cancels that unload).
- Unloading shuts the engine down (its step thread joined, ranks stopped) off the event loop and drops
  every reference the pool held; a request arriving meanwhile waits for the unload, then reloads.

Every state change happens on the event loop thread, so a check and the change it decides are
never split by another request.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from dashchat.server.config import ServerConfig
from dashchat.server.plumbing.errors import APIError, model_not_found

log = logging.getLogger("dashchat.server")

FOREVER = -1.0  # keep-alive: never unload


@dataclass
class ModelSpec:
    """One model the server may serve."""

    names: list[str]  # served names; the first is the model's own
    cfg: ServerConfig  # the server's config with this model's settings (template, reasoning, names)
    build: Callable[[], Any] | None  # blocking: returns the started engine; None: cannot be (re)loaded
    memory_bytes: int = 0  # estimated need when loaded (weights + KV cache); 0: unknown
    keep_alive: float = FOREVER  # seconds idle before unloading
    max_model_len: int | None = None  # known before loading (None: only once loaded)
    architecture: str | None = None
    path: str = ""  # the model folder (Ollama's routes read its files)
    engine_args: Any = None  # what its engine is built from (Ollama's routes show its quantization)


@dataclass(eq=False)
class _Entry:
    spec: ModelSpec
    served: Any = None  # ServedModel while loaded
    refs: int = 0  # leases held
    last_used: float = 0.0
    loaded_at: float = 0.0
    keep_alive: float = FOREVER  # the latest request's (Ollama's keep_alive), else the spec's
    expires_at: float | None = None  # wall time of the planned unload; None: none planned
    unload_when_idle: bool = False  # a client asked to unload while others ran (allowed by the operator)
    loading: asyncio.Task[Any] | None = None
    unloading: asyncio.Task[Any] | None = None
    timer: asyncio.TimerHandle | None = None
    loads: int = 0
    failed: bool = False  # the latest load failed
    unloads: dict[str, int] = field(default_factory=dict)  # by reason

    @property
    def name(self) -> str:
        return self.spec.names[0]


class Lease:
    """A held reference on a loaded model; `release()` once (later calls do nothing)."""

    def __init__(self, pool: ModelPool, entry: _Entry, keep_alive: float | None) -> None:
        self.pool, self._entry, self.keep_alive = pool, entry, keep_alive
        self.served = entry.served
        self.released = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.pool._release(self._entry, self.keep_alive)


def model_unavailable(name: str, why: str, retry_after: int) -> APIError:
    return APIError(503, f"The model '{name}' {why}; please retry shortly.", "server_error", "model",
                    "model_unavailable", headers={"Retry-After": str(retry_after)})


class ModelPool:
    def __init__(self, specs: list[ModelSpec], max_loaded: int = 0, max_memory_bytes: int = 0,
                 allow_client_unload: bool = False, retry_after_s: int = 5) -> None:
        self.entries = [_Entry(s, keep_alive=s.keep_alive) for s in specs]
        self._by_name: dict[str, _Entry] = {}
        for e in self.entries:
            for n in e.spec.names:
                if n in self._by_name:
                    raise ValueError(f"two models are served as {n!r}: give one another name")
                self._by_name[n] = e
        self.max_loaded = max_loaded  # 0: no limit
        self.max_memory_bytes = max_memory_bytes  # 0: no limit
        self.allow_client_unload = allow_client_unload
        self.retry_after_s = retry_after_s
        self._load_lock: asyncio.Lock | None = None  # made on the serving loop
        self._tasks: set[asyncio.Task[Any]] = set()
        if len(specs) > 1 or any(s.keep_alive >= 0 for s in specs):
            _pin_mmap_threshold()
        for e in self.entries:
            if self.max_memory_bytes and e.spec.memory_bytes > self.max_memory_bytes:
                raise ValueError(f"model {e.name!r} needs about {e.spec.memory_bytes / 2**30:.1f} GiB, more than "
                                 f"the memory budget of {self.max_memory_bytes / 2**30:.1f} GiB")

    @classmethod
    def single(cls, served: Any) -> ModelPool:
        """One model, already loaded, never unloaded (the server built its engine itself)."""
        cfg = served.cfg
        pool = cls([ModelSpec(list(cfg.served_model_names), cfg, None)])
        entry = pool.entries[0]
        entry.served, entry.loaded_at, entry.last_used = served, time.time(), time.monotonic()
        return pool

    def load_now(self, name: str) -> None:
        """Before serving: load a model in this thread (a failure is the caller's, e.g. start-up's)."""
        from dashchat.server.state import ServedModel

        entry = self.entry(name)
        assert entry.spec.build is not None and entry.served is None
        entry.served = ServedModel(entry.spec.build(), entry.spec.cfg)
        entry.loaded_at, entry.last_used, entry.loads = time.time(), time.monotonic(), entry.loads + 1

    # -- lookup -------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return list(self._by_name)

    def entry(self, name: str) -> _Entry:
        try:
            return self._by_name[name]
        except KeyError:
            raise model_not_found(name) from None

    def loaded(self) -> list[_Entry]:
        return [e for e in self.entries if e.served is not None]

    # -- leases ---------------------------------------------------------------------------
    async def acquire(self, name: str, keep_alive: float | None = None) -> Lease:
        """A lease on the model served as `name` (404 if none), loaded first if needed (503 if it
        cannot be). `keep_alive`: how long it stays loaded once idle after this request (None: its default)."""
        entry = self.entry(name)
        while entry.served is None:
            if entry.unloading is not None:
                await asyncio.shield(entry.unloading)
                continue
            if entry.spec.build is None:
                raise model_unavailable(entry.name, "is not loaded and cannot be loaded here", self.retry_after_s)
            if entry.loading is None:
                entry.loading = self._spawn(self._load(entry))
                entry.loading.add_done_callback(lambda _t, e=entry: setattr(e, "loading", None))
            await asyncio.shield(entry.loading)
        # From here to the return nothing awaits: an unload cannot slip in between.
        entry.refs += 1
        entry.unload_when_idle = False
        entry.last_used = time.monotonic()
        entry.expires_at = None
        if entry.timer is not None:
            entry.timer.cancel()
            entry.timer = None
        if keep_alive is not None and keep_alive != 0:
            entry.keep_alive = keep_alive
        return Lease(self, entry, keep_alive)

    def _release(self, entry: _Entry, keep_alive: float | None) -> None:
        entry.refs -= 1
        entry.last_used = time.monotonic()
        if keep_alive == 0:
            if entry.refs > 0 and not self.allow_client_unload:
                log.info("model %s: keep_alive 0 ignored while %d other request(s) use it", entry.name, entry.refs)
            else:
                entry.unload_when_idle = True
        elif keep_alive is None:
            entry.keep_alive = entry.spec.keep_alive if entry.refs == 0 else entry.keep_alive
        if entry.refs > 0 or entry.served is None or entry.spec.build is None:
            return
        if entry.unload_when_idle:
            self._spawn(self.unload(entry.name, "client"))
        elif entry.keep_alive >= 0:
            entry.expires_at = time.time() + entry.keep_alive
            entry.timer = asyncio.get_running_loop().call_later(entry.keep_alive, self._expire, entry)

    def _expire(self, entry: _Entry) -> None:
        entry.timer = None
        if entry.refs == 0 and entry.served is not None:
            self._spawn(self.unload(entry.name, "keep_alive"))

    # -- loading and unloading --------------------------------------------------------------
    async def _load(self, entry: _Entry) -> None:
        if self._load_lock is None:
            self._load_lock = asyncio.Lock()
        async with self._load_lock:
            if entry.served is not None:
                return
            await self._make_room(entry)
            from dashchat.server.state import ServedModel

            spec = entry.spec
            log.info("loading model %s", entry.name)
            start = time.perf_counter()
            try:
                served = await asyncio.to_thread(lambda: ServedModel(spec.build(), spec.cfg))  # type: ignore[misc]
            except Exception:  # any failure of a model's load: the log says why, the client gets a 503
                log.exception("model %s failed to load", entry.name)
                entry.failed = True
                raise model_unavailable(entry.name, "could not be loaded (the server log says why)",
                                        self.retry_after_s) from None
            entry.served, entry.loaded_at, entry.loads = served, time.time(), entry.loads + 1
            entry.failed = False
            entry.keep_alive = spec.keep_alive
            log.info("model %s loaded in %.1fs", entry.name, time.perf_counter() - start)

    def _in_memory(self) -> list[_Entry]:
        return [e for e in self.entries if e.served is not None or e.unloading is not None]

    async def _make_room(self, entry: _Entry) -> None:
        """Unload idle models, least recently used first, until `entry` fits both limits."""
        while True:
            held = self._in_memory()
            too_many = self.max_loaded and len(held) + 1 > self.max_loaded
            memory = sum(e.spec.memory_bytes for e in held) + entry.spec.memory_bytes
            too_big = self.max_memory_bytes and memory > self.max_memory_bytes
            if not (too_many or too_big):
                return
            going = [e.unloading for e in held if e.unloading is not None]
            if going:  # memory still held by an engine shutting down
                await asyncio.wait(going)
                continue
            idle = [e for e in held if e.refs == 0 and e is not entry]
            if not idle:
                why = (f"cannot be loaded now: the {len(held)} loaded model(s) are all in use"
                       + (" (--max-loaded-models)" if too_many else " (memory budget)"))
                raise model_unavailable(entry.name, why, self.retry_after_s)
            victim = min(idle, key=lambda e: e.last_used)
            await self.unload(victim.name, "lru")

    async def unload(self, name: str, reason: str) -> bool:
        """Unload the model now if no request holds it (else False); waits until its engine is down."""
        entry = self.entry(name)
        if entry.unloading is not None:
            await asyncio.shield(entry.unloading)
            return True
        if entry.served is None or entry.refs > 0 or entry.spec.build is None:
            return False
        served, entry.served = entry.served, None
        entry.expires_at, entry.unload_when_idle = None, False
        if entry.timer is not None:
            entry.timer.cancel()
            entry.timer = None
        entry.unloads[reason] = entry.unloads.get(reason, 0) + 1
        log.info("unloading model %s (%s)", entry.name, reason)
        entry.unloading = self._spawn(self._shutdown(served))
        entry.unloading.add_done_callback(lambda _t: setattr(entry, "unloading", None))
        await asyncio.shield(entry.unloading)
        return True

    @staticmethod
    async def _shutdown(served: Any) -> None:
        served.close()
        engine = served.engine
        del served
        try:
            await asyncio.to_thread(engine.shutdown)
        except Exception:  # noqa: BLE001 - an engine that fails to stop is dropped all the same
            log.exception("engine shutdown failed")
        del engine
        await asyncio.to_thread(_free_memory)

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(_retrieve)
        return task

    def shutdown(self) -> None:
        """Server exit: stop every loaded engine (blocking)."""
        for e in self.entries:
            if e.timer is not None:
                e.timer.cancel()
            if e.served is not None:
                served, e.served = e.served, None
                try:
                    served.close()
                    served.engine.shutdown()
                except Exception:  # noqa: BLE001 - stop the others all the same
                    log.exception("engine shutdown failed for %s", e.name)


# The leases the current HTTP request holds; ReleaseLeases releases them when its response has ended
# (streams included), whatever path the route took to get there (an error, a client that left).
_REQUEST_LEASES: ContextVar[list[Lease] | None] = ContextVar("dashchat_request_leases", default=None)


def hold_until_response_ends(lease: Lease) -> None:
    leases = _REQUEST_LEASES.get()
    if leases is None:
        lease.release()
        raise RuntimeError("a model lease outside an HTTP request (ReleaseLeases middleware missing?)")
    leases.append(lease)


class ReleaseLeases:
    """ASGI middleware: the request's model leases are released once the app has sent its response."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        leases: list[Lease] = []
        token = _REQUEST_LEASES.set(leases)
        try:
            await self.app(scope, receive, send)
        finally:
            _REQUEST_LEASES.reset(token)
            for lease in leases:
                lease.release()


def model_status(entry: _Entry) -> dict[str, Any]:
    """A model's state as /v1/models and /health show it (`value` as llama-server's router names it)."""
    if entry.served is not None:
        value = "loaded"
    elif entry.loading is not None:
        value = "loading"
    elif entry.unloading is not None:
        value = "unloading"
    else:
        value = "error" if entry.failed else "unloaded"
    out: dict[str, Any] = {"value": value, "loaded": entry.served is not None}
    if entry.served is not None:
        out["in_flight"] = entry.refs
        if entry.expires_at is not None:
            out["expires_in_s"] = max(0.0, round(entry.expires_at - time.time(), 1))
    return out


def _retrieve(task: asyncio.Task[Any]) -> None:
    # Failures reach the requests that await the task; an unobserved one must not warn at exit.
    if not task.cancelled():
        task.exception()


_MMAP_THRESHOLD = 1 << 20
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


def _pin_mmap_threshold() -> None:
    """Make glibc give every allocation of 1 MiB or more its own mapping, returned to the system when
    freed. By default glibc raises that threshold (up to 32 MiB) each time a big block is freed, so an
    unloaded model's weights and buffers end up in the heap, where they stayed resident (measured on
    Qwen2.5-0.5B Q4_K_M and SmolLM2-135M swapped in and out: RSS with SmolLM2 loaded 905 MB after one
    swap, 1344 MB after two; pinned, 610 and 663 MB).
    Only for servers that unload models: a few MB-sized step buffers then pay fresh page faults."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)
    except (OSError, AttributeError):  # not glibc: its allocator has its own rules
        pass


def _free_memory() -> None:
    """Hand freed memory back: collect cycles, release CUDA's cache, trim glibc's heap."""
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def parse_keep_alive(value: float | int | str | None) -> float | None:
    """Ollama's keep_alive: seconds as a number, or a Go duration as text ("5m", "1h30m", "-1s", "0");
    negative: forever; None: not given. Raises ValueError for text that is no duration."""
    if value is None or value == "":
        return None
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        seconds = _go_duration(value.strip())
    return FOREVER if seconds < 0 else seconds


_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def _go_duration(text: str) -> float:
    import re

    sign = -1.0 if text.startswith("-") else 1.0
    body = text.lstrip("+-")
    if body == "0":
        return 0.0
    parts = re.findall(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)", body)
    if not parts or "".join(n + u for n, u in parts) != body:
        raise ValueError(f'time: invalid duration "{text[:40]}"')
    return sign * sum(float(n) * _UNITS[u] for n, u in parts)
