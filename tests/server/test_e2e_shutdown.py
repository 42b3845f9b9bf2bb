"""SIGTERM with requests in flight: drain within the grace period, abort the rest cleanly, exit 0."""

from __future__ import annotations

import json
import signal
import threading
import time

import httpx
import pytest
from server_proc import SMOLLM_ARGS, ServerProcess


def _start(grace: str) -> ServerProcess:
    return ServerProcess(*SMOLLM_ARGS, "--max-model-len", "1024",
                         "--served-model-name", "m", "--shutdown-grace", grace).wait_ready()


def _stream(srv: ServerProcess, max_tokens: int, out: list[str]) -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "Tell a story."}], "max_tokens": max_tokens,
            "stream": True, "ignore_eos": True}
    with httpx.stream("POST", f"{srv.base_url}/v1/chat/completions", json=body, timeout=60) as r:
        for line in r.iter_lines():
            if line:
                out.append(line)


def _wait_streaming(out: list[str]) -> None:
    deadline = time.monotonic() + 30
    while len(out) < 3 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(out) >= 3


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_drain_finishes_running_requests(sig: int) -> None:
    srv = _start(grace="30")
    try:
        out: list[str] = []
        t = threading.Thread(target=_stream, args=(srv, 60, out))
        t.start()
        _wait_streaming(out)
        srv.signal(sig)
        time.sleep(0.5)
        with pytest.raises(httpx.ConnectError):  # no longer accepting
            httpx.get(f"{srv.base_url}/health", timeout=2)
        t.join(60)
        assert out[-1] == "data: [DONE]"
        assert json.loads(out[-2][6:])["choices"][0]["finish_reason"] == "length"
        assert srv.wait(30) == 0
    finally:
        srv.stop()


def test_grace_over_aborts_with_clean_error() -> None:
    srv = _start(grace="1")
    try:
        out: list[str] = []
        t = threading.Thread(target=_stream, args=(srv, 900, out))
        t.start()
        _wait_streaming(out)
        t0 = time.monotonic()
        srv.signal(signal.SIGTERM)
        t.join(60)
        assert json.loads(out[-2][6:])["error"]["code"] == "server_shutting_down" and out[-1] == "data: [DONE]"
        assert srv.wait(30) == 0
        assert time.monotonic() - t0 < 20
        assert "Traceback" not in srv.log(100_000)
    finally:
        srv.stop()
