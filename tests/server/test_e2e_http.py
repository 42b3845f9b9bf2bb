"""The real server over raw HTTP: SSE framing, error bodies, disconnects freeing the engine,
the seed's test script, and a small bounded load test."""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
import sys
import time
from typing import Any

import httpx
from server_proc import REPO, ServerProcess, metric, wait_engine_idle

MSG = [{"role": "user", "content": "Tell me a long story about a dragon."}]


def test_sse_framing(server: ServerProcess, model_name: str) -> None:
    with httpx.stream("POST", f"{server.base_url}/v1/chat/completions", timeout=60, json={
        "model": model_name, "messages": MSG, "max_tokens": 8, "stream": True,
    }) as r:
        assert r.status_code == 200
        raw = b"".join(r.iter_bytes())
    events = raw.split(b"\n\n")
    assert events[-1] == b"" and events[-2] == b"data: [DONE]"
    for e in events[:-2]:
        assert e.startswith(b"data: {") and b"\n" not in e
        chunk = json.loads(e[6:])
        assert set(chunk) == {"id", "object", "created", "model", "system_fingerprint", "choices"}
        (choice,) = chunk["choices"]
        assert set(choice) == {"index", "delta", "logprobs", "finish_reason"}


def test_health_version_and_errors(server: ServerProcess) -> None:
    health = httpx.get(f"{server.base_url}/health").json()  # and each model's state
    assert health["status"] == "ok" and set(health["models"].values()) == {"loaded"}
    assert httpx.get(f"{server.base_url}/version").json()["engine"] == "native"
    r = httpx.post(f"{server.base_url}/v1/chat/completions", content=b'{"messages": [',
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.post(f"{server.base_url}/v1/chat/completions", json={"messages": [{"role": "user", "content": 5}]})
    assert r.status_code == 400 and r.json()["error"]["param"].startswith("messages[0].content")


def test_stream_disconnect_frees_kv(server: ServerProcess, model_name: str) -> None:
    body = {"model": model_name, "messages": MSG, "max_tokens": 800, "stream": True,
            "ignore_eos": True}
    with httpx.stream("POST", f"{server.base_url}/v1/chat/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        for _ in range(4):
            next(lines)
        assert metric(server.base_url, "dashchat_num_requests_running") >= 1
    # Closed after a few tokens: the engine must drop the request and its KV right away.
    assert wait_engine_idle(server.base_url, timeout=5) == (0, 0)
    assert metric(server.base_url, "dashchat_generation_tokens_total") > 0


def test_non_stream_disconnect_aborts(server: ServerProcess, model_name: str) -> None:
    body = {"model": model_name, "messages": MSG, "max_tokens": 800, "ignore_eos": True}
    try:
        httpx.post(f"{server.base_url}/v1/chat/completions", json=body, timeout=1.0)
    except httpx.TimeoutException:
        pass
    else:
        raise AssertionError("800 tokens in under a second: the test needs a longer generation")
    assert wait_engine_idle(server.base_url, timeout=5) == (0, 0)


def test_seed_script(server: ServerProcess, model_name: str) -> None:
    r = subprocess.run(
        [sys.executable, "tests/openai_server/test_openai_server.py", "--host", "127.0.0.1",
         "--port", str(server.port), "--model", model_name, "--max-tokens", "48"],
        cwd=REPO, check=False, capture_output=True, text=True, timeout=300,
    )
    print(r.stdout)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "[chat] ok" in r.stdout and "[stream] ok" in r.stdout


def test_seed_script_fails_on_wrong_model(server: ServerProcess) -> None:
    r = subprocess.run(
        [sys.executable, "tests/openai_server/test_openai_server.py", "--port", str(server.port),
         "--model", "not-served"], cwd=REPO, check=False, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "404" in r.stdout


async def _client_job(c: httpx.AsyncClient, model: str, i: int, rng: random.Random) -> str:
    stream = rng.random() < 0.6
    disconnect = stream and rng.random() < 0.25
    body: dict[str, Any] = {"model": model, "max_tokens": rng.choice([4, 8, 16]), "stream": stream,
                            "messages": [{"role": "user", "content": f"Request {i}: " + "word " * rng.randint(1, 100)}]}
    if not stream:
        r = await c.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        ch = r.json()["choices"][0]
        assert ch["finish_reason"] in ("stop", "length") and isinstance(ch["message"]["content"], str)
        return "ok"
    async with c.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200, await r.aread()
        n = 0
        finish = None
        done = False
        async for line in r.aiter_lines():
            if not line:
                continue
            if line == "data: [DONE]":
                done = True
                break
            chunk = json.loads(line[6:])
            assert "error" not in chunk, chunk
            n += 1
            finish = chunk["choices"][0]["finish_reason"] or finish
            if disconnect and n == 3:
                return "disconnected"
        assert done and finish in ("stop", "length")
    return "ok"


def test_small_load(server: ServerProcess, model_name: str) -> None:
    """16 concurrent clients, 40 requests, streaming and not, a quarter of the streams hang up.
    (bench/load.py is the full-size version.)"""
    rng = random.Random(7)
    sem = asyncio.Semaphore(16)

    async def main() -> list[str]:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=120) as c:
            async def one(i: int) -> str:
                async with sem:
                    return await _client_job(c, model_name, i, rng)
            return await asyncio.gather(*(one(i) for i in range(40)))

    t0 = time.perf_counter()
    results = asyncio.run(main())
    elapsed = time.perf_counter() - t0
    print(f"load: {len(results)} requests in {elapsed:.1f}s ({len(results) / elapsed:.1f} req/s), "
          f"{results.count('disconnected')} disconnected")
    assert results.count("ok") + results.count("disconnected") == 40
    assert wait_engine_idle(server.base_url, timeout=10) == (0, 0)
    text = httpx.get(f"{server.base_url}/metrics").text
    assert 'status="5' not in text


def test_access_log_has_request_id_and_no_prompt(server: ServerProcess, model_name: str) -> None:
    secret = "my-private-prompt-text-4711"
    r = httpx.post(f"{server.base_url}/v1/chat/completions", headers={"X-Request-Id": "trace-4711"}, timeout=60,
                   json={"model": model_name, "max_tokens": 2, "messages": [{"role": "user", "content": secret}]})
    assert r.status_code == 200 and r.headers["x-request-id"] == "trace-4711"
    deadline = time.monotonic() + 30  # the access line is written as the response ends: poll for it
    while "id=trace-4711" not in (log := server.log(1_000_000)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "POST /v1/chat/completions" in log and "id=trace-4711" in log
    assert secret not in log
