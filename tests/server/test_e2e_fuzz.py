"""Schemathesis against the server's own OpenAPI schema: no 5xx, no hang (fixed example count)."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from server_proc import SMOLLM_ARGS, ServerProcess, running


@pytest.fixture(scope="module")
def small() -> Iterator[ServerProcess]:
    # A short context bounds how long any generated request can run.
    yield from running(*SMOLLM_ARGS, "--max-model-len", "128", "--max-n", "2",
                       "--request-timeout", "3")


def test_schemathesis_no_server_errors(small: ServerProcess, tmp_path: Path) -> None:
    if shutil.which("schemathesis") is None and shutil.which("st") is None:
        pytest.skip("schemathesis is not installed (pip install -e '.[test]')")
    exe = shutil.which("schemathesis") or shutil.which("st")
    paths = httpx.get(f"{small.base_url}/openapi.json").json()["paths"]
    assert {"/v1/responses", "/v1/responses/{response_id}", "/v1/messages", "/v1/messages/count_tokens"} <= set(paths)
    r = subprocess.run(
        [str(exe), "run", f"{small.base_url}/openapi.json", "--checks", "not_a_server_error",
         "--max-examples", "25", "--seed", "1", "--workers", "1", "--request-timeout", "60",
         "--phases", "examples,coverage,fuzzing", "--no-shrink", "--suppress-health-check", "all"],
        check=False, capture_output=True, text=True, timeout=900, cwd=tmp_path,  # it writes a .schemathesis/ folder
    )
    print(r.stdout[-6000:])
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-2000:]
    assert httpx.get(f"{small.base_url}/health").status_code == 200
    text = httpx.get(f"{small.base_url}/metrics").text
    assert 'status="5' not in text
