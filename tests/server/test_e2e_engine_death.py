"""The real server whose engine's step thread dies (a planted scheduling bug): the streaming
request in flight ends with an error event, the request that hit the bug gets a 503, /health
turns 503, new requests get 503 at once, and the log says why; no body carries the bug's text."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import httpx
import pytest
from planted_fault_entry import CRASH_MAX_TOKENS
from server_proc import SMOLLM_ARGS, ServerProcess


def _chat(max_tokens: int, stream: bool = False) -> dict:
    return {"model": "m", "messages": [{"role": "user", "content": "Tell a story."}], "max_tokens": max_tokens,
            "stream": stream, "ignore_eos": True}


def test_engine_death_is_503_everywhere_and_logged(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DASHCHAT_TEST_ENTRY", str(Path(__file__).with_name("planted_fault_entry.py")))
    # A long grace: the server would exit (code 1) that long after the death; the checks come first.
    srv = ServerProcess(*SMOLLM_ARGS, "--max-model-len", "1024", "--served-model-name", "m",
                        "--engine-failure-grace", "600").wait_ready()
    try:
        url = f"{srv.base_url}/v1/chat/completions"
        lines: list[str] = []

        def stream() -> None:
            with httpx.stream("POST", url, json=_chat(900, stream=True), timeout=120) as r:
                lines.extend(line for line in r.iter_lines() if line)

        t = threading.Thread(target=stream)
        t.start()
        deadline = time.monotonic() + 60
        while len(lines) < 3 and time.monotonic() < deadline:  # the stream is running
            time.sleep(0.02)
        assert len(lines) >= 3

        r = httpx.post(url, json=_chat(CRASH_MAX_TOKENS), timeout=120)
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_failed", r.text
        t.join(120)
        assert not t.is_alive()
        errors = [json.loads(line[len("data: "):]) for line in lines if line.startswith('data: {"error"')]
        assert [e["error"]["code"] for e in errors] == ["engine_failed"]  # the stream ends with it (then [DONE], or not)

        health = httpx.get(f"{srv.base_url}/health", timeout=10)
        assert health.status_code == 503 and health.json() == {"status": "engine_failed"}
        r = httpx.post(url, json=_chat(8), timeout=30)
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_failed"
        assert "planted" not in r.text and not any("planted" in line for line in lines)
        log = srv.log(200_000)
        assert "step thread died" in log and "RuntimeError: planted scheduling bug" in log
    finally:
        srv.stop()
