"""Hypothesis on the request models: any JSON body gets a 2xx or an OpenAI-shaped 4xx, never a 5xx.

Bodies include what a JSON parser takes but nothing behind it can hold: strings with lone UTF-16
surrogates ("\\ud800", as a key too) and integers beyond int64. Every string and integer field of
every route, found from the routes' own request models, answers those with a 400 naming the field."""

from __future__ import annotations

import json
import types
import typing
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.routing import APIRoute
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel
from server_fakes import ScriptedEngine
from starlette.testclient import TestClient

from dashchat.server.app import build_app
from dashchat.server.config import ServerConfig

lone_surrogates = st.characters(categories=["Cs"])  # st.text() never makes them on its own
odd_text = st.builds(lambda a, s, b: a + s + b, st.text(max_size=3), lone_surrogates, st.text(max_size=3))
huge_ints = st.integers(min_value=2**63) | st.integers(max_value=-(2**63) - 1) | st.sampled_from([2**63, -(2**63) - 1, 2**64])
edge_ints = st.sampled_from([2**63 - 1, -(2**63), 2**31, -(2**31) - 1, 0, -1])
scalars = (st.none() | st.booleans() | st.integers(-(2**70), 2**70) | huge_ints | edge_ints
           | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8) | odd_text)
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
    st.text(max_size=6), inner, max_size=3), max_leaves=12)

FIELDS = {
    "model": st.sampled_from(["m", "other"]) | json_values,
    "messages": st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "tool", "x"])},
                                               optional={"content": st.text(max_size=20) | json_values}),
                         max_size=3) | json_values,
    "max_tokens": st.integers(-2, 300) | json_values,
    "n": st.integers(-1, 20) | huge_ints,
    "seed": st.integers(-(2**70), 2**70) | edge_ints, "top_k": st.integers(-2, 2**64) | edge_ints,
    "min_tokens": st.integers(-1, 2**64) | edge_ints, "user": st.text(max_size=4) | odd_text,
    "stop": st.text(max_size=3) | st.lists(st.text(max_size=3), max_size=6),
    "temperature": st.floats(-1, 3, allow_nan=False) | json_values,
    "top_p": st.floats(-1, 2, allow_nan=False),
    "logit_bias": st.dictionaries(st.text(max_size=4) | odd_text | st.integers(-1, 2**70).map(str),
                                  st.floats(-200, 200, allow_nan=False), max_size=3),
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


def _post(client: TestClient, path: str, body: Any) -> Any:
    # json.dumps escapes as ASCII: a lone surrogate goes on the wire as "\\ud800", as a client would send it
    return client.post(path, content=json.dumps(body), headers={"content-type": "application/json"})


def _check(r: Any) -> None:
    assert r.status_code < 500, r.text
    if r.status_code >= 400:
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=bodies)
def test_chat_bodies(client: TestClient, body: dict[str, Any]) -> None:
    _check(_post(client, "/v1/chat/completions", body))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=json_values)
def test_any_json(client: TestClient, body: Any) -> None:
    _check(_post(client, "/v1/chat/completions", body))
    _check(_post(client, "/v1/completions", body))


# ---- the class of unholdable values, closed for every field of every route ---------------------

Path = tuple[str | int, ...]


def _param(path: Path) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out


def _leaves(annotation: Any, path: Path, seen: frozenset[type] = frozenset()) -> Iterator[tuple[Path, str]]:
    """(path, "str" | "int") of every string and integer a value of `annotation` can hold."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        yield from _leaves(args[0], path, seen)
    elif origin in (typing.Union, types.UnionType):
        for arg in args:
            yield from _leaves(arg, path, seen)
    elif origin is typing.Literal:
        if any(isinstance(a, str) for a in args):
            yield path, "str"
    elif origin is list:
        yield from _leaves(args[0], (*path, 0), seen)
    elif origin is dict:
        yield path + ("key",), "key"
        yield from _leaves(args[1], (*path, "key"), seen)
    elif annotation is Any:
        yield path, "str"
        yield path, "int"
    elif annotation is str:
        yield path, "str"
    elif annotation is int:
        yield path, "int"
    elif isinstance(annotation, type) and issubclass(annotation, BaseModel) and annotation not in seen:
        for name, field in annotation.model_fields.items():
            yield from _leaves(field.annotation, (*path, field.alias or name), seen | {annotation})


def _body_with(path: Path, value: Any) -> Any:
    if not path:
        return value
    head, rest = path[0], path[1:]
    if isinstance(head, int):
        return [_body_with(rest, value)]
    return {head: _body_with(rest, value)}


def _route_fields() -> list[tuple[str, Path, str]]:
    app = build_app(ScriptedEngine(), ServerConfig(["m"]))
    out = []
    for route in app.routes:
        if isinstance(route, APIRoute) and route.body_field is not None:
            for path, kind in dict.fromkeys(_leaves(route.body_field.field_info.annotation, ())):
                out.append((route.path, path, kind))
    return out


ROUTE_FIELDS = _route_fields()


def test_the_field_list_covers_the_routes() -> None:
    params = {(route, _param(path)) for route, path, _ in ROUTE_FIELDS}
    for expected in ["messages[0].content", "messages[0].content[0].text", "messages[0].tool_calls[0].function.name",
                     "tools[0].function.parameters.key", "seed", "max_tokens", "top_k", "n", "logit_bias.key", "user"]:
        assert ("/v1/chat/completions", expected) in params, expected
    for expected in ["prompt", "prompt[0]", "prompt[0][0]", "suffix", "best_of"]:
        assert ("/v1/completions", expected) in params, expected


@pytest.mark.parametrize("route, path, kind", ROUTE_FIELDS, ids=[f"{r}:{_param(p)}:{k}" for r, p, k in ROUTE_FIELDS])
def test_unholdable_values_are_400_naming_the_field(client: TestClient, route: str, path: Path, kind: str) -> None:
    if kind == "key":  # a dict key holding a lone surrogate: the dict is named
        cases = [(_body_with(path[:-1], {"a\ud800b": 1}), _param(path[:-1]))]
    elif kind == "str":
        cases = [(_body_with(path, "ok \udc00 then"), _param(path)), (_body_with(path, "\ud83d"), _param(path))]
    else:
        cases = [(_body_with(path, 2**63), _param(path)), (_body_with(path, -(2**63) - 1), _param(path))]
    for body, param in cases:
        r = _post(client, route, body)
        assert r.status_code == 400, (body, r.text)
        err = r.json()["error"]
        assert err["type"] == "invalid_request_error" and param in err["message"], err
        if route.startswith("/v1/messages"):  # Anthropic's error shape: the field is named in the message
            assert r.json()["type"] == "error" and "param" not in err, r.json()
        else:
            assert err["param"] == param, err


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=bodies, bad=odd_text | huge_ints, where=st.sampled_from(sorted(FIELDS)))
def test_an_unholdable_value_anywhere_is_400(client: TestClient, body: dict[str, Any], bad: Any, where: str) -> None:
    body = {**body, where: [bad] if where in ("messages", "stop", "tools") else bad}
    r = _post(client, "/v1/chat/completions", body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] is not None
