"""SIGTERM with requests in flight: drain within the grace period, abort the rest cleanly, exit 0."""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest
from planted_fault_entry import SLOW_MAX_TOKENS
from server_proc import SMOLLM_ARGS, ServerProcess


def _start(grace: str, monkeypatch: pytest.MonkeyPatch | None = None) -> ServerProcess:
    if monkeypatch is not None:  # with a planted slow step (planted_fault_entry.py)
        monkeypatch.setenv("DASHCHAT_TEST_ENTRY", str(Path(__file__).with_name("planted_fault_entry.py")))
    return ServerProcess(*SMOLLM_ARGS, "--max-model-len", "1024",
                         "--served-model-name", "m", "--shutdown-grace", grace).wait_ready()


def _stream(srv: ServerProcess, max_tokens: int, out: list[str]) -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "Tell a story."}], "max_tokens": max_tokens,
            "stream": True, "ignore_eos": True}
    with httpx.stream("POST", f"{srv.base_url}/v1/chat/completions", json=body, timeout=600) as r:
        for line in r.iter_lines():
            if line:
                out.append(line)


def _wait_streaming(out: list[str]) -> None:
    deadline = time.monotonic() + 30
    while len(out) < 3 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(out) >= 3


def _refuses_connections(srv: ServerProcess, deadline_s: float) -> bool:
    """Polls until a new connection is refused (the listening socket closed); False at the deadline."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        try:
            httpx.get(f"{srv.base_url}/health", timeout=2)
        except httpx.ConnectError:
            return True
        time.sleep(0.02)
    return False


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_drain_finishes_running_requests(sig: int) -> None:
    # A grace far longer than 20 tokens take on any machine (a loaded 2-core box streams ~2 tokens/s):
    # the drain ends when the stream does, so the test waits only as long as the machine needs.
    srv = _start(grace="600")
    try:
        out: list[str] = []
        t = threading.Thread(target=_stream, args=(srv, 20, out))
        t.start()
        _wait_streaming(out)
        srv.signal(sig)
        assert _refuses_connections(srv, deadline_s=30)  # no longer accepting, while the stream goes on
        t.join(600)
        assert out[-1] == "data: [DONE]"
        assert json.loads(out[-2][6:])["choices"][0]["finish_reason"] == "length"
        assert srv.wait(60) == 0
    finally:
        srv.stop()


def test_grace_over_aborts_with_clean_error(monkeypatch: pytest.MonkeyPatch) -> None:
    srv = _start(grace="1", monkeypatch=monkeypatch)
    try:
        out: list[str] = []
        # A planted slow step makes the stream last ~40 s or more on any machine: the 1 s grace ends it.
        t = threading.Thread(target=_stream, args=(srv, SLOW_MAX_TOKENS, out))
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
