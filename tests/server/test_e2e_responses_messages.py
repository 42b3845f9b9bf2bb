"""/v1/responses and /v1/messages through the official `openai` and `anthropic` SDKs, unchanged,
against the shared SmolLM2 server. Forced tool calls (grammar) make the tool round trips
deterministic in shape on this small model; test_e2e_default_model.py has the `auto` ones."""

from __future__ import annotations

import json
from typing import Any

import anthropic
import httpx
import openai
import pytest
from server_proc import ServerProcess, metric, wait_engine_idle

WEATHER_FN = {"type": "function", "name": "get_weather", "description": "Current weather in a city.",
              "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                             "required": ["city"], "additionalProperties": False}}
WEATHER_TOOL = {"name": "get_weather", "description": "Current weather in a city.",
                "input_schema": WEATHER_FN["parameters"]}


@pytest.fixture(scope="module")
def oai(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def claude(server: ServerProcess) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=server.base_url, api_key="unused", max_retries=0)


def check_usage(usage: Any, max_output: int) -> None:
    assert usage.input_tokens > 0
    assert 0 < usage.output_tokens <= max_output
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens
    assert usage.output_tokens_details.reasoning_tokens == 0  # SmolLM2 does not think


# -- Responses --------------------------------------------------------------------------------


def test_responses_create(oai: openai.OpenAI, model_name: str) -> None:
    r = oai.responses.create(model=model_name, input="Say hello.", instructions="Be brief.", max_output_tokens=8)
    assert r.object == "response" and r.id.startswith("resp_") and r.model == model_name
    assert r.status in ("completed", "incomplete")
    assert r.status != "incomplete" or r.incomplete_details.reason == "max_output_tokens"
    [msg] = r.output
    assert msg.type == "message" and msg.role == "assistant" and msg.content[0].type == "output_text"
    assert r.output_text == msg.content[0].text and r.output_text
    assert r.instructions == "Be brief." and r.max_output_tokens == 8
    check_usage(r.usage, 8)


def test_responses_stream_events(oai: openai.OpenAI, model_name: str) -> None:
    with oai.responses.stream(model=model_name, input="Say hello.", max_output_tokens=6) as stream:
        events = list(stream)
    # Cut by max_output_tokens it ends "response.incomplete" (get_final_response wants "completed").
    final = events[-1].response  # type: ignore[union-attr]
    types = [e.type for e in events]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = [i for i, t in enumerate(types) if t == "response.output_text.delta"]
    assert deltas and types[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                                    "response.content_part.added"]
    assert set(types[4:deltas[-1] + 1]) == {"response.output_text.delta"}
    assert types[deltas[-1] + 1:] == ["response.output_text.done", "response.content_part.done",
                                      "response.output_item.done",
                                      "response.completed" if final.status == "completed" else "response.incomplete"]
    text = "".join(events[i].delta for i in deltas)  # type: ignore[union-attr]
    assert events[deltas[-1] + 1].text == text  # type: ignore[union-attr]
    assert final.output_text == text and final.id == events[0].response.id  # type: ignore[union-attr]
    check_usage(final.usage, 6)


def test_responses_create_stream_true(oai: openai.OpenAI, model_name: str) -> None:
    """`create(stream=True)`: the raw typed events; the last carries the whole response."""
    events = list(oai.responses.create(model=model_name, input="Hi", max_output_tokens=4, stream=True))
    assert events[0].type == "response.created" and events[0].response.status == "in_progress"
    assert events[-1].type in ("response.completed", "response.incomplete")
    assert 0 < events[-1].response.usage.output_tokens <= 4
    assert events[-1].response.output[0].content[0].text == "".join(
        e.delta for e in events if e.type == "response.output_text.delta")


def test_responses_json_schema(oai: openai.OpenAI, model_name: str) -> None:
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    r = oai.responses.create(model=model_name, input="Is water wet? Answer in JSON.", max_output_tokens=32,
                             text={"format": {"type": "json_schema", "name": "answer", "schema": schema}})
    assert r.status == "completed"
    assert isinstance(json.loads(r.output_text)["ok"], bool)
    assert r.text.format.type == "json_schema"


def test_responses_forced_tool_round_trip(oai: openai.OpenAI, model_name: str) -> None:
    """Named tool_choice -> a function_call item; its output sent back (stateless) -> a text answer."""
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    # greedy: a sampled argument string can run past the token budget (status "incomplete")
    r = oai.responses.create(model=model_name, input=ask, tools=[WEATHER_FN], max_output_tokens=64,
                             temperature=0, tool_choice={"type": "function", "name": "get_weather"})
    calls = [o for o in r.output if o.type == "function_call"]
    assert r.status == "completed" and len(calls) == 1
    call = calls[0]
    assert call.name == "get_weather" and call.id.startswith("fc_") and call.call_id
    assert isinstance(json.loads(call.arguments)["city"], str)
    follow = [*ask, {"type": "function_call", "call_id": call.call_id, "name": call.name,
                     "arguments": call.arguments},
              {"type": "function_call_output", "call_id": call.call_id, "output": '{"temp_c": 21}'}]
    r2 = oai.responses.create(model=model_name, input=follow, tools=[WEATHER_FN], tool_choice="none",
                              max_output_tokens=8)
    assert [o.type for o in r2.output] == ["message"] and r2.output_text


def test_responses_forced_tool_stream(oai: openai.OpenAI, model_name: str) -> None:
    with oai.responses.stream(model=model_name, input="Weather in Oslo?", tools=[WEATHER_FN],
                              tool_choice="required", max_output_tokens=40) as stream:
        events = list(stream)
        final = stream.get_final_response()
    types = [e.type for e in events]
    assert "response.output_text.delta" not in types
    added = types.index("response.output_item.added")
    assert events[added].item.type == "function_call"  # type: ignore[union-attr]
    args = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    done = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert len(done) == 1 and done[0].arguments == args and json.loads(args)["city"]
    assert types[-2:] == ["response.output_item.done", "response.completed"]
    assert final.output[0].type == "function_call" and final.output[0].arguments == args


def test_responses_previous_response_id(oai: openai.OpenAI, model_name: str) -> None:
    r1 = oai.responses.create(model=model_name, input="My name is Ada.", max_output_tokens=6)
    r2 = oai.responses.create(model=model_name, input="What is my name?", previous_response_id=r1.id,
                              max_output_tokens=6)
    assert r2.previous_response_id == r1.id
    # The whole first turn (its input and its answer) is in the second prompt.
    assert r2.usage.input_tokens > r1.usage.input_tokens + r1.usage.output_tokens
    got = oai.responses.retrieve(r1.id)
    assert got.id == r1.id and got.output_text == r1.output_text
    # store=False: answered, but nothing kept to chain from.
    r3 = oai.responses.create(model=model_name, input="Hi", store=False, max_output_tokens=2)
    with pytest.raises(openai.NotFoundError) as exc:
        oai.responses.create(model=model_name, input="Again", previous_response_id=r3.id, max_output_tokens=2)
    assert exc.value.code == "previous_response_not_found"
    oai.responses.delete(r1.id)
    with pytest.raises(openai.NotFoundError):
        oai.responses.retrieve(r1.id)


def test_responses_stream_is_stored(oai: openai.OpenAI, model_name: str) -> None:
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    with oai.responses.stream(model=model_name, input="Is water wet?", max_output_tokens=32,
                              text={"format": {"type": "json_schema", "name": "a", "schema": schema}}) as stream:
        final = stream.get_final_response()
    assert final.status == "completed" and isinstance(json.loads(final.output_text)["ok"], bool)
    r2 = oai.responses.create(model=model_name, input="More", previous_response_id=final.id, max_output_tokens=2)
    assert r2.usage.input_tokens > final.usage.input_tokens


@pytest.mark.parametrize(("body", "param"), [
    ({"input": "x", "previous_response_id": "resp_unknown"}, "previous_response_id"),
    ({"input": "x", "tools": [{"type": "web_search"}]}, "tools[0].type"),
    ({"input": "x", "tools": [{"type": "file_search", "vector_store_ids": ["v"]}]}, "tools[0].type"),
    ({"input": "x", "tool_choice": {"type": "web_search_preview"}, "tools": [WEATHER_FN]}, "tool_choice"),
    ({"input": [{"type": "bogus"}]}, "input[0]"),
    ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input[0].type"),
    # a text-only model: the image is refused, naming the model
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "http://x"}]}]}, "input"),
    ({"input": 5}, "input"),
    ({}, "input"),
    ({"input": "x", "max_output_tokens": "many"}, "max_output_tokens"),
    ({"input": "x", "temperature": 9}, "temperature"),
    ({"input": "x", "text": {"format": {"type": "json_schema", "name": "a"}}}, "text.format.schema"),
    ({"input": "x", "tool_choice": "required"}, "tool_choice"),
    ({"input": "x", "max_output_tokens": 100000}, "input"),  # context_length_exceeded
    ({"input": "x", "background": True}, "background"),
    ({"input": [{"type": "function_call_output", "output": "x"}]}, "input[0].call_id"),
    ({"input": "x", "tools": [{"type": "function", "name": "f", "parameters": "not a schema"}]},
     "tools[0].parameters"),  # rejected by the chat request it becomes: still a 400 naming the field
])
def test_responses_bad_input(server: ServerProcess, body: dict[str, Any], param: str) -> None:
    r = httpx.post(f"{server.base_url}/v1/responses", json=body, timeout=30)
    assert r.status_code in (400, 404), r.text
    err = r.json()["error"]
    assert err["param"] == param and err["message"] and err["type"] == "invalid_request_error", err
    assert (r.status_code == 404) == (param == "previous_response_id")


def test_responses_unknown_id_routes(oai: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError):
        oai.responses.retrieve("resp_nope")
    with pytest.raises(openai.NotFoundError):
        oai.responses.delete("resp_nope")


# -- Anthropic Messages ---------------------------------------------------------------------


def test_messages_create(claude: anthropic.Anthropic, model_name: str) -> None:
    m = claude.messages.create(model=model_name, max_tokens=8, system="Be brief.",
                               messages=[{"role": "user", "content": "Say hello."}])
    assert m.type == "message" and m.role == "assistant" and m.id.startswith("msg_") and m.model == model_name
    assert m.stop_reason in ("end_turn", "max_tokens")
    assert [b.type for b in m.content] == ["text"] and m.content[0].text
    assert m.usage.input_tokens > 0 and 0 < m.usage.output_tokens <= 8
    counted = claude.messages.count_tokens(model=model_name, system="Be brief.",
                                           messages=[{"role": "user", "content": "Say hello."}])
    assert counted.input_tokens == m.usage.input_tokens


def test_messages_stream(claude: anthropic.Anthropic, model_name: str) -> None:
    msgs = [{"role": "user", "content": [{"type": "text", "text": "Say hello."}]}]
    with claude.messages.stream(model=model_name, max_tokens=6, messages=msgs) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert final.content[0].type == "text" and final.content[0].text == text and text
    assert final.stop_reason in ("end_turn", "max_tokens") and 0 < final.usage.output_tokens <= 6
    assert final.usage.input_tokens == claude.messages.count_tokens(model=model_name, messages=msgs).input_tokens


def test_messages_raw_event_order(claude: anthropic.Anthropic, model_name: str) -> None:
    events = list(claude.messages.create(model=model_name, max_tokens=5, stream=True,
                                         messages=[{"role": "user", "content": "Hi"}]))
    types = [e.type for e in events]
    assert types[:2] == ["message_start", "content_block_start"]
    assert set(types[2:-3]) == {"content_block_delta"}
    assert types[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert events[0].message.content == [] and events[0].message.stop_reason is None
    # The prompt length is known before generation, as Anthropic announces it in message_start.
    assert events[0].message.usage.input_tokens == events[-2].usage.input_tokens > 0
    assert all(e.delta.type == "text_delta" for e in events if e.type == "content_block_delta")
    assert events[-2].delta.stop_reason in ("end_turn", "max_tokens") and events[-2].usage.output_tokens > 0


def test_messages_forced_tool_round_trip(claude: anthropic.Anthropic, model_name: str) -> None:
    ask = {"role": "user", "content": "What is the weather in Paris?"}
    # greedy, with room for the arguments (as below)
    m = claude.messages.create(model=model_name, max_tokens=64, extra_body={"temperature": 0.0},
                               tools=[WEATHER_TOOL], messages=[ask], tool_choice={"type": "tool", "name": "get_weather"})
    assert m.stop_reason == "tool_use"
    uses = [b for b in m.content if b.type == "tool_use"]
    assert len(uses) == 1 and uses[0].name == "get_weather" and isinstance(uses[0].input["city"], str)
    follow = [ask, {"role": "assistant", "content": m.content},
              {"role": "user", "content": [{"type": "tool_result", "tool_use_id": uses[0].id,
                                            "content": [{"type": "text", "text": "21 C, sunny"}]}]}]
    m2 = claude.messages.create(model=model_name, max_tokens=8, tools=[WEATHER_TOOL], messages=follow,
                                tool_choice={"type": "none"})
    assert m2.stop_reason in ("end_turn", "max_tokens") and [b.type for b in m2.content] == ["text"]
    assert m2.usage.input_tokens == claude.messages.count_tokens(
        model=model_name, tools=[WEATHER_TOOL], messages=follow, tool_choice={"type": "none"}).input_tokens


def test_messages_forced_tool_stream(claude: anthropic.Anthropic, model_name: str) -> None:
    # greedy, with room for the arguments: a sampled argument can run past a short budget
    with claude.messages.stream(model=model_name, max_tokens=64, extra_body={"temperature": 0.0},
                                tools=[WEATHER_TOOL], tool_choice={"type": "any"},
                                messages=[{"role": "user", "content": "Weather in Oslo?"}]) as stream:
        events = list(stream)
        final = stream.get_final_message()
    partial = "".join(e.delta.partial_json for e in events
                      if e.type == "content_block_delta" and e.delta.type == "input_json_delta")
    assert final.stop_reason == "tool_use"
    [use] = [b for b in final.content if b.type == "tool_use"]
    assert json.loads(partial) == use.input and use.input["city"]


@pytest.mark.parametrize(("body", "status", "needle"), [
    ({"messages": [{"role": "user", "content": "hi"}]}, 400, "max_tokens"),
    ({"max_tokens": "x", "messages": [{"role": "user", "content": "hi"}]}, 400, "max_tokens"),
    ({"max_tokens": 0, "messages": [{"role": "user", "content": "hi"}]}, 400, "max_tokens"),
    ({"max_tokens": 4, "messages": []}, 400, "messages"),
    ({"max_tokens": 4, "messages": [{"role": "system", "content": "hi"}]}, 400, "role"),
    ({"max_tokens": 4, "messages": [{"role": "user", "content": [{"type": "wat"}]}]}, 400, "type"),
    ({"max_tokens": 4, "messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]}, 400, "image"),
    ({"max_tokens": 4, "messages": [{"role": "user", "content": [{"type": "tool_result"}]}]}, 400, "tool_use_id"),
    ({"max_tokens": 4, "temperature": 1.5, "messages": [{"role": "user", "content": "hi"}]}, 400, "temperature"),
    ({"max_tokens": 4, "tools": [{"type": "web_search_20250305", "name": "web_search"}],
      "messages": [{"role": "user", "content": "hi"}]}, 400, "tools[0].type"),
    ({"max_tokens": 4, "tools": [WEATHER_TOOL], "tool_choice": {"type": "tool", "name": "nope"},
      "messages": [{"role": "user", "content": "hi"}]}, 400, "tool_choice"),
    ({"max_tokens": 4, "stop_sequences": ["a", "b", "c", "d", "e"],
      "messages": [{"role": "user", "content": "hi"}]}, 400, "stop_sequences"),
    ({"max_tokens": 100000, "messages": [{"role": "user", "content": "hi"}]}, 400, "context"),
    ({"max_tokens": 4, "tools": [{"name": "f" * 100, "input_schema": {"type": "object"}}],
      "messages": [{"role": "user", "content": "hi"}]}, 400, "tools[0].name"),
    ({"model": "no-such-model", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}, 404, "no-such-model"),
])
def test_messages_bad_input(server: ServerProcess, model_name: str, body: dict[str, Any], status: int,
                            needle: str) -> None:
    r = httpx.post(f"{server.base_url}/v1/messages", json={"model": model_name, **body}, timeout=30)
    assert r.status_code == status, r.text
    err = r.json()
    assert err["type"] == "error" and set(err["error"]) == {"type", "message"}, err
    assert err["error"]["type"] == ("not_found_error" if status == 404 else "invalid_request_error")
    assert needle in err["error"]["message"], err


def test_messages_errors_through_sdk(claude: anthropic.Anthropic, server: ServerProcess, model_name: str) -> None:
    with pytest.raises(anthropic.NotFoundError) as nf:
        claude.messages.create(model="no-such-model", max_tokens=4, messages=[{"role": "user", "content": "hi"}])
    assert nf.value.body["error"]["type"] == "not_found_error"  # type: ignore[index]
    with pytest.raises(anthropic.BadRequestError):
        claude.messages.count_tokens(model=model_name, messages=[])
    r = httpx.post(f"{server.base_url}/v1/messages", content=b"{not json", timeout=10,
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.post(f"{server.base_url}/v1/messages/nope", json={}, timeout=10)
    assert r.status_code == 404 and r.json()["type"] == "error"


@pytest.mark.parametrize(("path", "body"), [
    ("/v1/responses", {"input": "Write a long story.", "max_output_tokens": 800, "stream": True}),
    ("/v1/messages", {"messages": [{"role": "user", "content": "Write a long story."}], "max_tokens": 800,
                      "stream": True}),
])
def test_stream_disconnect_frees_kv(server: ServerProcess, model_name: str, path: str, body: dict[str, Any]) -> None:
    """The chat run's disconnect watch reaches through the bridge: closing the stream aborts at once."""
    with httpx.stream("POST", f"{server.base_url}{path}", json={"model": model_name, "ignore_eos": True, **body},
                      timeout=60) as r:
        lines = r.iter_lines()
        for _ in range(12):  # past the opening events, into the deltas
            next(lines)
        assert metric(server.base_url, "dashchat_num_requests_running") >= 1
    # A generous deadline (polled): the abort lands at the engine's next step, slow on a busy machine.
    assert wait_engine_idle(server.base_url, timeout=30) == (0, 0)


def test_metrics_by_route(server: ServerProcess, oai: openai.OpenAI, claude: anthropic.Anthropic,
                          model_name: str) -> None:
    oai.responses.create(model=model_name, input="Hi", max_output_tokens=1, store=False)
    claude.messages.create(model=model_name, max_tokens=1, messages=[{"role": "user", "content": "Hi"}])
    claude.messages.count_tokens(model=model_name, messages=[{"role": "user", "content": "Hi"}])
    text = httpx.get(f"{server.base_url}/metrics").text
    for route in ("/v1/responses", "/v1/messages", "/v1/messages/count_tokens"):
        assert f'route="{route}",status="200"' in text, route
