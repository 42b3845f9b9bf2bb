"""Hypothesis on the request models: any JSON body gets a 2xx or an OpenAI-shaped 4xx, never a 5xx."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from server_fakes import ScriptedEngine
from starlette.testclient import TestClient

from dashchat.server.app import build_app
from dashchat.server.config import ServerConfig

scalars = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8)
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
    st.text(max_size=6), inner, max_size=3), max_leaves=12)

FIELDS = {
    "model": st.sampled_from(["m", "other"]) | json_values,
    "messages": st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "tool", "x"])},
                                               optional={"content": st.text(max_size=20) | json_values}),
                         max_size=3) | json_values,
    "max_tokens": st.integers(-2, 300) | json_values,
    "n": st.integers(-1, 20),
    "stop": st.text(max_size=3) | st.lists(st.text(max_size=3), max_size=6),
    "temperature": st.floats(-1, 3, allow_nan=False) | json_values,
    "top_p": st.floats(-1, 2, allow_nan=False),
    "logit_bias": st.dictionaries(st.text(max_size=4), st.floats(-200, 200, allow_nan=False), max_size=3),
    "logprobs": st.booleans(), "top_logprobs": st.integers(-1, 25),
    "stream": st.booleans(), "stream_options": json_values,
    "tools": json_values, "tool_choice": st.sampled_from(["auto", "none", "required"]) | json_values,
    "response_format": st.sampled_from([{"type": "text"}, {"type": "json_object"}]) | json_values,
}
bodies = st.fixed_dictionaries({}, optional=FIELDS)


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    with TestClient(build_app(ScriptedEngine(), ServerConfig(["m"]))) as c:
        yield c


def _check(r: Any) -> None:
    assert r.status_code < 500, r.text
    if r.status_code >= 400:
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=bodies)
def test_chat_bodies(client: TestClient, body: dict[str, Any]) -> None:
    _check(client.post("/v1/chat/completions", json=body))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=json_values)
def test_any_json(client: TestClient, body: Any) -> None:
    _check(client.post("/v1/chat/completions", content=json.dumps(body), headers={"content-type": "application/json"}))
    _check(client.post("/v1/completions", content=json.dumps(body), headers={"content-type": "application/json"}))
