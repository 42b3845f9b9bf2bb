"""/tokenize and /detokenize in-process: shapes, the chat render shared with generation, auth, errors."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack
from typing import Any

import pytest
from server_fakes import ScriptedEngine
from starlette.testclient import TestClient

from dashchat.server.app import build_app
from dashchat.server.config import ServerConfig

MSG = [{"role": "user", "content": "hi"}]
_stack = ExitStack()


@pytest.fixture(autouse=True)
def _close_clients() -> Iterator[None]:
    yield
    _stack.close()


def client(engine: ScriptedEngine | None = None, **cfg: Any) -> TestClient:
    cfg.setdefault("served_model_names", ["m"])
    return _stack.enter_context(TestClient(build_app(engine or ScriptedEngine(), ServerConfig(**cfg))))


def test_messages_count_is_the_prompt_generation_sees() -> None:
    engine = ScriptedEngine()
    c = client(engine)
    kwargs = {"enable_thinking": False}
    r = c.post("/tokenize", json={"model": "m", "messages": MSG, "chat_template_kwargs": kwargs})
    assert r.status_code == 200
    body = r.json()
    assert set(body) == {"count", "max_model_len", "tokens", "token_strs"}
    c.post("/v1/chat/completions", json={"messages": MSG, "chat_template_kwargs": kwargs})
    assert body["tokens"] == engine.last_prompt and body["count"] == len(engine.last_prompt)
    assert body["max_model_len"] == engine.max_model_len


def test_detokenize_keeps_special_tokens() -> None:
    c = client()
    ids = c.post("/tokenize", json={"prompt": "Hello world"}).json()["tokens"]
    assert c.post("/detokenize", json={"tokens": ids + [256]}).json() == {"prompt": "Hello world<|end|>"}


def test_keys_guard_tokenize_too() -> None:
    c = client(api_keys=["k"])
    for path, body in (("/tokenize", {"prompt": "x"}), ("/detokenize", {"tokens": [65]})):
        r = c.post(path, json=body)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        assert c.post(path, json=body, headers={"Authorization": "Bearer k"}).status_code == 200


def test_too_many_messages_or_tools_is_400() -> None:
    c = client(max_messages=2, max_tools=1)
    r = c.post("/tokenize", json={"messages": MSG * 3})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    tool = {"type": "function", "function": {"name": "f"}}
    r = c.post("/tokenize", json={"messages": MSG, "tools": [tool, tool]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tools"
