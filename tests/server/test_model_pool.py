"""The model pool over real engines (tiny random chat models), in process, where a test can hold a
response's stream open for certain: its `send` waits on the test. And what a models folder or file
names (projectors skipped, split GGUFs once, bad entries refused).

The end-to-end checks on a real server are in test_e2e_multi_model.py.
"""

from __future__ import annotations

import asyncio
import functools
import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from tiny_models import save_stub_gguf, save_tiny_chat_model

from dashchat.engine.args import EngineArgs
from dashchat.engine.native.llm_engine import AsyncLLMEngine
from dashchat.models.catalog import CatalogError, read_models_file, scan_models_dir
from dashchat.server.app import build_app
from dashchat.server.config import ServerConfig
from dashchat.server.model_pool import FOREVER, ModelPool, ModelSpec, parse_keep_alive
from dashchat.server.plumbing.errors import APIError

MSG = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("tiny-chat")
    save_tiny_chat_model(d)
    return d


def _pool(tiny: Path, built: list[Any], memory: int = 0, **kw: Any) -> ModelPool:
    def build(name: str) -> AsyncLLMEngine:
        engine = AsyncLLMEngine(EngineArgs(model_dir=str(tiny), device="cpu", kv_cache_memory_gb=0.05, num_threads=1))
        built.append((name, engine))
        return engine

    specs = [ModelSpec([n], ServerConfig([n]), functools.partial(build, n), memory_bytes=memory, keep_alive=FOREVER)
             for n in ("alpha", "beta")]
    return ModelPool(specs, **kw)


class _HeldStream:
    """An ASGI call of one streaming request whose `send` stops after the first chunk until released."""

    def __init__(self, app: Any, body: dict[str, Any]) -> None:
        self.app, self.body = app, json.dumps(body).encode()
        self.first = asyncio.Event()
        self.gate = asyncio.Event()
        self.chunks: list[bytes] = []
        self.status = 0

    async def run(self) -> None:
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
                 "scheme": "http", "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions",
                 "query_string": b"", "root_path": "", "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80),
                 "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(self.body)).encode())]}
        sent = False
        hang = asyncio.Event()

        async def receive() -> dict[str, Any]:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": self.body, "more_body": False}
            await hang.wait()  # the client never leaves
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                self.status = message["status"]
            elif message.get("body"):
                self.chunks.append(message["body"])
                if not self.first.is_set():
                    self.first.set()
                    await self.gate.wait()

        await self.app(scope, receive, send)


def _status(models: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {m["id"]: m["status"] for m in models["data"]}


async def _until(check: Any, what: str, timeout: float = 60.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await check():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for: {what}")
        await asyncio.sleep(0.05)


def test_a_held_stream_keeps_its_model_and_unloading_stops_the_engine(tiny: Path) -> None:
    built: list[Any] = []
    pool = _pool(tiny, built, max_loaded=1)
    app = build_app(pool, ServerConfig(["alpha", "beta"]))

    async def scenario() -> None:
        http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t", timeout=60)

        async def status() -> dict[str, dict[str, Any]]:
            return _status((await http.get("/v1/models")).json())

        # two requests for an unloaded model share one load
        chat = {"model": "beta", "messages": MSG, "max_tokens": 2}
        r1, r2 = await asyncio.gather(http.post("/v1/chat/completions", json=chat),
                                      http.post("/v1/chat/completions", json=chat))
        assert r1.status_code == r2.status_code == 200 and [n for n, _ in built] == ["beta"]
        json_chat = {**chat, "response_format": {"type": "json_object"}}  # starts beta's grammar threads
        assert (await http.post("/v1/chat/completions", json=json_chat)).status_code == 200
        grammar_threads = list(pool.entry("beta").served._grammar.compiles.pool.threads)
        assert grammar_threads and all(t.is_alive() for t in grammar_threads)

        held = _HeldStream(app, {"model": "alpha", "messages": MSG, "max_tokens": 8, "stream": True,
                                 "ignore_eos": True})
        task = asyncio.create_task(held.run())
        await held.first.wait()  # alpha loaded (beta, idle, unloaded for it: one slot) and streaming
        beta_engine = built[0][1]
        assert beta_engine._stopped and not beta_engine._thread.is_alive()  # the engine is really down

        async def grammar_threads_ended() -> bool:
            return not any(t.is_alive() for t in grammar_threads)

        await _until(grammar_threads_ended, "beta's grammar compile threads end")
        s = await status()
        assert s["alpha"]["loaded"] and s["alpha"]["in_flight"] == 1 and not s["beta"]["loaded"]
        busy = await http.post("/v1/chat/completions", json=chat)  # the one slot is in use
        assert busy.status_code == 503 and int(busy.headers["retry-after"]) > 0
        assert busy.json()["error"]["code"] == "model_unavailable"
        unload = await http.post("/api/generate", json={"model": "alpha", "prompt": "", "keep_alive": 0})
        assert unload.json()["done_reason"] == "unload"
        assert (await status())["alpha"]["loaded"]  # a request uses it: the client's unload is ignored
        held.gate.set()
        await task
        text = b"".join(held.chunks).decode()
        assert held.status == 200 and text.endswith("data: [DONE]\n\n") and '"finish_reason":"length"' in text
        assert '"error"' not in text
        s = await status()
        assert s["alpha"]["loaded"] and s["alpha"]["in_flight"] == 0

        # --allow-client-unload: keep_alive 0 during another's stream unloads once that stream ends
        pool.allow_client_unload = True
        held = _HeldStream(app, {"model": "alpha", "messages": MSG, "max_tokens": 4, "stream": True})
        task = asyncio.create_task(held.run())
        await held.first.wait()
        await http.post("/api/generate", json={"model": "alpha", "prompt": "", "keep_alive": 0})
        assert (await status())["alpha"]["loaded"]
        held.gate.set()
        await task
        alpha_engine = built[1][1]

        async def alpha_down() -> bool:
            return not (await status())["alpha"]["loaded"] and not alpha_engine._thread.is_alive()

        await _until(alpha_down, "alpha unloads once the stream has ended")
        metrics = (await http.get("/metrics")).text
        assert 'dashchat_model_unloads_total{model="alpha",reason="client"} 1.0' in metrics
        await http.aclose()

    try:
        asyncio.run(scenario())
    finally:
        pool.shutdown()


def test_memory_budget_unloads_the_least_recently_used(tiny: Path) -> None:
    built: list[Any] = []
    pool = _pool(tiny, built, memory=600, max_memory_bytes=1000)

    async def scenario() -> None:
        a = await pool.acquire("alpha")
        a.release()
        b = await pool.acquire("beta")  # 600 + 600 > 1000: the idle alpha goes first
        assert [e.name for e in pool.loaded()] == ["beta"] and not built[0][1]._thread.is_alive()
        with pytest.raises(APIError) as err:  # beta is in use: no room for alpha
            await pool.acquire("alpha")
        assert err.value.status == 503 and "memory budget" in err.value.message and err.value.headers["Retry-After"]
        b.release()
        with pytest.raises(APIError) as err:
            await pool.acquire("gamma")
        assert err.value.status == 404

    try:
        asyncio.run(scenario())
    finally:
        pool.shutdown()
    with pytest.raises(ValueError, match="more than the memory budget"):
        _pool(tiny, [], memory=2000, max_memory_bytes=1000)


def test_keep_alive_parsing() -> None:
    assert parse_keep_alive(None) is None and parse_keep_alive(0) == 0 and parse_keep_alive("0") == 0
    assert parse_keep_alive("5m") == 300 and parse_keep_alive("1h30m") == 5400 and parse_keep_alive(2.5) == 2.5
    assert parse_keep_alive(-1) == FOREVER and parse_keep_alive("-1s") == FOREVER
    for bad in ("soon", "5", "-1", "1x"):
        with pytest.raises(ValueError):
            parse_keep_alive(bad)


def test_models_dir_skips_projectors_and_counts_split_ggufs_once(tmp_path: Path) -> None:
    save_stub_gguf(tmp_path / "small.gguf", "llama")
    save_stub_gguf(tmp_path / "mmproj-small-f16.gguf", "clip")
    save_stub_gguf(tmp_path / "adapter.gguf", "clip")
    for part in (1, 2, 3):
        save_stub_gguf(tmp_path / f"big-0000{part}-of-00003.gguf", "llama")
    (tmp_path / "vision").mkdir()  # a folder with its model GGUF and its projector: the model
    save_stub_gguf(tmp_path / "vision" / "model-q4.gguf", "gemma3")
    save_stub_gguf(tmp_path / "vision" / "mmproj.gguf", "clip")
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("x")
    found = {e.names[0]: Path(e.path).name for e in scan_models_dir(tmp_path) if e.names}
    assert found == {"small": "small.gguf", "big": "big-00001-of-00003.gguf", "vision": "model-q4.gguf"}


def test_models_file(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    f = tmp_path / "models.yaml"
    f.write_text("models:\n  - path: m\n    served_model_name: mine\n    keep_alive: 60\n"
                 "    args: {quantization: int8}\n  - path: smollm2-135m-instruct\n")
    a, b = read_models_file(f)
    assert (a.path, a.names, a.keep_alive, a.args) == (str(tmp_path / "m"), ["mine"], 60.0, {"quantization": "int8"})
    assert (b.path, b.names) == ("smollm2-135m-instruct", None)
    j = tmp_path / "models.json"
    j.write_text(json.dumps({"models": [{"path": "m", "served_model_name": ["x", "y"]}]}))
    assert read_models_file(j)[0].names == ["x", "y"]
    for text, said in (("models: []", "expected"), ("models:\n  - {name: x}", "needs a 'path'"),
                       ("models:\n  - {path: m, port: 1}", "unknown key"), ("models: [", "not valid"),
                       ("models:\n  - {path: m, keep_alive: soon}", "keep_alive: a number")):
        f.write_text(text)
        with pytest.raises(CatalogError, match=said):
            read_models_file(f)


def test_command_line_several_models_and_per_model_settings() -> None:
    from dashchat.openai_server import _ArgError, _model_args, _model_entries, build_parser

    parser = build_parser()
    entries, several = _model_entries(parser.parse_args(["--model-path", "a", "--model-path", "b"]))
    assert [e.path for e in entries] == ["a", "b"] and several  # each one served, not the last alone
    assert _model_entries(parser.parse_args(["--model-path", "a"]))[1] is False
    with pytest.raises(_ArgError, match="--served-model-name"):
        _model_entries(parser.parse_args(["--model-path", "a", "--model-path", "b", "--served-model-name", "x"]))
    base = parser.parse_args(["--max-model-len", "4096"])
    ns = _model_args(parser, base, {"max_model_len": 512, "compile": True, "device-list": [0, 1],
                                    "speculative_config": {"method": "ngram"}}, "model m")
    assert (ns.max_model_len, ns.compile, ns.device_list) == (512, True, ["0", "1"])
    assert json.loads(ns.speculative_config) == {"method": "ngram"} and base.max_model_len == 4096
    for bad, said in (({"quantization": "int3"}, "invalid choice"), ({"port": 1}, "not a per-model setting"),
                      ({"compile": "yes"}, "true or false")):
        with pytest.raises(_ArgError, match=said):
            _model_args(parser, base, bad, "model m")
