"""Ollama's API (/api/*) through the `ollama` Python client, unchanged, against the shared SmolLM2 server.

Greedy requests are compared with the same request on /v1: one generation path serves both APIs,
so the text must match token for token. (Tool-call and thinking output shapes, which SmolLM2 does
not produce by itself, are checked over scripted output in test_ollama_inprocess.py.)
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import ollama
import pytest
from server_proc import ServerProcess

GREEDY = {"temperature": 0, "num_predict": 8}
MSGS = [{"role": "user", "content": "Name three colors."}]
CITY = {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Oslo", "Lima"]}},
        "required": ["city"], "additionalProperties": False}
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city.",
                                            "parameters": CITY}}


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> ollama.Client:
    return ollama.Client(host=server.base_url, timeout=300)


def _v1(server: ServerProcess, path: str, **body: Any) -> dict[str, Any]:
    """The /v1 request, after one token of the same prompt (the warm-up, see below)."""
    assert httpx.post(f"{server.base_url}/v1/{path}", json={**body, "max_tokens": 1}, timeout=300).status_code == 200
    r = httpx.post(f"{server.base_url}/v1/{path}", json=body, timeout=300)
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


def _check_done(r: Any, max_tokens: int) -> None:
    assert r.done is True and r.done_reason in ("stop", "length")
    assert r.prompt_eval_count > 0 and 0 < r.eval_count <= max_tokens
    assert r.total_duration >= r.eval_duration > 0 and r.prompt_eval_duration > 0 and r.load_duration >= 0
    assert r.created_at.endswith("Z")


# Greedy text can differ between a prompt computed whole and one read partly from the prefix cache
# (different kernels, near-tied tokens on this 4-bit model): each comparison first warms the cache
# with the same prompt, so every compared request reads the same cached prefix.


def test_chat_matches_openai_route(client: ollama.Client, server: ServerProcess, model_name: str) -> None:
    ref = _v1(server, "chat/completions", model=model_name, messages=MSGS, temperature=0, max_tokens=8)
    r = client.chat(model=f"{model_name}:latest", messages=MSGS, options=GREEDY)
    _check_done(r, 8)
    assert r.model == f"{model_name}:latest" and r.message.role == "assistant"
    assert r.message.content == ref["choices"][0]["message"]["content"]
    assert r.prompt_eval_count == ref["usage"]["prompt_tokens"] and r.eval_count == ref["usage"]["completion_tokens"]
    assert r.done_reason == ref["choices"][0]["finish_reason"]
    parts = list(client.chat(model=model_name, messages=MSGS, options=GREEDY, stream=True))
    assert [p.done for p in parts] == [False] * (len(parts) - 1) + [True]
    assert len(parts) > 2  # text came in pieces, not in one line at the end
    assert "".join(p.message.content for p in parts) == r.message.content
    _check_done(parts[-1], 8)
    assert parts[-1].eval_count == r.eval_count


def test_stream_is_ndjson(server: ServerProcess, model_name: str) -> None:
    """Ollama's default is to stream (no `stream` field), and its curl examples send no content type."""
    body = json.dumps({"model": model_name, "messages": MSGS, "options": {"num_predict": 4}})
    with httpx.stream("POST", f"{server.base_url}/api/chat", timeout=300, content=body,
                      headers={"content-type": "application/x-www-form-urlencoded"}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("application/x-ndjson")
        lines = [json.loads(line) for line in r.iter_lines() if line]
    assert lines[-1]["done"] is True and all(not x["done"] for x in lines[:-1])


def test_generate_matches_openai_route(client: ollama.Client, server: ServerProcess, model_name: str) -> None:
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name three colors."}]
    ref = _v1(server, "chat/completions", model=model_name, messages=msgs, temperature=0, max_tokens=8)
    r = client.generate(model=model_name, prompt="Name three colors.", system="Be brief.", options=GREEDY)
    _check_done(r, 8)
    assert r.response == ref["choices"][0]["message"]["content"]
    parts = list(client.generate(model=model_name, prompt="Name three colors.", system="Be brief.", options=GREEDY,
                                 stream=True))
    assert "".join(p.response for p in parts) == r.response and parts[-1].done


def test_generate_raw_and_template(client: ollama.Client, server: ServerProcess, model_name: str) -> None:
    prompt = "<|im_start|>user\nName three colors.<|im_end|>\n<|im_start|>assistant\n"
    ref = _v1(server, "completions", model=model_name, prompt=prompt, temperature=0, max_tokens=8)
    raw = client.generate(model=model_name, prompt=prompt, raw=True, options=GREEDY)
    _check_done(raw, 8)
    assert raw.response == ref["choices"][0]["text"]
    tmpl = "{{ if .System }}unused{{ end }}<|im_start|>user\n{{ .Prompt }}<|im_end|>\n<|im_start|>assistant\n{{ .Response }}"
    templated = client.generate(model=model_name, prompt="Name three colors.", template=tmpl, options=GREEDY)
    assert templated.response == raw.response


def test_options_reach_sampling(client: ollama.Client, model_name: str) -> None:
    client.chat(model=model_name, messages=MSGS, options={"num_predict": 1})  # the warm-up (see above)
    r = client.chat(model=model_name, messages=MSGS, options={"num_predict": 3, "temperature": 0.7, "top_k": 20,
                                                              "top_p": 0.9, "seed": 7, "repeat_penalty": 1.1,
                                                              "num_ctx": 4096, "num_thread": 2})
    assert r.eval_count <= 3 and r.done_reason == "length"
    again = client.chat(model=model_name, messages=MSGS, options={"num_predict": 3, "temperature": 0.7, "top_k": 20,
                                                                  "top_p": 0.9, "seed": 7, "repeat_penalty": 1.1})
    assert again.message.content == r.message.content  # the seed holds
    stopped = client.chat(model=model_name, messages=MSGS, options={"temperature": 0, "num_predict": 20, "stop": ["\n", ","]})
    assert "\n" not in stopped.message.content and "," not in stopped.message.content


def test_format_schema(client: ollama.Client, model_name: str) -> None:
    r = client.chat(model=model_name, messages=[{"role": "user", "content": "Where is the Eiffel tower?"}],
                    format=CITY, options={"temperature": 0, "num_predict": 40})
    assert json.loads(r.message.content)["city"] in ("Paris", "Oslo", "Lima")
    g = client.generate(model=model_name, prompt="Give a JSON object.", format="json",
                        options={"temperature": 0, "num_predict": 16})
    assert g.response.lstrip().startswith("{")  # a JSON object, maybe cut by num_predict


def test_tools_and_tool_history(client: ollama.Client, model_name: str) -> None:
    """Tools and a tool round trip in Ollama's shape (arguments as an object, result by tool_name)."""
    history = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "get_weather",
                                                                          "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "tool_name": "get_weather", "content": "Sunny, 21 C"},
    ]
    r = client.chat(model=model_name, messages=history, tools=[WEATHER], options={"temperature": 0, "num_predict": 8})
    _check_done(r, 8)
    for call in r.message.tool_calls or []:  # SmolLM2 rarely calls; when it does, the shape is Ollama's
        assert call.function.name == "get_weather" and isinstance(call.function.arguments, dict)


def test_tags_show_ps_version(client: ollama.Client, server: ServerProcess, model_name: str) -> None:
    tags = client.list().models
    assert [m.model for m in tags] == [f"{model_name}:latest"]
    d = tags[0].details
    assert d.format == "gguf" and d.family == "llama" and d.quantization_level == "Q4_1"
    assert d.parameter_size.endswith("M") and 100 < float(d.parameter_size[:-1]) < 200  # SmolLM2-135M
    assert tags[0].size > 10_000_000 and len(tags[0].digest) == 64
    show = client.show(f"{model_name}:latest")
    assert "completion" in show.capabilities and "tools" in show.capabilities
    assert "thinking" not in show.capabilities
    assert show.modelinfo["llama.context_length"] == 1024 and show.template
    ps = client.ps().models
    assert ps[0].model == f"{model_name}:latest" and ps[0].context_length == 1024 and ps[0].size_vram == 0
    v = httpx.get(f"{server.base_url}/api/version").json()
    assert v["version"].count(".") == 2


def test_load_request_and_keep_alive(client: ollama.Client, model_name: str) -> None:
    """An empty prompt (Ollama's way to load a model) answers at once; keep_alive is accepted. (Its 0,
    which unloads the model, is checked in test_e2e_multi_model.py, not on this shared server.)"""
    r = client.generate(model=model_name, prompt="", keep_alive="5m")
    assert r.done and r.done_reason == "load" and r.response == ""
    r = client.chat(model=model_name, messages=[], keep_alive="10m")
    assert r.done and r.done_reason == "load"
    r = client.chat(model=model_name, messages=MSGS, keep_alive=-1, options={"num_predict": 2})
    assert r.done


@pytest.mark.parametrize("call, status, words", [
    (lambda c, m: c.chat(model="nope", messages=MSGS), 404, 'model "nope" not found'),
    (lambda c, m: c.generate(model="nope:7b", prompt="hi"), 404, "not found"),
    (lambda c, m: c.show("nope"), 404, "not found"),
    (lambda c, m: c.chat(model=m, messages=[{"role": "user", "content": "hi", "images": [b"\x89PNG"]}]), 400, "vision"),
    (lambda c, m: c.chat(model=m, messages=MSGS, think=True), 400, "does not support thinking"),
    (lambda c, m: c.chat(model=m, messages=MSGS, options={"temperature": "hot"}), 400, "options.temperature"),
    (lambda c, m: c.chat(model=m, messages=MSGS, keep_alive="soon"), 400, "invalid duration"),
    (lambda c, m: c.chat(model=m, messages=MSGS, format={"type": "object", "properties": {"a": {"type": "nope"}}}),
     400, "format"),
    (lambda c, m: c.generate(model=m, prompt="hi", raw=True, system="s"), 400, "raw mode"),
    (lambda c, m: c.generate(model=m, prompt="hello " * 1200), 400, "context length"),
    (lambda c, m: c.embed(model=m, input="hello"), 400, "does not support embeddings"),
    (lambda c, m: c.embeddings(model=m, prompt="hello"), 400, "does not support embeddings"),
])
def test_errors_in_ollama_shape(client: ollama.Client, model_name: str, call: Any, status: int, words: str) -> None:
    with pytest.raises(ollama.ResponseError) as exc:
        call(client, model_name)
    assert exc.value.status_code == status and words in exc.value.error, exc.value.error


def test_bad_bodies_are_4xx(server: ServerProcess, model_name: str) -> None:
    bad_everywhere = [b"{oops", b"[]", b'{"model": 5}', b'{"model": "nope"}', b""]
    bad_here = {"/api/chat": [{"messages": [{"content": "no role"}]}, {"options": []}, {"tools": [{"function": {}}]}],
                "/api/generate": [{"prompt": 3}, {"options": {"num_predict": "many"}}, {"context": "x"}],
                "/api/show": [{"name": ["x"]}], "/api/embed": [{"input": [1, 2]}, {"options": []}]}
    for path, bodies in bad_here.items():
        for body in bad_everywhere + [json.dumps({"model": model_name, **b}).encode() for b in bodies]:
            r = httpx.post(f"{server.base_url}{path}", content=body, headers={"content-type": "application/json"})
            assert 400 <= r.status_code < 500 and list(r.json()) == ["error"], (path, body, r.text)
    r = httpx.get(f"{server.base_url}/api/chat")
    assert r.status_code == 405 and list(r.json()) == ["error"]
