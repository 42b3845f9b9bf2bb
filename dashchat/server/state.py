"""What every route shares: the engine, its tokenizer, config, metrics, shutdown signals."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Any

from dashchat import __version__
from dashchat.engine.types import Engine, EngineDead
from dashchat.server.config import ServerConfig
from dashchat.server.text.detokenizer import TokenPieces
from dashchat.server.plumbing.errors import bad_request, model_not_found
from dashchat.server.plumbing.metrics import Metrics
from dashchat.server.text.reasoning import choose_format

log = logging.getLogger("dashchat.server")


class ServerState:
    def __init__(self, engine: Engine, cfg: ServerConfig, metrics: Metrics | None = None) -> None:
        self.engine = engine
        self.cfg = cfg
        self.tokenizer: Any = engine.tokenizer  # type: ignore[attr-defined]
        self.max_model_len: int = engine.max_model_len
        self.vocab_size: int = getattr(engine, "vocab_size", None) or self.tokenizer.vocab_size
        self.pieces = TokenPieces(self.tokenizer)
        self.metrics = metrics or Metrics(engine)
        self.created = int(time.time())
        self.fingerprint = f"fp_dashchat_{__version__}_{getattr(engine, 'name', 'engine')}"
        # Shutdown: draining refuses new generations; abort_all ends the ones still running.
        self.draining = False
        self.abort_all = asyncio.Event()
        self.inflight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._grammar: Any = None
        self._grammar_error: str | None = None
        # Reasoning models: how this model marks its thinking (None: it does not think).
        self.chat_template: str | None = cfg.chat_template or getattr(self.tokenizer, "chat_template", None)
        self.reasoning = choose_format(cfg.reasoning_parser, self.chat_template)
        if self.reasoning is not None:
            log.info("reasoning parser: %s", self.reasoning.name)
        self._grammar_lock = threading.Lock()

    # -- models -------------------------------------------------------------
    def check_model(self, model: str | None) -> str:
        """The served name a request asked for (missing: the first one), else 404."""
        if model is None:
            return self.cfg.model_name
        if model not in self.cfg.served_model_names:
            raise model_not_found(model)
        return model

    def engine_healthy(self) -> bool:
        """False once the engine has died (engines without `check_health` are taken as alive)."""
        check = getattr(self.engine, "check_health", None)
        if check is None:
            return True
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

    # -- structured output ----------------------------------------------------
    def grammar(self, param: str) -> Any:
        """The GrammarBackend, built on first use (it indexes the vocabulary once)."""
        with self._grammar_lock:  # called from worker threads (compiles run off the event loop)
            if self._grammar is None and self._grammar_error is None:
                try:
                    from dashchat.server.text.grammar import GrammarBackend

                    self._grammar = GrammarBackend(self.tokenizer, self.vocab_size)
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
