"""Ollama's API in-process over scripted model outputs: the shapes the small real model does not
produce by itself (tool calls, thinking with Qwen3's real template), errors mid-stream, --api-key,
the request translation and generate's Go-template subset. Responses are parsed with the `ollama`
client's own response types. (test_e2e_ollama.py runs the client itself against the real server.)"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import ollama
import pytest
from server_fakes import ScriptedEngine
from starlette.testclient import TestClient
from tiny_qwen3 import QWEN3_TEMPLATE

from dashchat.server.app import build_app
from dashchat.server.config import ServerConfig
from dashchat.server.routes.ollama import ChatRequest, chat_messages
from dashchat.server.routes.ollama_template import render_go_template

CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
THOUGHT = "<think>\nParis is in France.\n</think>\n\n"
TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
MSGS = [{"role": "user", "content": "Weather in Paris?"}]


@contextmanager
def served(reply: str, **cfg: Any) -> Iterator[tuple[TestClient, ScriptedEngine]]:
    engine = ScriptedEngine(reply, max_model_len=4096, delay=cfg.pop("delay", 0.0))
    with TestClient(build_app(engine, ServerConfig(**{"served_model_names": ["m"], **cfg}))) as http:
        yield http, engine


def lines(r: Any) -> list[dict[str, Any]]:
    assert r.status_code == 200 and r.headers["content-type"] == "application/x-ndjson", r.text
    return [json.loads(x) for x in r.text.splitlines() if x]


def test_tool_call_whole_and_streamed() -> None:
    with served("Let me check. " + CALL) as (http, _):
        body = {"model": "m", "messages": MSGS, "tools": [TOOL]}
        r = ollama.ChatResponse(**http.post("/api/chat", json={**body, "stream": False}).json())
        assert r.message.content == "Let me check." and r.done_reason == "stop"
        (call,) = r.message.tool_calls
        assert call.function.name == "get_weather" and call.function.arguments == {"city": "Paris"}
        parts = [ollama.ChatResponse(**x) for x in lines(http.post("/api/chat", json=body))]
    calls = [c for p in parts for c in p.message.tool_calls or []]
    assert [c.function.arguments for c in calls] == [{"city": "Paris"}]  # one whole call, in one line
    assert "".join(p.message.content for p in parts) == "Let me check."
    assert parts[-1].done and not any(p.done for p in parts[:-1]) and parts[-1].done_reason == "stop"


def test_thinking_field_and_think_switch() -> None:
    with served(THOUGHT + "Sunny.", chat_template=QWEN3_TEMPLATE) as (http, engine):
        r = ollama.ChatResponse(**http.post("/api/chat", json={"model": "m", "messages": MSGS, "stream": False}).json())
        assert r.message.thinking == "Paris is in France." and r.message.content == "Sunny."
        parts = [ollama.GenerateResponse(**x) for x in
                 lines(http.post("/api/generate", json={"model": "m", "prompt": "Weather?", "think": True}))]
        assert "".join(p.thinking or "" for p in parts) == "Paris is in France."
        assert "".join(p.response for p in parts) == "Sunny."
        body = http.post("/api/chat", json={"model": "m", "messages": MSGS, "stream": False, "think": False}).json()
        # think false reaches the template (Qwen3: an empty think block) and no thinking is returned
        assert engine.tokenizer.decode(engine.last_prompt).endswith("<think>\n\n</think>\n\n")
        assert "thinking" not in body["message"]
        show = http.post("/api/show", json={"model": "m"}).json()
        assert "thinking" in show["capabilities"]


def test_errors_mid_stream_and_whole() -> None:
    """A timeout after the first line is an error line (the client raises it); without streaming it
    keeps its HTTP status, since nothing was sent before it."""
    with served("Hello world " * 20, delay=0.05, request_timeout_s=0.5) as (http, _):
        out = lines(http.post("/api/chat", json={"model": "m", "messages": MSGS}))
        assert set(out[-1]) == {"error"} and "did not finish" in out[-1]["error"]
        assert not any(x.get("done") for x in out)
        r = http.post("/api/generate", json={"model": "m", "prompt": "hi", "stream": False})
        assert r.status_code == 408 and list(r.json()) == ["error"]


def test_api_key_on_every_route() -> None:
    with served("Hi", api_keys=["k"]) as (http, _):
        for method, path in [("GET", "/api/tags"), ("GET", "/api/ps"), ("GET", "/api/version"), ("POST", "/api/chat"),
                             ("POST", "/api/generate"), ("POST", "/api/show"), ("POST", "/api/embed")]:
            r = http.request(method, path, json={"model": "m"})
            assert r.status_code == 401 and list(r.json()) == ["error"], path
            ok = http.request(method, path, json={"model": "m"}, headers={"Authorization": "Bearer k"})
            assert ok.status_code != 401, path


def test_message_translation() -> None:
    req = ChatRequest.model_validate({"model": "m", "messages": [
        {"role": "System", "content": "Be brief."},
        {"role": "user", "content": "Weather in Oslo and Rome?"},
        {"role": "assistant", "content": "", "thinking": "two calls", "tool_calls": [
            {"function": {"name": "get_weather", "arguments": {"city": "Oslo"}}},
            {"function": {"name": "get_time", "arguments": {"city": "Rome"}}}]},
        {"role": "tool", "tool_name": "get_time", "content": "noon"},
        {"role": "tool", "content": "cold"},
    ]})
    out = chat_messages(req)
    assert out[0] == {"role": "system", "content": "Be brief."}
    assert out[2]["reasoning_content"] == "two calls"
    assert [c["function"]["arguments"] for c in out[2]["tool_calls"]] == ['{"city": "Oslo"}', '{"city": "Rome"}']
    ids = [c["id"] for c in out[2]["tool_calls"]]
    assert out[3] == {"role": "tool", "content": "noon", "tool_call_id": ids[1], "name": "get_time"}
    assert out[4]["tool_call_id"] == ids[0]  # no name: the first call


def test_options_and_format_reach_the_engine() -> None:
    with served('{"city": "Paris"}') as (http, engine):
        http.post("/api/chat", json={"model": "m", "messages": MSGS, "stream": False, "format": TOOL["function"]["parameters"],
                                     "options": {"num_predict": 30, "temperature": 0.3, "top_k": 7, "top_p": 0.5,
                                                 "min_p": 0.1, "seed": 3, "repeat_penalty": 1.2, "presence_penalty": 0.4,
                                                 "frequency_penalty": 0.2, "num_ctx": 99, "mirostat": 2}})
        p = engine.last_params
        assert p is not None and p.logits_processor_factories  # the schema's grammar
        assert (p.max_tokens, p.temperature, p.top_k, p.top_p, p.min_p, p.seed) == (30, 0.3, 7, 0.5, 0.1, 3)
        assert (p.repetition_penalty, p.presence_penalty, p.frequency_penalty) == (1.2, 0.4, 0.2)
        http.post("/api/generate", json={"model": "m", "prompt": "hi", "stream": False,
                                         "options": {"seed": -1, "num_predict": -1}})
        assert engine.last_params.seed is None and engine.last_params.max_tokens > 1000  # type: ignore[union-attr]


def test_model_names() -> None:
    with served("Hi", served_model_names=["m", "other:7b"]) as (http, _):
        names = [x["name"] for x in http.get("/api/tags").json()["models"]]
        assert names == ["m:latest", "other:7b"]
        for name in ("m", "m:latest", "other:7b"):
            assert http.post("/api/show", json={"model": name}).status_code == 200, name
        for name in ("other", "m:7b", "other:latest"):
            r = http.post("/api/show", json={"model": name})
            assert r.status_code == 404 and r.json() == {"error": f'model "{name}" not found, try pulling it first'}


@pytest.mark.parametrize("template, expected", [
    ("{{ .System }}|{{ .Prompt }}", "S|P"),
    ("{{ if .System }}<s>{{ .System }}</s>{{ end }}<u>{{ .Prompt }}</u><a>{{ .Response }}</a>", "<s>S</s><u>P</u><a>"),
    ("{{- /* c */ -}} A {{- .Prompt -}} B", "APB"),
    ("{{ if .Missing }}", None),
    ("{{ range .Messages }}{{ end }}", None),
    ("{{ if .System }}x", None),
])
def test_go_template_subset(template: str, expected: str | None) -> None:
    if expected is None:
        from dashchat.server.plumbing.errors import APIError

        with pytest.raises(APIError):
            render_go_template(template, "S", "P")
    else:
        assert render_go_template(template, "S", "P") == expected
    assert render_go_template("{{ if .System }}[{{ .System }}]{{ else }}none{{ end }}", "", "P") == "none"
