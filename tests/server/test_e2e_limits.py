"""A tightly limited real server: auth, admission (429), body size (413), timeouts, CORS."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import anthropic
import httpx
import ollama
import openai
import pytest
from planted_fault_entry import SLOW_MAX_TOKENS, SLOW_STEP_S
from server_proc import SMOLLM_ARGS, ServerProcess, running, wait_engine_idle

KEYS = ["key-one", "key-two"]
AUTH = {"Authorization": f"Bearer {KEYS[1]}"}
MSG = [{"role": "user", "content": "Write a poem."}]
TIMEOUT_S = 15  # ample for the 8-token requests here on a loaded box; the timeout test's request is slowed far past it


@pytest.fixture(scope="module")
def tight() -> Iterator[ServerProcess]:
    # With a planted slow step (planted_fault_entry.py), so the timeout test holds on any machine.
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DASHCHAT_TEST_ENTRY", str(Path(__file__).with_name("planted_fault_entry.py")))
        servers = running(*SMOLLM_ARGS, "--max-model-len", "512",
                          "--served-model-name", "tiny", "--api-key", KEYS[0], "--max-num-seqs", "1",
                          "--max-queue", "1", "--max-request-bytes", "20000", "--request-timeout", str(TIMEOUT_S),
                          "--max-n", "2", "--allowed-origins", "http://app.test",
                          env={"DASHCHAT_API_KEY": KEYS[1]})
        server = next(servers)
    yield server
    next(servers, None)  # stops it


def test_auth(tight: ServerProcess) -> None:
    url = f"{tight.base_url}/v1/models"
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": KEYS[0]}):
        r = httpx.get(url, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    for key in KEYS:  # the flag's key and the environment's
        assert httpx.get(url, headers={"Authorization": f"Bearer {key}"}).status_code == 200
    assert httpx.get(f"{tight.base_url}/health").status_code == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{tight.base_url}/v1", api_key="wrong", max_retries=0).models.list()


def test_cors(tight: ServerProcess) -> None:
    r = httpx.options(f"{tight.base_url}/v1/chat/completions",
                      headers={"Origin": "http://app.test", "Access-Control-Request-Method": "POST"})
    assert r.headers.get("access-control-allow-origin") == "http://app.test"
    r = httpx.options(f"{tight.base_url}/v1/chat/completions",
                      headers={"Origin": "http://evil.test", "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in r.headers


def test_body_and_n_limits(tight: ServerProcess) -> None:
    big = {"model": "tiny", "messages": [{"role": "user", "content": "x" * 30000}]}
    r = httpx.post(f"{tight.base_url}/v1/chat/completions", json=big, headers=AUTH)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    r = httpx.post(f"{tight.base_url}/v1/chat/completions", json={"model": "tiny", "messages": MSG, "n": 3},
                   headers=AUTH)
    assert r.status_code == 400 and r.json()["error"]["param"] == "n"


def test_admission_queue_429(tight: ServerProcess) -> None:
    """One running + one waiting fit; the others get 429 with Retry-After, then all recovers."""
    body = {"model": "tiny", "messages": MSG, "max_tokens": 8, "ignore_eos": True}

    async def main() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=tight.base_url, headers=AUTH, timeout=60) as c:
            return await asyncio.gather(*(c.post("/v1/chat/completions", json=body) for _ in range(6)))

    statuses = [r.status_code for r in asyncio.run(main())]
    assert 200 in statuses and 429 in statuses, statuses
    assert set(statuses) <= {200, 429}
    rejected = [r for r in asyncio.run(main()) if r.status_code == 429]
    assert all(r.headers.get("retry-after") and r.json()["error"]["type"] == "rate_limit_error" for r in rejected)
    assert wait_engine_idle(tight.base_url, timeout=10) == (0, 0)


def test_request_timeout(tight: ServerProcess) -> None:
    # Its every step is planted to take SLOW_STEP_S more: ~100 s at least, far past the limit, however
    # fast the machine; the limit alone ends it.
    assert SLOW_MAX_TOKENS * SLOW_STEP_S > TIMEOUT_S * 4
    body = {"model": "tiny", "messages": MSG, "max_tokens": SLOW_MAX_TOKENS, "ignore_eos": True}
    r = httpx.post(f"{tight.base_url}/v1/chat/completions", json=body, headers=AUTH, timeout=120)
    assert r.status_code == 408 and r.json()["error"]["code"] == "request_timeout"
    with httpx.stream("POST", f"{tight.base_url}/v1/chat/completions", json={**body, "stream": True},
                      headers=AUTH, timeout=120) as s:
        lines = [ln for ln in s.iter_lines() if ln]
    assert '"request_timeout"' in lines[-2] and lines[-1] == "data: [DONE]"
    assert wait_engine_idle(tight.base_url, timeout=30) == (0, 0)


# -- the same limits on /v1/responses and /v1/messages, each in its API's error shape -------------


def test_messages_auth_x_api_key(tight: ServerProcess) -> None:
    """Anthropic clients send `x-api-key`; a wrong one gets Anthropic's 401 shape."""
    msgs = [{"role": "user", "content": "Hi"}]
    ok = anthropic.Anthropic(base_url=tight.base_url, api_key=KEYS[0], max_retries=0)
    assert ok.messages.count_tokens(model="tiny", messages=msgs).input_tokens > 0
    with pytest.raises(anthropic.AuthenticationError) as exc:
        anthropic.Anthropic(base_url=tight.base_url, api_key="wrong", max_retries=0).messages.count_tokens(
            model="tiny", messages=msgs)
    assert exc.value.body["error"]["type"] == "authentication_error"  # type: ignore[index]
    r = httpx.post(f"{tight.base_url}/v1/messages/count_tokens", json={"model": "tiny", "messages": msgs})
    assert r.status_code == 401 and r.json()["type"] == "error"
    # x-api-key works on the OpenAI routes too, and Bearer on Anthropic's.
    assert httpx.get(f"{tight.base_url}/v1/models", headers={"x-api-key": KEYS[1]}).status_code == 200
    r = httpx.post(f"{tight.base_url}/v1/messages/count_tokens", json={"model": "tiny", "messages": msgs},
                   headers=AUTH)
    assert r.status_code == 200
    # /tokenize and /detokenize are outside /v1 (as in vLLM) but need the key all the same.
    assert httpx.post(f"{tight.base_url}/tokenize", json={"prompt": "hi"}).status_code == 401
    assert httpx.post(f"{tight.base_url}/tokenize", json={"prompt": "hi"}, headers={"x-api-key": KEYS[0]}).status_code == 200


def test_ollama_routes_need_the_key(tight: ServerProcess) -> None:
    """Ollama's client sends the key as `Authorization: Bearer` when given headers; every /api/* route
    needs it, and its errors (401, 413) keep Ollama's `{"error": ...}` shape."""
    for path in ("/api/tags", "/api/ps", "/api/version"):
        r = httpx.get(f"{tight.base_url}{path}")
        assert r.status_code == 401 and list(r.json()) == ["error"], path
    with pytest.raises(ollama.ResponseError) as exc:
        ollama.Client(host=tight.base_url).chat(model="tiny", messages=MSG)
    assert exc.value.status_code == 401
    client = ollama.Client(host=tight.base_url, headers={"Authorization": f"Bearer {KEYS[0]}"}, timeout=120)
    assert [m.model for m in client.list().models] == ["tiny:latest"]
    assert wait_engine_idle(tight.base_url, timeout=60) == (0, 0)
    assert client.chat(model="tiny:latest", messages=MSG, options={"num_predict": 2}).done
    r = httpx.post(f"{tight.base_url}/api/generate", headers=AUTH, json={"model": "tiny", "prompt": "x" * 30000})
    assert r.status_code == 413 and list(r.json()) == ["error"]


def test_new_routes_body_limit(tight: ServerProcess) -> None:
    big = "x" * 30000
    r = httpx.post(f"{tight.base_url}/v1/messages", headers=AUTH,
                   json={"model": "tiny", "max_tokens": 4, "messages": [{"role": "user", "content": big}]})
    assert r.status_code == 413 and r.json()["error"]["type"] == "request_too_large" and r.json()["type"] == "error"
    r = httpx.post(f"{tight.base_url}/v1/responses", headers=AUTH, json={"model": "tiny", "input": big})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"


def test_new_routes_timeout(tight: ServerProcess) -> None:
    """The chat run's deadline applies: 408 before the first byte, an error event mid-stream.
    One request at a time here (--max-num-seqs 1): each waits for the engine to be idle first. The
    requests' steps are planted to be slow (SLOW_MAX_TOKENS): only the limit ends them, however fast
    the machine."""
    msgs = [{"role": "user", "content": "Write a poem."}]
    body = {"model": "tiny", "max_tokens": SLOW_MAX_TOKENS, "ignore_eos": True, "messages": msgs}

    def idle() -> None:
        assert wait_engine_idle(tight.base_url, timeout=60) == (0, 0)

    idle()
    r = httpx.post(f"{tight.base_url}/v1/messages", json=body, headers=AUTH, timeout=120)
    assert r.status_code == 408 and r.json()["error"]["type"] == "timeout_error"
    idle()
    client = anthropic.Anthropic(base_url=tight.base_url, api_key=KEYS[0], max_retries=0)
    with pytest.raises(anthropic.APIStatusError) as exc:
        with client.messages.stream(model="tiny", max_tokens=SLOW_MAX_TOKENS, messages=msgs, extra_body={"ignore_eos": True}) as s:
            for _ in s:
                pass
    assert "timeout_error" in str(exc.value)

    idle()
    rbody = {"model": "tiny", "max_output_tokens": SLOW_MAX_TOKENS, "input": "Write a poem.", "ignore_eos": True}
    r = httpx.post(f"{tight.base_url}/v1/responses", json=rbody, headers=AUTH, timeout=120)
    assert r.status_code == 408 and r.json()["error"]["code"] == "request_timeout"
    idle()
    with httpx.stream("POST", f"{tight.base_url}/v1/responses", json={**rbody, "stream": True},
                      headers=AUTH, timeout=120) as s:
        assert s.status_code == 200
        data = [ln for ln in s.iter_lines() if ln.startswith("data: ")]
    assert len(data) >= 2, data
    assert '"type":"error"' in data[-2] and '"request_timeout"' in data[-2]
    assert '"response.failed"' in data[-1]
    idle()
