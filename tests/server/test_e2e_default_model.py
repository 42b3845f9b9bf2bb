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
    r = subprocess.run(
        [sys.executable, "tests/openai_server/test_openai_server.py", "--host", "127.0.0.1",
         "--port", str(default_server.port), "--model", "qwen2.5-coder-0.5b-instruct", "--strict-tool-call",
         "--max-tokens", "32"],
        cwd=REPO, check=False, capture_output=True, text=True, timeout=600,
    )
    print(r.stdout)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "[tool] ok: get_weather(" in r.stdout
