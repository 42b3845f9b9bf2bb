"""Tool calling and structured output against the real server, through the official openai SDK.

Qwen2.5-Coder-0.5B (the default model, Hermes tool template) for what the model does by itself in
`auto` mode; SmolLM2-135M (no tool template, never calls by itself) for what constrained decoding
guarantees. Greedy, small max_tokens: the whole file runs in a few minutes on a 2-core CPU.
(The seed script with --strict-tool-call on the default model: test_e2e_default_model.py.)
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import openai
import pytest
from openai import OpenAI
from server_proc import ServerProcess, running

pytest.importorskip("xgrammar")
jsonschema = pytest.importorskip("jsonschema")

QWEN = "qwen2.5-coder-0.5b-instruct"
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "根据城市查询天气",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "Get the local time in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "format": {"type": "string", "enum": ["12h", "24h"]}},
            "required": ["city", "format"],
            "additionalProperties": False,
        },
    },
}
# The usual client system prompt. Without one, the 0.5B model (greedy) answers a bare "你好" by
# calling get_weather for Beijing: the model's choice, not the server's.
SYSTEM = {"role": "system", "content": "You are a helpful assistant."}
MARKUP = ("<tool_call>", "</tool_call>", "```", '"name"', "<|")


@pytest.fixture(scope="module")
def qwen() -> Iterator[ServerProcess]:
    yield from running("--model-path", QWEN, "--device", "cpu", "--max-model-len", "2048",
                       "--kv-cache-memory", "0.5", "--max-num-seqs", "8")


@pytest.fixture(scope="module")
def qc(qwen: ServerProcess) -> OpenAI:
    return OpenAI(base_url=f"{qwen.base_url}/v1", api_key="unused", max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def sc(server: ServerProcess) -> OpenAI:
    return OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0, timeout=300)


def _ask(content: str) -> list[dict[str, Any]]:
    return [SYSTEM, {"role": "user", "content": content}]


def _args(call: Any, tool: dict[str, Any]) -> dict[str, Any]:
    assert call.type == "function" and call.id.startswith("call_") and call.function.name == tool["function"]["name"]
    args = json.loads(call.function.arguments)
    jsonschema.validate(args, tool["function"]["parameters"])
    return args


def _stream(client: OpenAI, **kw: Any) -> tuple[str, list[dict[str, Any]], str | None]:
    """(content, calls as {index, id, type, name, arguments}, finish_reason) of a streamed answer,
    checking the delta shapes strict clients rely on."""
    content, calls, finish = "", {}, None
    for chunk in client.chat.completions.create(stream=True, **kw):
        if not chunk.choices:
            continue
        ch = chunk.choices[0]
        assert finish is None, "nothing may follow the finish_reason chunk"
        content += ch.delta.content or ""
        for d in ch.delta.tool_calls or []:
            assert d.index is not None
            if d.index not in calls:  # the first delta of a call carries all of this
                assert d.index == len(calls) and d.id and d.type == "function" and d.function and d.function.name
                calls[d.index] = {"index": d.index, "id": d.id, "type": d.type, "name": d.function.name,
                                  "arguments": d.function.arguments or ""}
            else:
                assert d.id is None and d.function and d.function.name is None
                calls[d.index]["arguments"] += d.function.arguments or ""
        finish = ch.finish_reason
    return content, [calls[i] for i in sorted(calls)], finish


# ---------------------------------------------------------------- Qwen2.5-Coder-0.5B: auto


@pytest.mark.parametrize("question,city", [("请查询北京天气。", "北京"), ("What's the weather like in Paris today?", "Paris")])
def test_auto_calls_the_weather_tool(qc: OpenAI, question: str, city: str) -> None:
    r = qc.chat.completions.create(model=QWEN, messages=_ask(question), tools=[WEATHER], max_tokens=48,
                                   temperature=0)
    c = r.choices[0]
    assert c.finish_reason == "tool_calls" and c.message.content is None, c.message
    assert len(c.message.tool_calls or []) == 1
    assert _args(c.message.tool_calls[0], WEATHER)["city"] == city


def test_auto_answers_a_greeting_with_text(qc: OpenAI) -> None:
    r = qc.chat.completions.create(model=QWEN, messages=_ask("你好"), tools=[WEATHER], max_tokens=24,
                                   temperature=0)
    c = r.choices[0]
    assert c.message.tool_calls is None and c.finish_reason in ("stop", "length")
    assert c.message.content and not any(m in c.message.content for m in MARKUP), c.message.content


def test_auto_streams_a_call_as_openai_deltas(qc: OpenAI) -> None:
    content, calls, finish = _stream(qc, model=QWEN, messages=_ask("请查询北京天气。"), tools=[WEATHER],
                                     max_tokens=48, temperature=0)
    assert finish == "tool_calls" and content == "" and len(calls) == 1
    assert calls[0]["name"] == "get_weather" and json.loads(calls[0]["arguments"]) == {"city": "北京"}


def test_conversation_goes_on_after_a_tool_result(qc: OpenAI) -> None:
    # Right after the tool message this 0.5B model calls get_weather again (raw greedy output, with
    # the template's rendering checked), so the user says a word first; the answer uses the result.
    messages = _ask("请查询北京天气。") + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_w1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "北京"}'}}]},
        {"role": "tool", "tool_call_id": "call_w1", "content": '{"weather": "晴", "temperature": "25°C"}'},
        {"role": "user", "content": "Thanks! Summarize the result in one sentence."},
    ]
    r = qc.chat.completions.create(model=QWEN, messages=messages, tools=[WEATHER], max_tokens=32, temperature=0)
    c = r.choices[0]
    assert c.message.tool_calls is None and c.finish_reason in ("stop", "length")
    assert c.message.content and "25" in c.message.content, c.message.content


def test_legacy_functions_round_trip(qc: OpenAI) -> None:
    fn = WEATHER["function"]
    r = qc.chat.completions.create(model=QWEN, messages=_ask("What's the weather like in Paris today?"),
                                   functions=[fn], function_call="auto", max_tokens=48, temperature=0)
    c = r.choices[0]
    assert c.finish_reason == "function_call" and c.message.tool_calls is None and c.message.content is None
    assert c.message.function_call and c.message.function_call.name == "get_weather"
    assert json.loads(c.message.function_call.arguments) == {"city": "Paris"}
    # The legacy history: the assistant's function_call and a role "function" result.
    messages = _ask("What's the weather like in Paris today?") + [
        {"role": "assistant", "content": None, "function_call": c.message.function_call.model_dump()},
        {"role": "function", "name": "get_weather", "content": '{"temperature": 22, "condition": "sunny"}'},
        {"role": "user", "content": "Thanks! Summarize the result in one sentence."},
    ]
    r = qc.chat.completions.create(model=QWEN, messages=messages, functions=[fn], max_tokens=24, temperature=0)
    c = r.choices[0]
    assert c.finish_reason in ("stop", "length", "function_call")
    assert c.message.tool_calls is None and (c.message.content or c.message.function_call)


def test_parallel_calls_get_indexes_0_and_1(qc: OpenAI) -> None:
    # required: the grammar holds the calls to <tool_call> tags; the model itself says how many
    content, calls, finish = _stream(qc, model=QWEN, messages=_ask("What is the weather in Paris and in London?"),
                                     tools=[WEATHER], tool_choice="required", parallel_tool_calls=True,
                                     max_tokens=64, temperature=0)
    assert finish == "tool_calls" and content == ""
    assert [c["index"] for c in calls] == [0, 1] and len({c["id"] for c in calls}) == 2
    assert [json.loads(c["arguments"])["city"] for c in calls] == ["Paris", "London"]


# ---------------------------------------------------------------- SmolLM2: constrained decoding


@pytest.mark.parametrize("stream", [False, True])
def test_required_and_named_give_schema_valid_calls(sc: OpenAI, model_name: str, stream: bool) -> None:
    msgs = [{"role": "user", "content": "What time is it in Tokyo?"}]
    named = {"type": "function", "function": {"name": "get_time"}}
    for choice, parallel in (("required", True), (named, None)):
        kw: dict[str, Any] = {"model": model_name, "messages": msgs, "tools": [WEATHER, TIME],
                              "tool_choice": choice, "max_tokens": 96, "temperature": 0}
        if parallel is not None:
            kw["parallel_tool_calls"] = parallel
        if stream:
            content, calls, finish = _stream(sc, **kw)
            got = [(c["name"], json.loads(c["arguments"])) for c in calls]
        else:
            c = sc.chat.completions.create(**kw).choices[0]
            content, finish = c.message.content or "", c.finish_reason
            got = [(t.function.name, json.loads(t.function.arguments)) for t in c.message.tool_calls or []]
        # required + parallel ends by itself (it used to loop until max_tokens)
        assert finish == "tool_calls" and content == "" and got, (choice, got)
        for name, args in got:
            jsonschema.validate(args, (TIME if name == "get_time" else WEATHER)["function"]["parameters"])
        if choice is named:
            assert [n for n, _ in got] == ["get_time"]


@pytest.mark.parametrize("stream", [False, True])
def test_json_schema_response_format(sc: OpenAI, model_name: str, stream: bool) -> None:
    # maxItems, maxLength: without bounds this 135M model repeats a tag, or a word inside one, until
    # max_tokens (valid so far, but cut)
    tag = {"type": "string", "maxLength": 24}
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 24}, "age": {"type": "integer"},
                                               "tags": {"type": "array", "items": tag, "maxItems": 3}},
              "required": ["name", "age", "tags"], "additionalProperties": False}
    kw: dict[str, Any] = {"model": model_name, "messages": [{"role": "user", "content": "Describe a cat as JSON."}],
                          "max_tokens": 96, "temperature": 0,
                          "response_format": {"type": "json_schema",
                                              "json_schema": {"name": "cat", "schema": schema, "strict": True}}}
    if stream:
        content, _, finish = _stream(sc, **kw)
    else:
        c = sc.chat.completions.create(**kw).choices[0]
        content, finish = c.message.content or "", c.finish_reason
    assert finish == "stop", content
    jsonschema.validate(json.loads(content), schema)


@pytest.mark.parametrize("stream", [False, True])
def test_a_call_cut_by_max_tokens_leaks_nothing(sc: OpenAI, model_name: str, stream: bool) -> None:
    kw: dict[str, Any] = {"model": model_name, "messages": [{"role": "user", "content": "Weather in Paris?"}],
                          "tools": [WEATHER], "tool_choice": "required", "max_tokens": 8, "temperature": 0}
    if stream:
        content, calls, finish = _stream(sc, **kw)
    else:
        c = sc.chat.completions.create(**kw).choices[0]
        content, calls, finish = c.message.content or "", c.message.tool_calls or [], c.finish_reason
    assert finish == "length" and content == "" and calls == []


# ---------------------------------------------------------------- bad input: 400 naming the parameter


@pytest.mark.parametrize(
    "extra,param",
    [
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "get_time"}}}, "tool_choice"),
        ({"tools": [{"type": "function", "function": {"parameters": {"type": "object"}}}]}, "tools"),
        ({"tools": [{"type": "function", "function": {"name": "x", "parameters": {"type": "objekt"}}}]}, "tools"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"functions": [WEATHER["function"]], "function_call": {"name": "get_time"}}, "function_call"),
    ],
)
def test_bad_tool_requests_are_400_naming_the_parameter(sc: OpenAI, model_name: str, extra: dict[str, Any],
                                                        param: str) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        sc.chat.completions.create(model=model_name, messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                   **extra)
    assert e.value.param and e.value.param.startswith(param), (e.value.param, e.value.message)
