"""/v1/responses and /v1/messages for a thinking model, in-process over scripted model outputs and
Qwen3's real chat template, parsed by the official SDKs (their http client is the TestClient): reasoning
items and thinking blocks whole and streamed, a tool call after the thinking, the request's thinking
switches reaching the template, and the translation of input items and content blocks."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import ExitStack
from typing import Any

import anthropic
import openai
import pytest
from server_fakes import ScriptedEngine
from starlette.testclient import TestClient
from tiny_qwen3 import QWEN3_TEMPLATE

from dashchat.server.app import build_app
from dashchat.server.config import ServerConfig
from dashchat.server.routes.response_store import ResponseStore
from dashchat.server.routes.messages import CountTokensRequest, chat_messages
from dashchat.server.routes.responses import ResponsesRequest, input_messages

THOUGHT = "<think>\nThe user asks 2+2. That is 4.\n</think>\n\n"
REASONING = "The user asks 2+2. That is 4."
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
FN = {"type": "function", "name": "get_weather",
      "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
TOOL = {"name": "get_weather", "input_schema": FN["parameters"]}

_stack = ExitStack()


@pytest.fixture(autouse=True)
def _close_clients() -> Iterator[None]:
    yield
    _stack.close()


def clients(reply: str) -> tuple[openai.OpenAI, anthropic.Anthropic, ScriptedEngine]:
    engine = ScriptedEngine(reply, max_model_len=4096)
    cfg = ServerConfig(served_model_names=["m"], chat_template=QWEN3_TEMPLATE)
    http = _stack.enter_context(TestClient(build_app(engine, cfg)))
    oai = openai.OpenAI(base_url="http://testserver/v1", api_key="x", http_client=http, max_retries=0)
    claude = anthropic.Anthropic(base_url="http://testserver", api_key="x", http_client=http, max_retries=0)
    return oai, claude, engine


def prompt(engine: ScriptedEngine) -> str:
    return engine.tokenizer.decode(engine.last_prompt)


# -- Responses ---------------------------------------------------------------------------------


def test_responses_reasoning_item_then_message() -> None:
    oai, _, _ = clients(THOUGHT + "It is 4.")
    r = oai.responses.create(model="m", input="What is 2+2?")
    assert [o.type for o in r.output] == ["reasoning", "message"]
    assert r.output[0].content[0].type == "reasoning_text" and r.output[0].content[0].text == REASONING
    assert r.output_text == "It is 4." and r.status == "completed"
    assert r.usage.output_tokens_details.reasoning_tokens > 0


def test_responses_reasoning_streamed_first() -> None:
    oai, _, _ = clients(THOUGHT + "It is 4.")
    with oai.responses.stream(model="m", input="What is 2+2?") as stream:
        events = list(stream)
        final = stream.get_final_response()
    types = [e.type for e in events]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    first_text = types.index("response.output_text.delta")
    assert types.index("response.reasoning_text.delta") < first_text
    assert "response.reasoning_text.delta" not in types[first_text:]
    reasoning = "".join(e.delta for e in events if e.type == "response.reasoning_text.delta")
    assert reasoning == REASONING
    # Each item is opened, filled and closed before the next one opens.
    item_events = [(e.type, e.output_index) for e in events if e.type.startswith("response.output_item")]
    assert item_events == [("response.output_item.added", 0), ("response.output_item.done", 0),
                           ("response.output_item.added", 1), ("response.output_item.done", 1)]
    assert [o.type for o in final.output] == ["reasoning", "message"] and final.output_text == "It is 4."
    assert final.output[0].content[0].text == REASONING


def test_responses_call_after_thinking_and_effort_none() -> None:
    oai, _, engine = clients(THOUGHT + CALL)
    r = oai.responses.create(model="m", input="Weather in Paris?", tools=[FN], tool_choice="required")
    assert [o.type for o in r.output] == ["reasoning", "function_call"]
    assert json.loads(r.output[1].arguments) == {"city": "Paris"}
    # reasoning.effort "none" turns the template's thinking off (Qwen3: an empty think block in the prompt).
    oai.responses.create(model="m", input="Hi", reasoning={"effort": "none"})
    assert prompt(engine).endswith("<think>\n\n</think>\n\n")


def test_responses_previous_turn_keeps_reasoning_and_calls() -> None:
    oai, _, engine = clients(THOUGHT + CALL)
    r1 = oai.responses.create(model="m", input="Weather in Paris?", tools=[FN], tool_choice="required")
    call = r1.output[1]
    oai.responses.create(model="m", previous_response_id=r1.id, tools=[FN], tool_choice="none",
                         input=[{"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}])
    text = prompt(engine)
    assert "Weather in Paris?" in text and '"city": "Paris"' in text and "sunny" in text


def test_input_items_to_chat_messages() -> None:
    req = ResponsesRequest.model_validate({"input": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "input_text", "text": "Weather "}, {"type": "input_text", "text": "?"}]},
        {"type": "reasoning", "id": "rs_1", "summary": [], "content": [{"type": "reasoning_text", "text": "hmm"}]},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Let me look."}]},
        {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": '{"city":"Oslo"}'},
        {"type": "function_call", "call_id": "c2", "name": "get_weather", "arguments": '{"city":"Rome"}'},
        {"type": "function_call_output", "call_id": "c1", "output": "cold"},
        {"type": "function_call_output", "call_id": "c2", "output": [{"type": "input_text", "text": "warm"}]},
    ]})
    assert input_messages(req.input) == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather ?"},
        {"role": "assistant", "content": "Let me look.", "reasoning_content": "hmm", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'}},
            {"id": "c2", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Rome"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "cold"},
        {"role": "tool", "tool_call_id": "c2", "content": "warm"},
    ]
    assert input_messages("hi") == [{"role": "user", "content": "hi"}]
    only_call = input_messages(ResponsesRequest.model_validate({"input": [
        {"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"}]}).input)
    assert only_call[0]["content"] is None


# -- Anthropic Messages ------------------------------------------------------------------------


def test_messages_thinking_block_then_text() -> None:
    _, claude, _ = clients(THOUGHT + "It is 4.")
    m = claude.messages.create(model="m", max_tokens=200, messages=[{"role": "user", "content": "What is 2+2?"}])
    assert [b.type for b in m.content] == ["thinking", "text"]
    assert m.content[0].thinking == REASONING and m.content[1].text == "It is 4."
    assert m.stop_reason == "end_turn"


def test_messages_thinking_streamed_first() -> None:
    _, claude, _ = clients(THOUGHT + "It is 4.")
    with claude.messages.stream(model="m", max_tokens=200,
                                messages=[{"role": "user", "content": "What is 2+2?"}]) as stream:
        events = list(stream)
        final = stream.get_final_message()
    starts = [e.content_block.type for e in events if e.type == "content_block_start"]
    assert starts == ["thinking", "text"]
    deltas = [e.delta.type for e in events if e.type == "content_block_delta"]
    assert deltas.index("text_delta") > deltas.index("thinking_delta")
    assert "thinking_delta" not in deltas[deltas.index("text_delta"):]
    assert [b.type for b in final.content] == ["thinking", "text"] and final.content[0].thinking == REASONING
    assert final.usage.input_tokens > 0  # message_delta carries it; the SDK applies it


def test_messages_tool_use_after_thinking_and_thinking_switch() -> None:
    _, claude, engine = clients(THOUGHT + CALL)
    m = claude.messages.create(model="m", max_tokens=200, tools=[TOOL], tool_choice={"type": "any"},
                               messages=[{"role": "user", "content": "Weather in Paris?"}])
    assert [b.type for b in m.content] == ["thinking", "tool_use"] and m.stop_reason == "tool_use"
    assert m.content[1].input == {"city": "Paris"}
    claude.messages.create(model="m", max_tokens=50, thinking={"type": "disabled"},
                           messages=[{"role": "user", "content": "Hi"}])
    assert prompt(engine).endswith("<think>\n\n</think>\n\n")
    claude.messages.create(model="m", max_tokens=50, thinking={"type": "enabled", "budget_tokens": 1024},
                           messages=[{"role": "user", "content": "Hi"}])
    assert not prompt(engine).endswith("</think>\n\n")


def test_messages_cut_inside_thinking_stays_thinking() -> None:
    _, claude, _ = clients(THOUGHT + "It is 4.")
    # The scripted engine's tokens are bytes: 20 of them end inside the think block.
    m = claude.messages.create(model="m", max_tokens=20, messages=[{"role": "user", "content": "What is 2+2?"}])
    assert m.stop_reason == "max_tokens" and [b.type for b in m.content] == ["thinking"]
    assert REASONING.startswith(m.content[0].thinking.strip()) and m.content[0].thinking.strip()


def test_content_blocks_to_chat_messages() -> None:
    req = CountTokensRequest.model_validate({"model": "m", "system": [{"type": "text", "text": "Be brief."}],
                                             "messages": [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": [
            {"type": "thinking", "thinking": "hmm", "signature": ""},
            {"type": "text", "text": "Looking."},
            {"type": "tool_use", "id": "t1", "name": "get_weather", "input": {"city": "Oslo"}}]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "t1", "content": [{"type": "text", "text": "cold"}]},
            {"type": "tool_result", "tool_use_id": "t2", "content": "boom", "is_error": True},
            {"type": "text", "text": "Thanks"}]},
    ]})
    assert chat_messages(req) == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": "Looking.", "reasoning_content": "hmm", "tool_calls": [
            {"id": "t1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
        {"role": "tool", "tool_call_id": "t1", "content": "cold"},
        {"role": "tool", "tool_call_id": "t2", "content": "Error: boom"},
        {"role": "user", "content": "Thanks"},
    ]


def test_count_tokens_matches_generation_prompt() -> None:
    _, claude, engine = clients("ok")
    msgs = [{"role": "user", "content": "What is 2+2?"}]
    m = claude.messages.create(model="m", max_tokens=5, system="Be brief.", tools=[TOOL], messages=msgs)
    counted = claude.messages.count_tokens(model="m", system="Be brief.", tools=[TOOL], messages=msgs)
    assert counted.input_tokens == m.usage.input_tokens == len(engine.last_prompt)


# -- the store -------------------------------------------------------------------------------------


def test_response_store_bounds() -> None:
    store = ResponseStore(max_entries=2, max_bytes=10_000)
    for i in range(3):
        store.put({"id": f"r{i}"}, [{"role": "user", "content": "x"}])
    assert store.get("r0") is None and len(store) == 2  # oldest out by count
    assert store.get("r1") is not None  # r1 is now the most recently used...
    store.put({"id": "r3"}, [])
    assert store.get("r2") is None and store.get("r1") is not None  # ...so r2 went first
    store.put({"id": "big"}, [{"role": "user", "content": "x" * 20_000}])
    assert store.get("big") is None and len(store) == 2  # larger than the whole store: not kept
    store.put({"id": "half"}, [{"role": "user", "content": "x" * 6_000}])
    store.put({"id": "half2"}, [{"role": "user", "content": "x" * 6_000}])
    # Past the byte bound the oldest go, whatever their size: only half2 is left.
    assert store.get("half") is None and store.get("half2") is not None and len(store) == 1
    assert store.delete("half2") and not store.delete("half2") and len(store) == 0


def test_text_then_call_streamed_as_separate_items() -> None:
    oai, claude, _ = clients("Let me check.\n" + CALL)
    with oai.responses.stream(model="m", input="Weather in Paris?", tools=[FN],
                              reasoning={"effort": "none"}) as stream:
        events = list(stream)
        final = stream.get_final_response()
    added = [e.item.type for e in events if e.type == "response.output_item.added"]
    assert added == ["message", "function_call"]
    assert [o.type for o in final.output] == ["message", "function_call"]
    assert final.output[0].content[0].text.strip() == "Let me check."
    assert json.loads(final.output[1].arguments) == {"city": "Paris"}
    whole = oai.responses.create(model="m", input="Weather in Paris?", tools=[FN], reasoning={"effort": "none"})
    assert [o.type for o in whole.output] == ["message", "function_call"]

    with claude.messages.stream(model="m", max_tokens=300, tools=[TOOL], thinking={"type": "disabled"},
                                messages=[{"role": "user", "content": "Weather in Paris?"}]) as s:
        m = s.get_final_message()
    assert [b.type for b in m.content] == ["text", "tool_use"] and m.stop_reason == "tool_use"
    assert m.content[1].input == {"city": "Paris"}


def test_messages_stop_sequence_reported() -> None:
    _, claude, _ = clients("It is 4. STOP and more")
    msgs = [{"role": "user", "content": "What is 2+2?"}]
    m = claude.messages.create(model="m", max_tokens=100, stop_sequences=["STOP"], thinking={"type": "disabled"},
                               messages=msgs)
    assert m.stop_reason == "stop_sequence" and m.stop_sequence == "STOP" and m.content[0].text == "It is 4. "
    with claude.messages.stream(model="m", max_tokens=100, stop_sequences=["STOP"], thinking={"type": "disabled"},
                                messages=msgs) as stream:
        final = stream.get_final_message()
    assert final.stop_reason == "stop_sequence" and final.stop_sequence == "STOP"
    plain = claude.messages.create(model="m", max_tokens=100, thinking={"type": "disabled"}, messages=msgs)
    assert plain.stop_reason == "end_turn" and plain.stop_sequence is None
