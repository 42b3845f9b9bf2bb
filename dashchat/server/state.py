"""What every route shares: the served models (engine, tokenizer, template...), config, metrics,
shutdown signals."""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from dashchat import __version__
from dashchat.engine.types import Engine, EngineDead
from dashchat.models.pooling import serving
from dashchat.server.config import ServerConfig
from dashchat.server.model_pool import ModelPool, hold_until_response_ends
from dashchat.server.text.control_tokens import ContentGuard
from dashchat.server.text.grammar_compile import CompileLimits
from dashchat.server.text.detokenizer import TokenPieces
from dashchat.server.plumbing.errors import bad_request
from dashchat.server.plumbing.metrics import Metrics
from dashchat.server.text.reasoning import choose_format

log = logging.getLogger("dashchat.server")
T = TypeVar("T")


class ServedModel:
    """One model the server serves: its engine and everything that depends on its tokenizer and chat
    template. The model pool builds one when it loads the model and drops it when it unloads it."""

    def __init__(self, engine: Engine, cfg: ServerConfig) -> None:
        self.engine = engine
        self.cfg = cfg
        self.tokenizer: Any = engine.tokenizer  # type: ignore[attr-defined]
        self.max_model_len: int = engine.max_model_len
        self.vocab_size: int = getattr(engine, "vocab_size", None) or self.tokenizer.vocab_size
        self.pieces = TokenPieces(self.tokenizer)
        # Chat messages' text never becomes a special token (control_tokens.py), unless the operator allows it.
        self.guard = ContentGuard(self.tokenizer, enabled=not cfg.allow_special_tokens_in_content)
        self.fingerprint = f"fp_dashchat_{__version__}_{getattr(engine, 'name', 'engine')}"
        # Reasoning models: how this model marks its thinking (None: it does not think).
        self.chat_template: str | None = cfg.chat_template or getattr(self.tokenizer, "chat_template", None)
        self.reasoning = choose_format(cfg.reasoning_parser, self.chat_template)
        if self.reasoning is not None:
            log.info("reasoning parser: %s", self.reasoning.name)
        # What it is served for ("generate", "embed", "score") and how it pools (models/pooling.py).
        self.task, self.pooling = serving(cfg.task, getattr(getattr(engine, "args", None), "model_dir", None),
                                          getattr(getattr(engine, "model_config", None), "architecture", None))
        from dashchat.server.media.images import vision_support

        self.vision = vision_support(engine, cfg)  # None: the model takes no images
        self._grammar: Any = None
        self._grammar_error: str | None = None
        self._grammar_lock = threading.Lock()

    def close(self) -> None:
        """Unloading: end the grammar compile threads (the pool shuts the engine down)."""
        if self._grammar is not None:
            self._grammar.compiles.pool.close()

    # -- structured output ----------------------------------------------------
    def grammar(self, param: str) -> Any:
        """The GrammarBackend, built on first use (it indexes the vocabulary once)."""
        with self._grammar_lock:  # called from worker threads (compiles run off the event loop)
            if self._grammar is None and self._grammar_error is None:
                try:
                    from dashchat.server.text.grammar import GrammarBackend

                    cfg = self.cfg
                    limits = CompileLimits(threads=cfg.grammar_compile_threads,
                                           timeout_s=cfg.grammar_compile_timeout_s,
                                           cache_bytes=cfg.grammar_cache_bytes, nice=cfg.grammar_compile_nice)
                    self._grammar = GrammarBackend(self.tokenizer, self.vocab_size, limits)
                except Exception as exc:  # noqa: BLE001 - missing optional dependency, or a tokenizer it cannot index
                    log.warning("structured output unavailable: %s", exc)
                    self._grammar_error = str(exc) or type(exc).__name__
        if self._grammar is None:
            raise bad_request(
                f"Structured output (needed for '{param}') is unavailable on this server: "
                f"{self._grammar_error}. Install the 'grammar' extra.",
                param,
            )
        return self._grammar


class ServerState:
    """What every route shares: the model pool (models by served name, loaded on demand), config,
    metrics, shutdown signals. A route names its model with `await use_model(name)` and works with
    the ModelView it gets for the rest of the request."""

    def __init__(self, models: Engine | ModelPool, cfg: ServerConfig, metrics: Metrics | None = None) -> None:
        self.cfg = cfg
        # An engine: the one model, loaded for the server's whole life (in-process tests, DashInfer).
        self.pool = models if isinstance(models, ModelPool) else ModelPool.single(ServedModel(models, cfg))
        self.metrics = metrics or Metrics(self.pool)
        self.created = int(time.time())
        # Shutdown: draining refuses new generations; abort_all ends the ones still running.
        self.draining = False
        self.abort_all = asyncio.Event()
        self.inflight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        # Requests wait for their grammar here, not on the default executor that renders prompts: a
        # wait for a heavy compile (up to the compile deadline) must not hold up other requests' renders.
        self.grammar_waits = ThreadPoolExecutor(max_workers=64, thread_name_prefix="grammar-wait")

    async def run_grammar(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` (which may wait on grammar compiles) on the grammar-wait threads."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.grammar_waits, functools.partial(fn, *args))

    # -- models -------------------------------------------------------------
    def check_model(self, model: str | None) -> str:
        """The served name a request asked for (missing: the first one), else 404."""
        if model is None:
            return self.pool.names[0]
        self.pool.entry(model)
        return model

    async def use_model(self, model: str | None, keep_alive: float | None = None) -> ModelView:
        """The one lookup every route makes: the model a request names (missing: the first one; unknown:
        404), loaded first if it is not (the request waits; 503 with Retry-After if it cannot be). The
        model stays loaded until the request's response has ended (the lease is released then)."""
        name = self.check_model(model)
        lease = await self.pool.acquire(name, keep_alive)
        hold_until_response_ends(lease)
        return ModelView(self, lease.served, name)

    @property
    def model(self) -> ServedModel:
        """The first model, which must be loaded: for code that serves one model only."""
        served = self.pool.entries[0].served
        if served is None:
            raise RuntimeError("the first model is not loaded: call `await state.use_model(name)`")
        return served  # type: ignore[no-any-return]

    # The first model's parts, as single-model code reads them.
    engine = property(lambda self: self.model.engine)
    tokenizer = property(lambda self: self.model.tokenizer)
    max_model_len = property(lambda self: self.model.max_model_len)
    vocab_size = property(lambda self: self.model.vocab_size)
    pieces = property(lambda self: self.model.pieces)
    guard = property(lambda self: self.model.guard)
    fingerprint = property(lambda self: self.model.fingerprint)
    chat_template = property(lambda self: self.model.chat_template)
    reasoning = property(lambda self: self.model.reasoning)

    def grammar(self, param: str) -> Any:
        return self.model.grammar(param)

    def engine_healthy(self) -> bool:
        """False once any model's engine has died (engines without `check_health` are taken as alive)."""
        for entry in self.pool.loaded():
            check = getattr(entry.served.engine, "check_health", None)
            if check is None:
                continue
            try:
                check()
            except EngineDead:
                return False
        return True

    # -- in-flight accounting for graceful shutdown ----------------------------
    def begin(self) -> None:
        self.inflight += 1
        self._idle.clear()

    def end(self) -> None:
        self.inflight -= 1
        if self.inflight == 0:
            self._idle.set()

    async def wait_idle(self, timeout: float) -> bool:
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            return False


class ModelView:
    """What a route works with once it has named its model: that model's parts (engine, tokenizer,
    template, its own config) and the server's shared ones (metrics, shutdown signals, grammar
    threads). Routes, the text pipeline and the generation runner take it where they took the state."""

    def __init__(self, server: ServerState, served: ServedModel, name: str) -> None:
        self.server, self.served, self.name = server, served, name

    async def use_model(self, model: str | None, keep_alive: float | None = None) -> ModelView:
        # A request translated into another API's (Ollama -> chat) names the model again: same lease.
        if model is None or model == self.name or model in self.served.cfg.served_model_names:
            return self if model in (None, self.name) else ModelView(self.server, self.served, model)
        return await self.server.use_model(model, keep_alive)

    def check_model(self, model: str | None) -> str:
        return self.server.check_model(model)

    def grammar(self, param: str) -> Any:
        return self.served.grammar(param)

    async def run_grammar(self, fn: Callable[..., T], *args: Any) -> T:
        return await self.server.run_grammar(fn, *args)

    def begin(self) -> None:
        self.server.begin()

    def end(self) -> None:
        self.server.end()

    model = property(lambda self: self.served)  # the ServedModel, as ServerState.model is the first one
    cfg = property(lambda self: self.served.cfg)  # per-model settings over the server's
    engine = property(lambda self: self.served.engine)
    tokenizer = property(lambda self: self.served.tokenizer)
    max_model_len = property(lambda self: self.served.max_model_len)
    vocab_size = property(lambda self: self.served.vocab_size)
    pieces = property(lambda self: self.served.pieces)
    guard = property(lambda self: self.served.guard)
    fingerprint = property(lambda self: self.served.fingerprint)
    chat_template = property(lambda self: self.served.chat_template)
    reasoning = property(lambda self: self.served.reasoning)
    metrics = property(lambda self: self.server.metrics)
    draining = property(lambda self: self.server.draining)
    abort_all = property(lambda self: self.server.abort_all)
    created = property(lambda self: self.server.created)
    pool = property(lambda self: self.server.pool)
