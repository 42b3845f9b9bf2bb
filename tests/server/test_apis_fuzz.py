"""Hypothesis on /v1/responses, /v1/messages, Ollama's /api/*, embeddings, rerank and score (in-process,
scripted engine): any body, with the served model name so it reaches the translation and the chat
run, gets a 2xx or a 4xx in that API's error shape, never a 5xx. (The schemathesis run covers the routes too, but its random model names stop
most Messages requests at the 404.)"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from server_fakes import ScriptedEngine
from starlette.testclient import TestClient

from dashchat.server.app import build_app
from dashchat.server.config import ServerConfig

scalars = st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8)
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
    st.text(max_size=6), inner, max_size=3), max_leaves=10)
SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}


def mostly(valid: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """The field's own kind of value, and one time in ten any JSON at all."""
    return st.integers(0, 9).flatmap(lambda roll: json_values if roll == 0 else valid)


def one_of_dicts(kind: str, **fields: st.SearchStrategy[Any]) -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries({"type": st.just(kind)}, optional=fields)


text = st.text(max_size=12)
parts = st.lists(one_of_dicts("input_text", text=text) | one_of_dicts("output_text", text=text)
                 | one_of_dicts("input_image", image_url=text) | json_values, max_size=2)
items = st.lists(
    st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "developer", "tool"])},
                          optional={"content": text | parts, "type": st.just("message")})
    | one_of_dicts("function_call", call_id=text, name=st.sampled_from(["get_weather", "x"]), arguments=text)
    | one_of_dicts("function_call_output", call_id=text, output=text | parts)
    | one_of_dicts("reasoning", summary=parts, content=parts)
    | one_of_dicts("item_reference", id=text) | json_values,
    max_size=4)
RESPONSES = {
    "model": st.sampled_from(["m", "other"]),
    "input": text | items,
    "instructions": text,
    "tools": st.lists(st.just({"type": "function", "name": "get_weather", "parameters": SCHEMA}), max_size=1)
    | st.lists(one_of_dicts("function", name=st.sampled_from(["get_weather", ""]), parameters=st.just(SCHEMA))
               | one_of_dicts("web_search"), max_size=2),
    "tool_choice": st.sampled_from(["auto", "none", "required"])
    | one_of_dicts("function", name=st.sampled_from(["get_weather", "y"])),
    "text": st.fixed_dictionaries({}, optional={"format": one_of_dicts("json_schema", name=text, schema=st.just(SCHEMA))
                                                | one_of_dicts("json_object")}),
    "max_output_tokens": st.integers(1, 64) | st.integers(-1, 5000),
    "temperature": st.floats(0, 2, allow_nan=False),
    "reasoning": st.fixed_dictionaries({}, optional={"effort": st.sampled_from(["none", "low"])}),
    "stream": st.booleans(), "store": st.booleans(),
}
RESPONSES = {k: mostly(v) for k, v in RESPONSES.items()}
blocks = st.lists(
    one_of_dicts("text", text=text) | one_of_dicts("tool_use", id=text, name=text, input=json_values)
    | one_of_dicts("tool_result", tool_use_id=text, content=text, is_error=st.booleans())
    | one_of_dicts("thinking", thinking=text, signature=text) | one_of_dicts("image", source=json_values),
    max_size=3)
MESSAGES = {
    "model": st.sampled_from(["m", "m", "other"]),
    "max_tokens": st.integers(-1, 5000),
    "messages": st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant"]),
                                                "content": text | blocks}), min_size=1, max_size=3),
    "system": text | st.lists(one_of_dicts("text", text=text), max_size=2),
    "tools": st.lists(st.fixed_dictionaries({"name": st.sampled_from(["get_weather", "get_weather", "", "t" * 70])},
                                            optional={"input_schema": st.just(SCHEMA),
                                                      "type": st.sampled_from(["custom", "bash_20250124"])}),
                      max_size=2),
    "tool_choice": st.fixed_dictionaries({"type": st.sampled_from(["auto", "any", "tool", "none"])},
                                         optional={"name": st.just("get_weather")}),
    "thinking": st.fixed_dictionaries({"type": st.sampled_from(["enabled", "disabled"])},
                                      optional={"budget_tokens": st.integers(0, 2000)}),
    "stop_sequences": st.lists(text, max_size=4),
    "temperature": st.floats(0, 1, allow_nan=False),
    "top_k": st.integers(0, 50),
    "stream": st.booleans(),
}
MESSAGES = {k: mostly(v) for k, v in MESSAGES.items()}
OLLAMA_OPTIONS = st.fixed_dictionaries({}, optional={
    "num_predict": st.integers(-2, 5000), "temperature": st.floats(0, 3, allow_nan=False),
    "top_k": st.integers(-1, 50), "top_p": st.floats(0, 1, allow_nan=False), "seed": st.integers(-1, 2**31),
    "stop": st.lists(text, max_size=5) | text, "repeat_penalty": st.floats(0, 3, allow_nan=False),
    "num_ctx": st.integers(0, 9000), "mirostat": st.integers(0, 2)})
OLLAMA = {
    "model": st.sampled_from(["m", "m:latest", "m:7b", "other"]),
    "messages": st.lists(st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "assistant", "system", "tool", "User", "bot"])},
        optional={"content": text, "thinking": text, "images": st.lists(text, max_size=1), "tool_name": text,
                  "tool_calls": st.lists(st.fixed_dictionaries({"function": st.fixed_dictionaries(
                      {"name": st.sampled_from(["get_weather", ""])}, optional={"arguments": json_values})}),
                      max_size=2)}), max_size=3),
    "prompt": text, "system": text, "raw": st.booleans(), "suffix": text, "context": st.lists(st.integers(0, 300)),
    "template": st.sampled_from(["{{ .Prompt }}", "{{ if .System }}{{ .System }}{{ end }}{{ .Prompt }}",
                                 "{{ range .Messages }}", "{{ if .Prompt }}"]),
    "tools": st.lists(st.just(
        {"type": "function", "function": {"name": "get_weather", "parameters": SCHEMA}}), max_size=1),
    "format": st.sampled_from(["", "json", "xml"]) | st.just(SCHEMA),
    "options": OLLAMA_OPTIONS, "stream": st.booleans(), "think": st.sampled_from([True, False, "high", "max", "x"]),
    "keep_alive": st.sampled_from(["5m", "1h30m", "-1", "0", "soon", ""]) | st.integers(-5, 600),
    "images": st.lists(text, max_size=1), "input": text | st.lists(text, max_size=2), "name": text,
}
OLLAMA = {k: mostly(v) for k, v in OLLAMA.items()}
OLLAMA_PATHS = ("/api/chat", "/api/generate", "/api/show", "/api/embed", "/api/embeddings")


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    engine = ScriptedEngine('Sure. <tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>',
                            max_model_len=2048)
    with TestClient(build_app(engine, ServerConfig(["m"]))) as c:
        yield c


def _post(client: TestClient, path: str, body: Any) -> Any:
    r = client.post(path, content=json.dumps(body), headers={"content-type": "application/json"})
    assert r.status_code < 500, r.text
    event(f"{path} {r.status_code}")  # --hypothesis-show-statistics: how many get through
    return r


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=st.fixed_dictionaries({"model": st.just("m"), "input": RESPONSES["input"]},
                                  optional={k: v for k, v in RESPONSES.items() if k not in ("model", "input")})
       | st.fixed_dictionaries({}, optional=RESPONSES))
def test_responses_bodies(client: TestClient, body: dict[str, Any]) -> None:
    r = _post(client, "/v1/responses", body)
    if r.status_code >= 400:
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"]
    elif body.get("stream") is True:
        assert r.text.rstrip().splitlines()[-1].startswith("data: {\"type\":\"response.")
    else:
        assert r.json()["object"] == "response"


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=st.fixed_dictionaries({"model": st.just("m"), "max_tokens": st.integers(1, 64),
                                   "messages": MESSAGES["messages"]},
                                  optional={k: v for k, v in MESSAGES.items() if k not in ("model", "max_tokens", "messages")})
       | st.fixed_dictionaries({}, optional=MESSAGES))
def test_messages_bodies(client: TestClient, body: dict[str, Any]) -> None:
    for path in ("/v1/messages", "/v1/messages/count_tokens"):
        r = _post(client, path, body)
        if r.status_code >= 400:
            err = r.json()
            assert err["type"] == "error" and set(err["error"]) == {"type", "message"} and err["error"]["message"]
        elif path == "/v1/messages/count_tokens":
            assert r.json()["input_tokens"] > 0
        elif body.get("stream") is True:
            assert r.text.rstrip().splitlines()[-1] in ('data: {"type":"message_stop"}',) or '"type":"error"' in r.text
        else:
            assert r.json()["type"] == "message"


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=st.fixed_dictionaries({"model": st.just("m")}, optional={k: v for k, v in OLLAMA.items() if k != "model"})
       | st.fixed_dictionaries({}, optional=OLLAMA))
def test_ollama_bodies(client: TestClient, body: dict[str, Any]) -> None:
    for path in OLLAMA_PATHS:
        r = _post(client, path, body)
        if r.status_code >= 400:
            err = r.json()
            assert list(err) == ["error"] and isinstance(err["error"], str) and err["error"]
        elif r.headers["content-type"] == "application/x-ndjson":
            last = json.loads(r.text.splitlines()[-1])
            assert last.get("done") is True or set(last) == {"error"}
        else:
            assert r.json().get("done") is True or path == "/api/show"


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=json_values)
def test_any_json(client: TestClient, body: Any) -> None:
    for path in ("/v1/responses", "/v1/messages", "/v1/messages/count_tokens", *OLLAMA_PATHS):
        r = _post(client, path, body)
        assert r.status_code >= 400
        shape = r.json()
        if path.startswith("/api/"):
            assert list(shape) == ["error"]
        else:
            assert ("error" in shape) if path == "/v1/responses" else (shape["type"] == "error")


ids = st.lists(st.integers(-2, 300), max_size=4)
POOLING = {
    "model": st.sampled_from(["m", "other"]),
    "input": text | st.lists(text, max_size=3) | ids | st.lists(ids, max_size=2),
    "encoding_format": st.sampled_from(["float", "base64", "hex"]),
    "dimensions": st.integers(-1, 40),
    "query": text, "documents": st.lists(text | st.fixed_dictionaries({"text": text}), max_size=3),
    "top_n": st.integers(-1, 5), "return_documents": st.booleans(), "instruction": text,
    "text_1": text | st.lists(text, max_size=3), "text_2": text | st.lists(text, max_size=3),
    "prompt": text, "truncate": st.booleans(), "keep_alive": st.sampled_from(["5m", "soon"]),
}
POOLING = {k: mostly(v) for k, v in POOLING.items()}
POOLING_PATHS = ("/v1/embeddings", "/v1/rerank", "/rerank", "/score", "/api/embed", "/api/embeddings")


@pytest.fixture(scope="module", params=["embed", "score"])
def pooling_client(request: pytest.FixtureRequest) -> Iterator[TestClient]:
    from server_fakes import PoolingEngine

    cfg = ServerConfig(["m"], task=request.param)
    with TestClient(build_app(PoolingEngine(max_model_len=64), cfg)) as c:
        yield c


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=st.fixed_dictionaries({"model": st.just("m")}, optional={k: v for k, v in POOLING.items() if k != "model"})
       | json_values)
def test_pooling_bodies(pooling_client: TestClient, body: Any) -> None:
    """Embeddings, rerank and score (embedding and reranker models), Ollama's embed: 2xx or a 4xx in the
    API's error shape."""
    for path in POOLING_PATHS:
        r = _post(pooling_client, path, body)
        if r.status_code >= 400:
            err = r.json()
            if path.startswith("/api/"):
                assert list(err) == ["error"] and err["error"]
            else:
                assert set(err["error"]) == {"message", "type", "param", "code"} and err["error"]["message"]
        elif path == "/v1/embeddings":
            assert r.json()["object"] == "list" and r.json()["usage"]["total_tokens"] > 0
        elif path == "/score":
            assert all(0 <= d["score"] <= 1 or abs(d["score"]) <= 1 + 1e-6 for d in r.json()["data"])
        elif path.endswith("rerank"):
            scores = [x["relevance_score"] for x in r.json()["results"]]
            assert scores == sorted(scores, reverse=True)
        else:
            assert "embeddings" in r.json() or "embedding" in r.json()
