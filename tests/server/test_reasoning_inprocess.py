"""Chat Completions for a thinking model, in-process over scripted model outputs and Qwen3's real
chat template: reasoning_content / reasoning (whole and streamed), reasoning_tokens, tool calls after
the thinking, a cut inside the thinking, chat_template_kwargs and the server's defaults."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import ExitStack
from typing import Any

import pytest
from server_fakes import ScriptedEngine
from starlette.testclient import TestClient
from tiny_qwen3 import QWEN3_TEMPLATE

from dashchat.server.app import build_app
from dashchat.server.config import ServerConfig

MSG = [{"role": "user", "content": "What is 2+2?"}]
THOUGHT = "<think>\nThe user asks 2+2. That is 4.\n</think>\n\n"
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'

_stack = ExitStack()


@pytest.fixture(autouse=True)
def _close_clients() -> Iterator[None]:
    yield
    _stack.close()


def client(reply: str, **cfg: Any) -> tuple[TestClient, ScriptedEngine]:
    engine = ScriptedEngine(reply, max_model_len=4096)
    cfg.setdefault("served_model_names", ["m"])
    cfg.setdefault("chat_template", QWEN3_TEMPLATE)
    return _stack.enter_context(TestClient(build_app(engine, ServerConfig(**cfg)))), engine


def chat(c: TestClient, **body: Any) -> dict[str, Any]:
    r = c.post("/v1/chat/completions", json={"messages": MSG, **body})
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


def stream(c: TestClient, **body: Any) -> list[dict[str, Any]]:
    with c.stream("POST", "/v1/chat/completions", json={"messages": MSG, "stream": True, **body}) as r:
        assert r.status_code == 200
        blocks = [b[len("data: "):] for b in r.read().decode().split("\n\n") if b.strip()]
    assert blocks[-1] == "[DONE]"
    return [json.loads(b) for b in blocks[:-1]]


def _prompt(engine: ScriptedEngine) -> str:
    return engine.tokenizer.decode(engine.last_prompt)


def test_reasoning_split_from_the_answer() -> None:
    c, engine = client(THOUGHT + "It is 4.")
    body = chat(c)
    msg = body["choices"][0]["message"]
    assert msg["content"] == "It is 4."
    assert msg["reasoning_content"] == msg["reasoning"] == "The user asks 2+2. That is 4."
    assert body["choices"][0]["finish_reason"] == "stop"
    thought_tokens = len(engine.tokenizer.encode(THOUGHT.rstrip()))
    assert body["usage"]["completion_tokens_details"] == {"reasoning_tokens": thought_tokens}


def test_reasoning_streams_before_any_content() -> None:
    c, _ = client(THOUGHT + "It is 4.")
    chunks = stream(c, stream_options={"include_usage": True})
    deltas = [ch["choices"][0]["delta"] for ch in chunks if ch["choices"]]
    assert deltas[0] == {"role": "assistant", "content": ""}
    kinds = ["reasoning" if "reasoning_content" in d else "content" if d.get("content") else "other"
             for d in deltas[1:]]
    assert kinds.index("content") > kinds.index("reasoning")
    assert "reasoning" not in kinds[kinds.index("content"):]
    for d in deltas:
        if "reasoning_content" in d:
            assert d["reasoning"] == d["reasoning_content"] and "content" not in d
    assert "".join(d.get("reasoning_content", "") for d in deltas) == "The user asks 2+2. That is 4."
    assert "".join(d.get("content") or "" for d in deltas) == "It is 4."
    assert chunks[-1]["usage"]["completion_tokens_details"]["reasoning_tokens"] > 0


def test_cut_by_max_tokens_inside_the_thinking_stays_reasoning() -> None:
    c, _ = client(THOUGHT + "It is 4.")
    body = chat(c, max_tokens=20)
    choice = body["choices"][0]
    assert choice["finish_reason"] == "length"
    assert choice["message"]["content"] is None
    assert choice["message"]["reasoning_content"] == THOUGHT[len("<think>\n"):20]
    assert body["usage"]["completion_tokens_details"]["reasoning_tokens"] == 20
    deltas = [ch["choices"][0]["delta"] for ch in stream(c, max_tokens=20)]
    assert "".join(d.get("content") or "" for d in deltas) == ""
    assert "".join(d.get("reasoning_content", "") for d in deltas) == THOUGHT[len("<think>\n"):20]


def test_tool_call_after_thinking_never_from_the_thinking() -> None:
    reply = f"<think>\nI could write {CALL} now, or not.\n</think>\n\n{CALL}"
    c, _ = client(reply)
    body = chat(c, tools=TOOLS)
    choice = body["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    msg = choice["message"]
    assert msg["content"] is None
    assert msg["reasoning_content"] == f"I could write {CALL} now, or not."
    (call,) = msg["tool_calls"]
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    deltas = [ch["choices"][0]["delta"] for ch in stream(c, tools=TOOLS)]
    calls = [d for d in deltas if "tool_calls" in d]
    assert len([d for d in calls if "id" in d["tool_calls"][0]]) == 1
    assert all(not d.get("content") for d in deltas)
    assert "".join(d.get("reasoning", "") for d in deltas) == msg["reasoning"]


def test_thinking_only_in_the_reasoning_not_in_a_tool_call() -> None:
    c, _ = client(f"<think>\n{CALL}")  # cut while the thinking quotes a call
    body = chat(c, tools=TOOLS, tool_choice="auto")
    msg = body["choices"][0]["message"]
    assert "tool_calls" not in msg and msg["content"] is None and msg["reasoning_content"] == CALL


def test_enable_thinking_false_reaches_the_template() -> None:
    c, engine = client("It is 4.")
    body = chat(c, chat_template_kwargs={"enable_thinking": False})
    assert _prompt(engine).endswith("<|start|>assistant\n<think>\n\n</think>\n\n".replace("<|start|>", "<|im_start|>"))
    msg = body["choices"][0]["message"]
    assert msg["content"] == "It is 4." and "reasoning_content" not in msg
    assert body["usage"]["completion_tokens_details"] == {"reasoning_tokens": 0}
    chat(c)
    assert _prompt(engine).endswith("<|im_start|>assistant\n")


def test_every_chat_template_kwarg_reaches_the_template() -> None:
    template = "{{ greeting }}, {{ messages[0].content }} ({{ flavour | default('plain') }})"
    c, engine = client("ok", chat_template=template)
    chat(c, chat_template_kwargs={"greeting": "Hello", "flavour": "mint"})
    assert _prompt(engine) == "Hello, What is 2+2? (mint)"


def test_server_default_template_kwargs_and_request_override() -> None:
    c, engine = client("It is 4.", default_chat_template_kwargs={"enable_thinking": False})
    chat(c)
    assert _prompt(engine).endswith("<think>\n\n</think>\n\n")
    chat(c, chat_template_kwargs={"enable_thinking": True})
    assert _prompt(engine).endswith("<|im_start|>assistant\n")


def test_reasoning_parser_none_keeps_thinking_in_content() -> None:
    c, _ = client(THOUGHT + "It is 4.", reasoning_parser="none")
    msg = chat(c)["choices"][0]["message"]
    assert msg["content"] == THOUGHT + "It is 4." and "reasoning_content" not in msg


def test_reasoning_content_sent_back_is_rendered() -> None:
    c, engine = client("Sunny.")
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    messages = [*MSG, {"role": "assistant", "content": None, "reasoning_content": "Need the weather.",
                       "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    chat(c, messages=messages, tools=TOOLS)
    assert "<|im_start|>assistant\n<think>\nNeed the weather.\n</think>\n\n<tool_call>" in _prompt(engine)


@pytest.mark.parametrize("kwargs", [["enable_thinking"], "yes", {"add_generation_prompt": False},
                                    {"messages": []}])
def test_bad_chat_template_kwargs_are_400(kwargs: Any) -> None:
    c, _ = client("ok")
    r = c.post("/v1/chat/completions", json={"messages": MSG, "chat_template_kwargs": kwargs})
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "chat_template_kwargs"


def test_stop_reason_names_the_stop_string() -> None:
    c, _ = client("It is 4. Done.", chat_template="{{ messages[0].content }}")
    choice = chat(c, stop=["Done", "4."])["choices"][0]
    assert (choice["message"]["content"], choice["finish_reason"], choice["stop_reason"]) == ("It is ", "stop", "4.")
    last = stream(c, stop=["Done", "4."])[-1]["choices"][0]
    assert (last["finish_reason"], last["stop_reason"]) == ("stop", "4.")
    assert "stop_reason" not in chat(c)["choices"][0]  # ended by EOS: no stop string to name
