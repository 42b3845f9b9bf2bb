"""What a client sees when the engine fails, and what the log keeps: no exception text in bodies,
a dead engine answers 503 (also on /health), and errors are caught where meant, never swallowed."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from contextlib import ExitStack
from typing import Any

import pytest
from server_fakes import ByteTokenizer, ScriptedEngine
from starlette.testclient import TestClient

from dashchat.engine.types import EngineDead, EngineError
from dashchat.server.app import build_app
from dashchat.server.config import ServerConfig
from dashchat.server.text.detokenizer import TokenPieces
from dashchat.server.generation.runner import _cancel

MSG = [{"role": "user", "content": "hi"}]
SECRET = "CUDA error: device-side assert at /home/builder/torch/aten/src/Indexing.cu:1289"
_stack = ExitStack()


@pytest.fixture(autouse=True)
def _close_clients() -> Iterator[None]:
    yield
    _stack.close()


def client(engine: Any) -> TestClient:
    return _stack.enter_context(TestClient(build_app(engine, ServerConfig(served_model_names=["m"]))))


class Failing(ScriptedEngine):
    def __init__(self, error: BaseException) -> None:
        super().__init__()
        self.error = error

    async def generate(self, prompt, params, request_id):  # type: ignore[override]
        raise self.error
        yield  # an async generator, like every engine's


@pytest.mark.parametrize("error, status, code", [
    (EngineError(SECRET), 503, "engine_error"),
    (EngineDead(SECRET), 503, "engine_failed"),
    (RuntimeError(SECRET), 500, None),
])
def test_engine_error_text_goes_to_the_log_not_the_client(error, status, code, caplog) -> None:
    caplog.set_level(logging.ERROR, logger="dashchat.server")
    c = client(Failing(error))
    r = c.post("/v1/chat/completions", json={"messages": MSG})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == code and err["type"] == "server_error"
    assert "Indexing.cu" not in r.text and "CUDA" not in r.text
    with c.stream("POST", "/v1/chat/completions", json={"messages": MSG, "stream": True}) as s:
        assert "Indexing.cu" not in s.read().decode()
    logged = "\n".join(rec.getMessage() + str(rec.exc_info and rec.exc_info[1]) for rec in caplog.records)
    assert "Indexing.cu" in logged and "chatcmpl-" in logged  # the details, with the request id


def test_dead_engine_turns_health_to_503() -> None:
    class Dead(Failing):
        def check_health(self) -> None:
            raise EngineDead("step thread died")

    c = client(Dead(EngineDead("step thread died")))
    r = c.get("/health")
    assert r.status_code == 503 and r.json() == {"status": "engine_failed"}
    r = c.post("/v1/chat/completions", json={"messages": MSG})
    assert r.status_code == 503 and r.json()["error"]["code"] == "engine_failed"
    assert client(ScriptedEngine()).get("/health").status_code == 200


def test_cancel_propagates_the_callers_own_cancellation() -> None:
    """The producer takes a while to end; meanwhile the caller itself is cancelled (forced
    shutdown): that cancellation must reach the caller, not be eaten with the producer's."""

    async def main() -> None:
        release = asyncio.Event()

        async def producer() -> None:
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                await release.wait()  # slow clean-up
                raise

        task = asyncio.create_task(producer())
        await asyncio.sleep(0)
        outer = asyncio.create_task(_cancel(task, "req-1"))
        await asyncio.sleep(0)
        outer.cancel()
        release.set()
        with pytest.raises(asyncio.CancelledError):
            await outer

    asyncio.run(main())


def test_cancel_logs_what_the_producer_raised(caplog) -> None:
    caplog.set_level(logging.ERROR, logger="dashchat.server")

    async def main() -> None:
        async def producer() -> None:
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                raise ValueError("broken clean-up") from None

        task = asyncio.create_task(producer())
        await asyncio.sleep(0)
        await _cancel(task, "req-2")  # the expected cancellation ends quietly; the error is logged

    asyncio.run(main())
    (rec,) = [r for r in caplog.records if "req-2" in r.getMessage()]
    assert isinstance(rec.exc_info[1], ValueError)


def test_detokenizer_does_not_hide_tokenizer_failures() -> None:
    class Broken(ByteTokenizer):
        def token_bytes(self, token_id: int) -> bytes:
            if token_id == 65:
                raise RuntimeError("tokenizer bug")
            return super().token_bytes(token_id)

    pieces = TokenPieces(Broken())
    assert pieces.raw(66) == b"B"
    assert pieces.raw(pieces.tokenizer.vocab_size + 5) == b""  # padded logits row: no text, by design
    with pytest.raises(RuntimeError, match="tokenizer bug"):
        pieces.raw(65)
