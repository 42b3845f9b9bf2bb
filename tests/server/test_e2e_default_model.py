"""The quick-start as written, on the embedded default model (Qwen2.5-Coder-0.5B-Instruct):
no --model-path, and the seed's test script with --strict-tool-call."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import httpx
import pytest
from server_proc import REPO, ServerProcess, running


@pytest.fixture(scope="module")
def default_server() -> Iterator[ServerProcess]:
    yield from running("--device", "cpu", "--max-model-len", "2048", "--kv-cache-memory", "0.5")


def test_default_model_name(default_server: ServerProcess) -> None:
    models = httpx.get(f"{default_server.base_url}/v1/models").json()["data"]
    assert [m["id"] for m in models] == ["qwen2.5-coder-0.5b-instruct"]


def test_seed_script_strict_tool_call(default_server: ServerProcess) -> None:
    r = _seed_script(default_server.port)
    print(r.stdout)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "[tool] ok: get_weather(" in r.stdout


def _seed_script(port: int) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "tests/openai_server/test_openai_server.py", "--host", "127.0.0.1",
         "--port", str(port), "--model", "qwen2.5-coder-0.5b-instruct", "--strict-tool-call",
         "--max-tokens", "32"],
        cwd=REPO, check=False, capture_output=True, text=True, timeout=600,
    )


def _greedy_answers(base_url: str) -> list[str]:
    """Plain and json_schema answers, through the openai SDK, streamed and not."""
    from openai import OpenAI

    client = OpenAI(base_url=f"{base_url}/v1", api_key="none")
    schema = {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
              "required": ["city", "days"], "additionalProperties": False}
    requests = [
        {"messages": [{"role": "user", "content": "Name three colours."}]},
        {"messages": [{"role": "user", "content": "Plan a trip to Paris: give the city and a number of days."}],
         "response_format": {"type": "json_schema", "json_schema": {"name": "trip", "schema": schema}}},
    ]
    answers = []
    for req in requests:
        kwargs = {"model": "qwen2.5-coder-0.5b-instruct", "max_tokens": 24, "temperature": 0, **req}
        answers.append(client.chat.completions.create(**kwargs).choices[0].message.content)
        stream = client.chat.completions.create(stream=True, **kwargs)
        answers.append("".join(c.choices[0].delta.content or "" for c in stream if c.choices))
    return answers


def test_two_ranks_serve_the_quick_start_as_one_device(default_server: ServerProcess) -> None:
    """`--device-list 0 1`: the default model over two CPU ranks passes the seed's script and
    gives the one-device greedy answers, plain and grammar-constrained."""
    expected = _greedy_answers(default_server.base_url)
    srv = ServerProcess("--device", "cpu", "--device-list", "0", "1", "--max-model-len", "2048",
                        "--kv-cache-memory", "0.25").wait_ready()
    try:
        r = _seed_script(srv.port)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "[tool] ok: get_weather(" in r.stdout
        assert _greedy_answers(srv.base_url) == expected
    finally:
        assert srv.stop() == 0
