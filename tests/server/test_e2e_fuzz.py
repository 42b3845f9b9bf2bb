"""Schemathesis against the server's own OpenAPI schema: no 5xx, no hang (fixed example count)."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from server_proc import SMOLLM, SMOLLM_ARGS, ServerProcess, running


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
    assert {"/v1/responses", "/v1/responses/{response_id}", "/v1/messages", "/v1/messages/count_tokens",
            "/api/chat", "/api/generate", "/api/show", "/api/embed", "/v1/embeddings", "/v1/rerank", "/rerank",
            "/score"} <= set(paths)
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


# What the real tokenizer and engine cannot hold (the in-process fuzz uses a byte tokenizer, which
# hides them): lone surrogates in any string, integers past int64. Each is a 400 naming the field
# (int64's own edges reach the engine and work: tests/engine/test_engine.py).
_lone = st.characters(categories=["Cs"])
_odd_text = st.builds(lambda a, s, b: a + s + b, st.text(max_size=3), _lone, st.text(max_size=3))
_huge = st.integers(min_value=2**63, max_value=2**80) | st.integers(min_value=-(2**80), max_value=-(2**63) - 1)
_BAD_FIELDS = {
    "messages[0].content": lambda v: {"messages": [{"role": "user", "content": v}]},
    "messages[0].name": lambda v: {"messages": [{"role": "user", "content": "hi", "name": v}]},
    "stop": lambda v: {"stop": v},
    "user": lambda v: {"user": v},
    "model": lambda v: {"model": v},
}
_BAD_INTS = ["seed", "top_k", "max_tokens", "n", "min_tokens", "top_logprobs"]


def _post(base_url: str, path: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{base_url}{path}", content=json.dumps(body), headers={"content-type": "application/json"},
                      timeout=60)


@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(field=st.sampled_from(sorted(_BAD_FIELDS)), text=_odd_text)
def test_lone_surrogates_are_400_on_the_real_engine(small: ServerProcess, field: str, text: str) -> None:
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **_BAD_FIELDS[field](text)}
    r = _post(small.base_url, "/v1/chat/completions", body)
    assert r.status_code == 400 and r.json()["error"]["param"] == field, r.text
    r = _post(small.base_url, "/v1/completions", {"prompt": text, "max_tokens": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt", r.text
    r = _post(small.base_url, "/api/generate", {"model": SMOLLM, "prompt": text, "options": {"num_predict": 2}})
    assert r.status_code == 400 and "'prompt'" in r.json()["error"], r.text


@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(field=st.sampled_from(_BAD_INTS), value=_huge)
def test_integers_past_int64_are_400_on_the_real_engine(small: ServerProcess, field: str, value: int) -> None:
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, field: value}
    r = _post(small.base_url, "/v1/chat/completions", body)
    assert r.status_code == 400 and r.json()["error"]["param"] == field, r.text
    r = _post(small.base_url, "/v1/completions", {"prompt": [1, 2, value], "max_tokens": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt[2]", r.text
    r = _post(small.base_url, "/api/chat", {"model": SMOLLM, "messages": [{"role": "user", "content": "hi"}],
                                           "options": {"num_predict": 2, "seed": value}})
    assert r.status_code == 400 and "'options.seed'" in r.json()["error"], r.text

