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
from dashchat.server.text.control_tokens import ContentGuard
from dashchat.server.text.grammar_compile import CompileLimits
from dashchat.server.text.detokenizer import TokenPieces
from dashchat.server.plumbing.errors import bad_request, model_not_found
from dashchat.server.plumbing.metrics import Metrics
from dashchat.server.text.reasoning import choose_format

log = logging.getLogger("dashchat.server")
T = TypeVar("T")


class ServedModel:
    """One model the server serves: its engine and everything that depends on its tokenizer and chat
    template. The server holds one today; ServerState keeps them by served name so that serving
    several is a change of how they are built, not of what a route asks for."""

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
    """What every route shares: the served models (by served name), config, metrics, shutdown signals.
    Routes read the one model through the properties below; a route for several models would call
    `model_for(name)` instead."""

    def __init__(self, engine: Engine, cfg: ServerConfig, metrics: Metrics | None = None) -> None:
        self.cfg = cfg
        self.model = ServedModel(engine, cfg)
        self.models: dict[str, ServedModel] = {name: self.model for name in cfg.served_model_names}
        self.metrics = metrics or Metrics(engine)
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
            return self.cfg.model_name
        if model not in self.models:
            raise model_not_found(model)
        return model

    def model_for(self, name: str | None) -> ServedModel:
        """The model a request names (missing: the first one), else 404."""
        return self.models[self.check_model(name)]

    # The one model's parts, as routes use them.
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
        for model in set(self.models.values()):
            check = getattr(model.engine, "check_health", None)
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
