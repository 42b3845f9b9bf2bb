"""OpenAI's message-order rule for tool results: a `tool` message must answer a call of the assistant
message with `tool_calls` before it; otherwise the request is a 400 naming the message."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from server_fakes import ScriptedEngine
from starlette.testclient import TestClient

from dashchat.server.app import build_app
from dashchat.server.config import ServerConfig

CALL = {"role": "assistant", "content": None, "tool_calls": [
    {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
    {"id": "call_2", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}]}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
USER = {"role": "user", "content": "Weather in Paris and Rome?"}


def result(call_id: str | None) -> dict[str, Any]:
    msg = {"role": "tool", "content": "sunny"}
    return msg if call_id is None else {**msg, "tool_call_id": call_id}


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    with TestClient(build_app(ScriptedEngine(max_model_len=8192), ServerConfig(["m"]))) as c:
        yield c


@pytest.mark.parametrize("messages, param", [
    ([USER, result("call_1")], "messages[1].role"),  # answers nothing
    ([result("call_1"), USER], "messages[0].role"),  # first message
    ([USER, CALL, result("call_1"), USER, result("call_2")], "messages[4].role"),  # the calls were answered already
    ([USER, {"role": "assistant", "content": "Sunny."}, result("call_1")], "messages[2].role"),  # no tool_calls
    ([USER, CALL, result("call_9")], "messages[2].tool_call_id"),  # no such call
])
def test_a_tool_message_answering_no_call_is_400(client: TestClient, messages: list[Any], param: str) -> None:
    r = client.post("/v1/chat/completions", json={"messages": messages, "tools": TOOLS})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error"
    assert param.split(".")[0] in err["message"]


@pytest.mark.parametrize("messages", [
    [USER, CALL, result("call_1"), result("call_2")],
    [USER, CALL, result("call_2"), result("call_1"), USER],
    [USER, CALL, result(None)],  # without an id it answers the call before it
])
def test_tool_results_after_their_calls_are_fine(client: TestClient, messages: list[Any]) -> None:
    r = client.post("/v1/chat/completions", json={"messages": messages, "tools": TOOLS})
    assert r.status_code == 200, r.text
