"""The real server and engine (SmolLM2-135M), driven by the official openai SDK."""

from __future__ import annotations

import json

import openai
import pytest
from openai import OpenAI
from server_proc import ServerProcess

MSG = [{"role": "user", "content": "Name three colors."}]


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> OpenAI:
    return OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0, timeout=120)


def test_models(client: OpenAI, model_name: str) -> None:
    models = client.models.list().data
    assert [m.id for m in models] == [model_name]
    assert model_name.lower().startswith("smollm2")
    assert client.models.retrieve(model_name).id == model_name
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


def test_chat(client: OpenAI, model_name: str) -> None:
    r = client.chat.completions.create(model=model_name, messages=MSG, max_tokens=24)
    assert r.id.startswith("chatcmpl-") and r.object == "chat.completion" and r.model == model_name
    c = r.choices[0]
    assert c.message.role == "assistant" and c.message.content and c.finish_reason in ("stop", "length")
    assert c.message.tool_calls is None
    assert r.usage and r.usage.completion_tokens <= 24
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_stream_equals_non_stream_greedy(client: OpenAI, model_name: str) -> None:
    kw = dict(model=model_name, messages=[{"role": "user", "content": "你好！Say hi with an emoji."}],
              max_tokens=32, temperature=0)
    full = client.chat.completions.create(**kw).choices[0].message.content
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    finish = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
    assert finish in ("stop", "length")
    text = "".join(pieces)
    assert text == full
    # Multi-byte characters split across tokens arrive whole; only a length cut inside the
    # very last character may leave one U+FFFD at the end (as a one-shot decode would).
    if finish == "length" and text.endswith("\ufffd"):
        text = text[:-1]
    assert "\ufffd" not in text and any(ord(ch) > 0xFFFF or ord(ch) > 0x2E80 for ch in text)
    assert chunks[-1].choices == [] and chunks[-1].usage and chunks[-1].usage.completion_tokens > 0


def test_n_seed_and_logprobs(client: OpenAI, model_name: str) -> None:
    kw = dict(model=model_name, messages=MSG, max_tokens=12, n=2, seed=1234, temperature=1.0,
              logprobs=True, top_logprobs=3)
    a = client.chat.completions.create(**kw)
    b = client.chat.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1]
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    lp = a.choices[0].logprobs
    assert lp and lp.content and len(lp.content[0].top_logprobs) == 3
    assert all(e.logprob <= 0 and e.bytes is not None for e in lp.content)


def test_stop_string(client: OpenAI, model_name: str) -> None:
    kw = dict(model=model_name, messages=[{"role": "user", "content": "Count from 1 to 20, separated by commas."}],
              max_tokens=30, temperature=0)
    full = client.chat.completions.create(**kw).choices[0].message.content or ""
    assert "5" in full, full
    stop = "5"
    cut = client.chat.completions.create(stop=[stop], **kw).choices[0]
    assert cut.finish_reason == "stop" and cut.message.content == full[: full.index(stop)]
    streamed = "".join(c.choices[0].delta.content or "" for c in
                       client.chat.completions.create(stop=stop, stream=True, **kw) if c.choices)
    assert streamed == cut.message.content


def test_length_and_max_completion_tokens(client: OpenAI, model_name: str) -> None:
    r = client.chat.completions.create(model=model_name, messages=MSG, max_completion_tokens=3,
                                       extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "length" and r.usage and r.usage.completion_tokens == 3


def test_completions(client: OpenAI, model_name: str) -> None:
    r = client.completions.create(model=model_name, prompt="The capital of France is", max_tokens=5, temperature=0)
    assert r.object == "text_completion" and r.choices[0].text
    ids = client.completions.create(model=model_name, prompt=[504, 3575, 282], max_tokens=4, logprobs=2)
    assert ids.choices[0].logprobs and len(ids.choices[0].logprobs.tokens or []) >= 1
    s = list(client.completions.create(model=model_name, prompt="Hello", max_tokens=4, stream=True))
    assert s[-1].choices[0].finish_reason in ("stop", "length")


def test_errors_are_openai_shaped(client: OpenAI, model_name: str) -> None:
    with pytest.raises(openai.NotFoundError) as nf:
        client.chat.completions.create(model="gpt-4o", messages=MSG)
    assert nf.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as br:
        client.chat.completions.create(model=model_name, messages=MSG, max_tokens=100_000)
    assert br.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model=model_name, messages=MSG, temperature=5)
    assert bad.value.param == "temperature"
    with pytest.raises(openai.BadRequestError) as tc:
        client.chat.completions.create(model=model_name, messages=MSG, tool_choice="required")
    assert tc.value.param == "tool_choice"


def test_tool_call_forced_by_grammar(client: OpenAI, model_name: str) -> None:
    pytest.importorskip("xgrammar")
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
    msgs = [{"role": "user", "content": "What is the weather in Paris?"}]
    r = client.chat.completions.create(model=model_name, messages=msgs, tools=tools, tool_choice="required", parallel_tool_calls=False,
                                       max_tokens=80, temperature=0)
    c = r.choices[0]
    assert c.finish_reason == "tool_calls" and c.message.tool_calls
    call = c.message.tool_calls[0]
    assert call.id and call.type == "function" and call.function.name == "get_weather"
    assert "city" in json.loads(call.function.arguments)

    chunks = list(client.chat.completions.create(
        model=model_name, messages=msgs, tools=tools, max_tokens=80, temperature=0, stream=True,
        tool_choice={"type": "function", "function": {"name": "get_weather"}}))
    deltas = [tc for ch in chunks if ch.choices for tc in (ch.choices[0].delta.tool_calls or [])]
    assert deltas and deltas[0].id and deltas[0].function and deltas[0].function.name == "get_weather"
    args = "".join(d.function.arguments or "" for d in deltas if d.function)
    assert "city" in json.loads(args)
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "tool_calls"


def test_json_response_format(client: OpenAI, model_name: str) -> None:
    pytest.importorskip("xgrammar")
    schema = {"type": "object", "properties": {"color": {"type": "string"}}, "required": ["color"]}
    r = client.chat.completions.create(
        model=model_name, messages=[{"role": "user", "content": "Give a color as JSON."}], max_tokens=40,
        temperature=0, response_format={"type": "json_schema", "json_schema": {"name": "c", "schema": schema}})
    assert "color" in json.loads(r.choices[0].message.content or "")
