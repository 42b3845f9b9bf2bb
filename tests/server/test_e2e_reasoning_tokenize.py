"""A real server on a tiny random-weight Qwen3 with Qwen3's real chat template: /tokenize and
/detokenize, enable_thinking reaching the template, and grammars that start after the thinking.

The weights are random, so the model is steered with logit_bias: `<think>` +50 and `</think>` +100
make it open a block (where the grammar allows the opener) and close it at once; from there a
required tool call or a json_schema must hold, and nothing of it may land in the reasoning.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from server_proc import ServerProcess, running
from tiny_qwen3 import IDS, THINK_CLOSE, THINK_OPEN, write_model

pytest.importorskip("transformers")
pytest.importorskip("xgrammar")

MSG = [{"role": "user", "content": "Weather in Paris?"}]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]}},
    "required": ["city"], "additionalProperties": False}}}]
SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
          "additionalProperties": False}
THINK_THEN_CLOSE = {str(THINK_OPEN): 50, str(THINK_CLOSE): 100}


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    path: Path = write_model(tmp_path_factory.mktemp("tiny-qwen3"))
    yield from running("--model-path", str(path), "--device", "cpu", "--max-model-len", "2048",
                       "--max-num-seqs", "4", "--kv-cache-memory", "0.05")


def post(srv: ServerProcess, path: str, body: dict) -> httpx.Response:
    return httpx.post(srv.base_url + path, json=body, timeout=120)


def chat(srv: ServerProcess, **body: object) -> dict:
    r = post(srv, "/v1/chat/completions", {"messages": MSG, "temperature": 0, "max_tokens": 120, **body})
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


# ---------------------------------------------------------------- /tokenize, /detokenize


def test_tokenize_prompt_and_detokenize_round_trip(qwen3: ServerProcess) -> None:
    r = post(qwen3, "/tokenize", {"prompt": "Hi <think>x</think>"})
    assert r.status_code == 200
    body = r.json()
    assert body["tokens"] == [ord("H"), ord("i"), ord(" "), THINK_OPEN, ord("x"), THINK_CLOSE]
    assert body["count"] == 6 and body["max_model_len"] == 2048 and body["token_strs"] is None
    strs = post(qwen3, "/tokenize", {"prompt": "Hi", "return_token_strs": True}).json()["token_strs"]
    assert strs == ["H", "i"]
    back = post(qwen3, "/detokenize", {"tokens": body["tokens"] + [IDS["<|im_end|>"]]})
    assert back.status_code == 200 and back.json() == {"prompt": "Hi <think>x</think><|im_end|>"}


def test_tokenize_messages_applies_the_template_and_its_kwargs(qwen3: ServerProcess) -> None:
    def prompt(**extra: object) -> str:
        r = post(qwen3, "/tokenize", {"messages": MSG, **extra})
        assert r.status_code == 200, r.text
        tokens = r.json()["tokens"]
        assert r.json()["count"] == len(tokens)
        return str(post(qwen3, "/detokenize", {"tokens": tokens}).json()["prompt"])

    assert prompt() == "<|im_start|>user\nWeather in Paris?<|im_end|>\n<|im_start|>assistant\n"
    assert prompt(chat_template_kwargs={"enable_thinking": False}).endswith(
        "<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert prompt(add_generation_prompt=False) == "<|im_start|>user\nWeather in Paris?<|im_end|>\n"
    assert prompt(add_generation_prompt=False, continue_final_message=True) == (
        "<|im_start|>user\nWeather in Paris?")
    assert '"name": "get_weather"' in prompt(tools=TOOLS)


@pytest.mark.parametrize("path,body,param", [
    ("/tokenize", {}, "prompt"),
    ("/tokenize", {"prompt": "a", "messages": MSG}, "messages"),
    ("/tokenize", {"prompt": ["a"]}, "prompt"),
    ("/tokenize", {"messages": []}, "messages"),
    ("/tokenize", {"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
    ("/tokenize", {"prompt": "a", "tools": TOOLS}, "tools"),
    ("/tokenize", {"messages": MSG, "continue_final_message": True}, "continue_final_message"),
    ("/tokenize", {"messages": MSG, "chat_template_kwargs": "x"}, "chat_template_kwargs"),
    ("/detokenize", {"tokens": [1, -1]}, "tokens"),
    ("/detokenize", {"tokens": [10 ** 30]}, "tokens[0]"),  # past int64: the central check names the item
    ("/detokenize", {"tokens": "abc"}, "tokens"),
    ("/detokenize", {}, "tokens"),
])
def test_bad_input_is_a_400_in_openai_shape(qwen3: ServerProcess, path: str, body: dict, param: str) -> None:
    r = post(qwen3, path, body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param and err["message"]


def test_unknown_model_is_404(qwen3: ServerProcess) -> None:
    r = post(qwen3, "/tokenize", {"model": "nope", "prompt": "a"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


# ---------------------------------------------------------------- grammars after the thinking


def test_required_tool_call_after_thinking(qwen3: ServerProcess) -> None:
    body = chat(qwen3, tools=TOOLS, tool_choice="required", parallel_tool_calls=False, logit_bias=THINK_THEN_CLOSE)
    choice = body["choices"][0]
    assert choice["finish_reason"] == "tool_calls", choice
    (call,) = choice["message"]["tool_calls"]
    assert call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"])["city"] in ("Paris", "Rome")
    assert choice["message"]["content"] is None
    assert "reasoning_content" not in choice["message"]  # the block was opened and closed at once
    assert body["usage"]["completion_tokens_details"]["reasoning_tokens"] == 2


def test_json_schema_after_thinking_streamed(qwen3: ServerProcess) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "r", "schema": SCHEMA}}
    r = post(qwen3, "/v1/chat/completions", {
        "messages": MSG, "temperature": 0, "max_tokens": 120, "stream": True, "response_format": fmt,
        "logit_bias": THINK_THEN_CLOSE, "stream_options": {"include_usage": True}})
    assert r.status_code == 200
    chunks = [json.loads(b[6:]) for b in r.text.split("\n\n") if b.startswith("data: {")]
    content = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert isinstance(json.loads(content)["ok"], bool)
    assert chunks[-1]["usage"]["completion_tokens_details"]["reasoning_tokens"] == 2


def test_thinking_off_means_the_grammar_from_the_first_token(qwen3: ServerProcess) -> None:
    body = chat(qwen3, tools=TOOLS, tool_choice="required", parallel_tool_calls=False, logit_bias=THINK_THEN_CLOSE,
                chat_template_kwargs={"enable_thinking": False})
    choice = body["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert body["usage"]["completion_tokens_details"]["reasoning_tokens"] == 0  # <think> was never allowed


def test_cut_inside_the_thinking_stays_reasoning(qwen3: ServerProcess) -> None:
    # <think> +100 then nothing closes it: every token is thinking until max_tokens.
    body = chat(qwen3, max_tokens=8, logit_bias={str(THINK_OPEN): 100, str(THINK_CLOSE): -100})
    choice = body["choices"][0]
    assert choice["finish_reason"] == "length"
    assert choice["message"]["content"] is None
    assert choice["message"]["reasoning_content"] == "<think>" * 7  # the first one opened the block
    assert body["usage"]["completion_tokens_details"]["reasoning_tokens"] == 8


def test_openai_sdk_reads_the_reasoning(qwen3: ServerProcess) -> None:
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=qwen3.base_url + "/v1", api_key="unused")
    bias = {str(THINK_OPEN): 100, str(THINK_CLOSE): -100}
    model = client.models.list().data[0].id
    reply = client.chat.completions.create(model=model, messages=MSG, max_tokens=4, temperature=0, logit_bias=bias)
    msg = reply.choices[0].message
    assert msg.content is None and msg.reasoning_content == msg.reasoning == "<think>" * 3  # type: ignore[attr-defined]
    assert reply.usage is not None and reply.usage.completion_tokens_details is not None
    assert reply.usage.completion_tokens_details.reasoning_tokens == 4
    streamed = ""
    for chunk in client.chat.completions.create(model=model, messages=MSG, max_tokens=4, temperature=0,
                                                logit_bias=bias, stream=True):
        delta = chunk.choices[0].delta
        assert not delta.content
        streamed += getattr(delta, "reasoning_content", None) or ""
    assert streamed == "<think>" * 3
