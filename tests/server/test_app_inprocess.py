"""The HTTP layer in-process over a scripted engine: shapes, errors, limits, auth, timeouts.

Fast and deterministic; the same behaviours are checked against the real engine in test_e2e_*.py.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import ExitStack
from typing import Any

import pytest
from server_fakes import ScriptedEngine
from starlette.testclient import TestClient

from dashchat.server.app import build_app, server_state
from dashchat.server.config import ServerConfig

MSG = [{"role": "user", "content": "hi"}]


_stack = ExitStack()


def client(engine: ScriptedEngine | None = None, **cfg: Any) -> TestClient:
    """A client whose app runs on one event loop for the whole test (as under uvicorn)."""
    cfg.setdefault("served_model_names", ["m", "alias"])
    return _stack.enter_context(TestClient(build_app(engine or ScriptedEngine(), ServerConfig(**cfg))))


@pytest.fixture(autouse=True)
def _close_clients() -> Iterator[None]:
    yield
    _stack.close()


def sse(text: str) -> list[Any]:
    events = []
    for block in text.split("\n\n"):
        if block.strip():
            assert block.startswith("data: "), block
            data = block[len("data: "):]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def test_chat_shape() -> None:
    r = client().post("/v1/chat/completions", json={"model": "m", "messages": MSG})
    assert r.status_code == 200
    body = r.json()
    assert body["id"].startswith("chatcmpl-") and body["object"] == "chat.completion"
    assert set(body) == {"id", "object", "created", "model", "system_fingerprint", "choices", "usage"}
    (choice,) = body["choices"]
    assert choice == {"index": 0, "message": {"role": "assistant", "content": "Hello world", "refusal": None},
                      "logprobs": None, "finish_reason": "stop"}
    u = body["usage"]
    assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]
    assert r.headers["x-request-id"]


def test_stream_shape_and_usage() -> None:
    with client().stream("POST", "/v1/chat/completions", json={
        "model": "alias", "messages": MSG, "stream": True, "n": 2, "stream_options": {"include_usage": True},
    }) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = sse(r.read().decode())
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert len({c["id"] for c in chunks}) == 1 and len({c["created"] for c in chunks}) == 1
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == "alias" for c in chunks)
    assert all("usage" in c for c in chunks)
    *choice_chunks, usage_chunk = chunks
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["completion_tokens"] > 0
    assert all(c["usage"] is None for c in choice_chunks)
    for idx in (0, 1):
        mine = [c["choices"][0] for c in choice_chunks if c["choices"][0]["index"] == idx]
        assert mine[0]["delta"]["role"] == "assistant"
        assert mine[-1]["finish_reason"] == "stop"
        assert all(m["finish_reason"] is None for m in mine[:-1])
        assert "".join(m["delta"].get("content", "") for m in mine) == "Hello world"


def test_stop_string_spanning_tokens_never_streams() -> None:
    with client(ScriptedEngine("Hello world 你好😀 end")).stream("POST", "/v1/chat/completions", json={
        "messages": MSG, "stream": True, "stop": ["好😀"],
    }) as r:
        events = sse(r.read().decode())[:-1]
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events)
    assert text == "Hello world 你"
    assert events[-1]["choices"][0]["finish_reason"] == "stop"


def test_stop_string_inside_a_several_token_output_counts_only_up_to_it() -> None:
    """Speculative decoding hands several tokens per output: a stop string among them ends the
    choice at its own token (usage and logprobs stop there too)."""
    body = {"model": "m", "messages": MSG, "stop": [" wor"], "logprobs": True, "max_tokens": 50}
    one = client(ScriptedEngine("Hello world, again")).post("/v1/chat/completions", json=body).json()
    four = client(ScriptedEngine("Hello world, again", tokens_per_output=4)).post("/v1/chat/completions",
                                                                                 json=body).json()
    assert four["choices"][0]["message"]["content"] == one["choices"][0]["message"]["content"] == "Hello"
    assert four["usage"]["completion_tokens"] == one["usage"]["completion_tokens"]
    assert len(four["choices"][0]["logprobs"]["content"]) == len(one["choices"][0]["logprobs"]["content"])
    assert four["choices"][0]["finish_reason"] == "stop"


def test_chinese_and_emoji_intact_in_stream() -> None:
    with client(ScriptedEngine("你好😀")).stream("POST", "/v1/chat/completions",
                                                 json={"messages": MSG, "stream": True}) as r:
        pieces = [e["choices"][0]["delta"].get("content", "") for e in sse(r.read().decode())[:-1]]
    assert "".join(pieces) == "你好😀"
    assert all("\ufffd" not in p for p in pieces)


def test_logprobs_shape() -> None:
    r = client().post("/v1/chat/completions", json={"messages": MSG, "logprobs": True, "top_logprobs": 2})
    content = r.json()["choices"][0]["logprobs"]["content"]
    assert [e["token"] for e in content] == ["Hello", " world"]
    e = content[0]
    assert set(e) == {"token", "logprob", "bytes", "top_logprobs"} and e["bytes"] == list(b"Hello")
    assert len(e["top_logprobs"]) == 2 and set(e["top_logprobs"][0]) == {"token", "logprob", "bytes"}


def test_length_and_params_reach_engine() -> None:
    eng = ScriptedEngine()
    r = client(eng).post("/v1/chat/completions", json={
        "messages": MSG, "max_completion_tokens": 1, "temperature": 0.5, "top_p": 0.9, "top_k": 5,
        "min_p": 0.1, "seed": 7, "presence_penalty": 0.5, "frequency_penalty": -0.5,
        "repetition_penalty": 1.1, "logit_bias": {"65": 5}, "ignore_eos": True, "min_tokens": 1, "user": "u",
    })
    assert r.json()["choices"][0]["finish_reason"] == "length"
    p = eng.last_params
    assert p is not None
    assert (p.max_tokens, p.temperature, p.top_p, p.top_k, p.min_p, p.seed) == (1, 0.5, 0.9, 5, 0.1, 7)
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == (0.5, -0.5, 1.1)
    assert p.logit_bias == {65: 5.0} and p.ignore_eos and p.min_tokens == 1


def test_completions_prompt_forms() -> None:
    c = client()
    for prompt in ["ab", [97, 98], ["ab", "cd"]]:
        r = c.post("/v1/completions", json={"model": "m", "prompt": prompt, "max_tokens": 1, "n": 2})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
        n_prompts = 2 if isinstance(prompt, list) and isinstance(prompt[0], str) else 1
        assert [ch["index"] for ch in body["choices"]] == list(range(2 * n_prompts))
        assert all(ch["text"] == "Hello" and ch["finish_reason"] == "length" for ch in body["choices"])


def error_of(r: Any, status: int, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    if param is not None:
        assert err["param"] == param
    if code is not None:
        assert err["code"] == code
    return err


@pytest.mark.parametrize("body,param", [
    ({"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}, "temperature"),
    ({"messages": [{"role": "user", "content": "x"}], "temperature": 3}, "temperature"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
    ({"messages": "hello"}, "messages"),
    ({}, "messages"),
    ({"messages": MSG, "n": 0}, "n"),
    ({"messages": MSG, "n": 100}, "n"),
    ({"messages": MSG, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"messages": MSG, "logit_bias": {"x": 1}}, "logit_bias"),
    ({"messages": MSG, "logit_bias": {"99999": 1}}, "logit_bias"),
    ({"messages": MSG, "top_logprobs": 21}, "top_logprobs"),
    ({"messages": MSG, "max_tokens": 0}, "max_tokens"),
    ({"messages": MSG, "tool_choice": "auto"}, "tool_choice"),
    ({"messages": MSG, "tools": [{"type": "function", "function": {"name": "f"}}],
      "tool_choice": {"type": "function", "function": {"name": "g"}}}, "tool_choice"),
    ({"messages": MSG, "function_call": {"name": "g"}}, "function_call"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content"),
])
def test_bad_requests_name_the_param(body: dict[str, Any], param: str) -> None:
    error_of(client().post("/v1/chat/completions", json=body), 400, param)


def test_malformed_json_and_non_object() -> None:
    c = client()
    for raw in [b"{bad", b"[1]", b"", b"null"]:
        r = c.post("/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
        err = error_of(r, 400)
        assert err["type"] == "invalid_request_error"


def test_unknown_model_and_routes() -> None:
    c = client()
    error_of(c.post("/v1/chat/completions", json={"model": "nope", "messages": MSG}), 404, "model", "model_not_found")
    error_of(c.get("/v1/models/nope"), 404, code="model_not_found")
    assert c.get("/v1/models/alias").json()["id"] == "alias"
    assert [m["id"] for m in c.get("/v1/models").json()["data"]] == ["m", "alias"]
    error_of(c.get("/v2/nothing"), 404)
    error_of(c.get("/v1/chat/completions"), 405)


def test_context_length_exceeded() -> None:
    c = client(ScriptedEngine(max_model_len=64))
    error_of(c.post("/v1/chat/completions", json={"messages": MSG, "max_tokens": 60}), 400,
             code="context_length_exceeded")
    error_of(c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x" * 100}]}), 400,
             code="context_length_exceeded")
    error_of(c.post("/v1/completions", json={"prompt": [1] * 70}), 400, "prompt", "context_length_exceeded")


def test_overloaded_is_429_with_retry_after() -> None:
    r = client(ScriptedEngine(max_running=0)).post("/v1/chat/completions", json={"messages": MSG, "stream": True})
    error_of(r, 429, code="rate_limit_exceeded")
    assert r.headers["retry-after"] == "1"


def test_engine_abort_never_leaks() -> None:
    class Aborting(ScriptedEngine):
        async def generate(self, prompt, params, request_id):  # type: ignore[override]
            from dashchat.engine.types import CompletionDelta, RequestOutput

            yield RequestOutput(request_id, len(prompt), 0, [CompletionDelta(0, [72], None, None)], False)
            yield RequestOutput(request_id, len(prompt), 0, [CompletionDelta(0, [], None, "abort")], True)

    c = client(Aborting())
    err = error_of(c.post("/v1/chat/completions", json={"messages": MSG}), 503)
    assert err["type"] == "server_error"
    with c.stream("POST", "/v1/chat/completions", json={"messages": MSG, "stream": True}) as r:
        events = sse(r.read().decode())
    assert "error" in events[-2] and events[-1] == "[DONE]"
    assert all(e.get("choices", [{}])[0].get("finish_reason") != "abort" for e in events if "choices" in e)


def test_request_timeout() -> None:
    eng = ScriptedEngine("Hello world", delay=0.2)
    c = client(eng, request_timeout_s=0.3)
    error_of(c.post("/v1/chat/completions", json={"messages": MSG}), 408, code="request_timeout")
    with c.stream("POST", "/v1/chat/completions", json={"messages": MSG, "stream": True}) as r:
        events = sse(r.read().decode())
    assert events[-2]["error"]["code"] == "request_timeout" and events[-1] == "[DONE]"
    assert eng.aborted and not eng.running


def test_auth() -> None:
    c = client(api_keys=["k1", "k2"])
    error_of(c.post("/v1/chat/completions", json={"messages": MSG}), 401, code="invalid_api_key")
    error_of(c.get("/v1/models", headers={"Authorization": "Bearer wrong"}), 401)
    error_of(c.get("/v1/models", headers={"Authorization": "Basic k1"}), 401)
    assert c.get("/v1/models", headers={"Authorization": "Bearer k2"}).status_code == 200
    assert c.get("/health").status_code == 200


def test_body_limit() -> None:
    c = client(max_request_bytes=1000)
    big = {"messages": [{"role": "user", "content": "x" * 2000}]}
    error_of(c.post("/v1/chat/completions", json=big), 413, code="request_too_large")

    def chunked() -> Any:
        for _ in range(5):
            yield b" " * 300

    error_of(c.post("/v1/chat/completions", content=chunked(), headers={"content-type": "application/json"}), 413)


def test_count_limits() -> None:
    c = client(max_messages=2, max_tools=1)
    error_of(c.post("/v1/chat/completions", json={"messages": MSG * 3}), 400, "messages")
    tools = [{"type": "function", "function": {"name": n}} for n in ("a", "b")]
    error_of(c.post("/v1/chat/completions", json={"messages": MSG, "tools": tools}), 400, "tools")


def test_request_id_honoured_or_made() -> None:
    c = client()
    assert c.get("/health", headers={"X-Request-Id": "abc-123"}).headers["x-request-id"] == "abc-123"
    made = c.get("/health", headers={"X-Request-Id": "bad id with spaces"}).headers["x-request-id"]
    assert made and " " not in made


def test_cors_off_by_default_and_opt_in() -> None:
    pre = {"Origin": "http://example.test", "Access-Control-Request-Method": "POST"}
    assert "access-control-allow-origin" not in client().options("/v1/chat/completions", headers=pre).headers
    r = client(allowed_origins=["http://example.test"], api_keys=["k"]).options("/v1/chat/completions", headers=pre)
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://example.test"


def test_metrics_and_draining() -> None:
    c = client()
    c.post("/v1/chat/completions", json={"messages": MSG})
    text = c.get("/metrics").text
    assert 'dashchat_http_requests_total{route="/v1/chat/completions",status="200"} 1.0' in text
    for name in ("dashchat_time_to_first_token_seconds_count 1.0", "dashchat_e2e_request_latency_seconds_count 1.0",
                 "dashchat_kv_cache_usage_ratio", "dashchat_prefix_cache_hit_rate", "dashchat_num_requests_waiting"):
        assert name in text
    server_state(c.app).draining = True  # type: ignore[arg-type]
    assert c.get("/health").status_code == 503
    error_of(c.post("/v1/chat/completions", json={"messages": MSG}), 503, code="server_shutting_down")


WEATHER = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
CALL_TEXT = 'Let me check.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


def test_tool_calls_non_stream_and_stream() -> None:
    c = client(ScriptedEngine(CALL_TEXT, max_model_len=4096))
    body = {"messages": MSG, "tools": WEATHER}
    ch = c.post("/v1/chat/completions", json=body).json()["choices"][0]
    assert ch["finish_reason"] == "tool_calls"
    (call,) = ch["message"]["tool_calls"]
    assert call["type"] == "function" and call["id"] and call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "Paris"}
    assert ch["message"]["content"] in (None, "Let me check.")

    with c.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
        events = sse(r.read().decode())[:-1]
    deltas = [e["choices"][0]["delta"] for e in events]
    content = "".join(d.get("content") or "" for d in deltas)
    assert "<tool_call>" not in content and "get_weather" not in content
    calls = [tc for d in deltas for tc in d.get("tool_calls", [])]
    assert calls[0]["index"] == 0 and calls[0]["id"] and calls[0]["type"] == "function"
    assert calls[0]["function"] == {"name": "get_weather", "arguments": ""}
    assert all(set(tc) == {"index", "function"} for tc in calls[1:])
    assert json.loads("".join(tc["function"]["arguments"] for tc in calls)) == {"city": "Paris"}
    assert events[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_legacy_functions() -> None:
    c = client(ScriptedEngine(CALL_TEXT, max_model_len=4096))
    body = {"messages": MSG, "functions": [WEATHER[0]["function"]], "function_call": "auto"}
    ch = c.post("/v1/chat/completions", json=body).json()["choices"][0]
    assert ch["finish_reason"] == "function_call" and "tool_calls" not in ch["message"]
    assert ch["message"]["function_call"]["name"] == "get_weather"
    assert json.loads(ch["message"]["function_call"]["arguments"]) == {"city": "Paris"}
    with c.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
        events = sse(r.read().decode())[:-1]
    fc = [e["choices"][0]["delta"]["function_call"] for e in events if "function_call" in e["choices"][0]["delta"]]
    assert fc[0]["name"] == "get_weather"
    assert json.loads("".join(f["arguments"] for f in fc)) == {"city": "Paris"}
    assert events[-1]["choices"][0]["finish_reason"] == "function_call"


def test_tool_choice_none_returns_text() -> None:
    c = client(ScriptedEngine(CALL_TEXT, max_model_len=4096))
    ch = c.post("/v1/chat/completions", json={"messages": MSG, "tools": WEATHER, "tool_choice": "none"}).json()
    assert ch["choices"][0]["finish_reason"] == "stop" and "tool_calls" not in ch["choices"][0]["message"]


def test_bad_tool_schema_is_400() -> None:
    bad = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": 5}}}]
    err = error_of(client().post("/v1/chat/completions", json={"messages": MSG, "tools": bad}), 400)
    assert err["param"] == "tools"


def test_chat_template_override() -> None:
    eng = ScriptedEngine()
    c = client(eng, chat_template="{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}[bot]")
    assert c.post("/v1/chat/completions", json={"messages": MSG}).status_code == 200
    assert eng.tokenizer.decode(eng.last_prompt) == "[user]hi[bot]"
