#!/usr/bin/env python
"""Smoke-test a running dashchat (or any OpenAI-compatible) server, as the quick-start describes.

    python tests/openai_server/test_openai_server.py --host 127.0.0.1 --port 8000 \
        --model Qwen2.5-7B-Instruct [--strict-tool-call] [--api-key KEY]

Checks a plain chat, a stream and the weather tool call; prints what it saw; exits 1 on
failure. Without --strict-tool-call a reply without tool_calls is only a warning (small
models may answer in prose).

(Not a pytest module: tests/server/test_e2e_http.py runs it against the small model, and
tests/server/test_e2e_default_model.py against the default one, each as a subprocess.)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import httpx

__test__ = False  # keep pytest from collecting this script's functions

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "根据城市查询天气",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}


class CheckFailed(Exception):
    pass


def _check(cond: bool, what: str) -> None:
    if not cond:
        raise CheckFailed(what)


def chat(client: httpx.Client, model: str, max_tokens: int) -> None:
    r = client.post("/v1/chat/completions", json={
        "model": model, "max_tokens": max_tokens,
        "messages": [{"role": "user", "content": "你好，请简单介绍你自己。"}],
    })
    _check(r.status_code == 200, f"chat: HTTP {r.status_code}: {r.text[:300]}")
    body = r.json()
    _check(body.get("object") == "chat.completion", f"chat: object is {body.get('object')!r}")
    _check(str(body.get("id", "")).startswith("chatcmpl-"), "chat: id does not start with chatcmpl-")
    choice = body["choices"][0]
    msg = choice["message"]
    _check(msg.get("role") == "assistant", "chat: role is not assistant")
    _check(isinstance(msg.get("content"), str) and msg["content"].strip() != "", "chat: empty content")
    _check(choice.get("finish_reason") in ("stop", "length"), f"chat: finish_reason {choice.get('finish_reason')!r}")
    usage = body.get("usage") or {}
    _check(usage.get("total_tokens") == usage.get("prompt_tokens", 0) + usage.get("completion_tokens", 0),
           "chat: usage does not add up")
    print(f"[chat] ok: {msg['content'][:200]!r} (finish_reason={choice['finish_reason']}, usage={usage})")


def stream(client: httpx.Client, model: str, max_tokens: int) -> None:
    pieces: list[str] = []
    ids: set[str] = set()
    finish = None
    done = False
    first_role = None
    with client.stream("POST", "/v1/chat/completions", json={
        "model": model, "stream": True, "max_tokens": max_tokens,
        "messages": [{"role": "user", "content": "写三个简短笑话。"}],
    }) as r:
        _check(r.status_code == 200, f"stream: HTTP {r.status_code}: {r.read()[:300]!r}")
        _check(r.headers.get("content-type", "").startswith("text/event-stream"), "stream: not text/event-stream")
        for line in r.iter_lines():
            if not line:
                continue
            _check(line.startswith("data: "), f"stream: bad line {line[:80]!r}")
            data = line[len("data: "):]
            if data == "[DONE]":
                done = True
                break
            chunk = json.loads(data)
            _check("error" not in chunk, f"stream: error event {chunk.get('error')}")
            _check(chunk.get("object") == "chat.completion.chunk", "stream: wrong object")
            ids.add(chunk["id"])
            for ch in chunk["choices"]:
                delta = ch.get("delta", {})
                if first_role is None:
                    first_role = delta.get("role")
                pieces.append(delta.get("content") or "")
                finish = ch.get("finish_reason") or finish
    _check(done, "stream: no [DONE]")
    _check(len(ids) == 1, "stream: chunks carry different ids")
    _check(first_role == "assistant", "stream: first delta has no role")
    _check(finish in ("stop", "length"), f"stream: finish_reason {finish!r}")
    text = "".join(pieces)
    _check(text.strip() != "", "stream: no content")
    print(f"[stream] ok: {len(pieces)} chunks: {text[:200]!r} (finish_reason={finish})")


def tool_call(client: httpx.Client, model: str, max_tokens: int, strict: bool) -> None:
    r = client.post("/v1/chat/completions", json={
        "model": model, "max_tokens": max_tokens, "temperature": 0,
        "messages": [{"role": "user", "content": "请查询北京天气。"}],
        "tools": [WEATHER_TOOL], "tool_choice": "auto",
    })
    _check(r.status_code == 200, f"tool call: HTTP {r.status_code}: {r.text[:300]}")
    choice = r.json()["choices"][0]
    calls = choice["message"].get("tool_calls") or []
    if not calls:
        msg = f"tool call: no tool_calls; the model said {choice['message'].get('content')!r}"
        if strict:
            raise CheckFailed(msg)
        print(f"[tool] warning: {msg} (pass --strict-tool-call to fail on this)")
        return
    _check(choice["finish_reason"] == "tool_calls", f"tool call: finish_reason {choice['finish_reason']!r}")
    call = calls[0]
    _check(call.get("type") == "function" and call["function"]["name"] == "get_weather",
           f"tool call: unexpected call {call}")
    args: Any = json.loads(call["function"]["arguments"])
    _check(isinstance(args, dict) and "city" in args, f"tool call: arguments {args!r} lack 'city'")
    print(f"[tool] ok: get_weather({args}) id={call.get('id')}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--model", required=True, help="the served model name")
    p.add_argument("--strict-tool-call", action="store_true", help="fail when no tool_calls come back")
    p.add_argument("--api-key", default=None)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--timeout", type=float, default=300.0)
    args = p.parse_args(argv)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    base = f"http://{args.host}:{args.port}"
    failures = 0
    with httpx.Client(base_url=base, timeout=args.timeout, headers=headers) as client:
        for name, fn in [("chat", lambda: chat(client, args.model, args.max_tokens)),
                         ("stream", lambda: stream(client, args.model, args.max_tokens)),
                         ("tool", lambda: tool_call(client, args.model, args.max_tokens, args.strict_tool_call))]:
            t0 = time.perf_counter()
            try:
                fn()
            except (CheckFailed, httpx.HTTPError, ValueError, KeyError) as exc:
                failures += 1
                print(f"[{name}] FAILED: {exc}")
            print(f"[{name}] {time.perf_counter() - t0:.1f}s")
    print("all checks passed" if not failures else f"{failures} check(s) failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
