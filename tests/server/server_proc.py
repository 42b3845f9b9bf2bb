"""Start the real server (`python -m dashchat.openai_server`) as a subprocess on 127.0.0.1."""

from __future__ import annotations

import atexit
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[2]
SMOLLM = "smollm2-135m-instruct"
# SmolLM2 on the CPU with a small KV cache: starts in seconds.
SMOLLM_ARGS = ("--model-path", SMOLLM, "--device", "cpu", "--kv-cache-memory", "0.25")
START_TIMEOUT = float(os.environ.get("DASHCHAT_TEST_START_TIMEOUT", "600"))  # first run converts the GGUF


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


_LOGS: list[Path] = []


@atexit.register
def _remove_logs() -> None:
    # A failing test already carries the log's tail in its message; the files would pile up in /tmp.
    for path in _LOGS:
        path.unlink(missing_ok=True)


class ServerProcess:
    def __init__(self, *args: str, env: dict[str, str] | None = None, new_session: bool = False) -> None:
        """new_session: the server leads its own process group (a test can signal the whole group)."""
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(tempfile.mkstemp(prefix="dashchat-server-", suffix=".log")[1])
        _LOGS.append(self.log_path)
        # DASHCHAT_TEST_ENTRY: run another entry script instead (e.g. a wrapper under a profiler).
        entry = os.environ.get("DASHCHAT_TEST_ENTRY")
        prog = [entry] if entry else ["-m", "dashchat.openai_server"]
        cmd = [sys.executable, *prog, "--host", "127.0.0.1", "--port", str(self.port), *args]
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=self._log, stderr=subprocess.STDOUT,
                                     env={**os.environ, **(env or {})}, start_new_session=new_session)

    def log(self, tail: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-tail:]

    def wait_ready(self, timeout: float = START_TIMEOUT) -> ServerProcess:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(f"{self.base_url}/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"server not ready after {timeout}s:\n{self.log()}")

    def signal(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout)

    def stop(self, timeout: float = 60) -> int:
        self.signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        self._log.close()
        return rc


def running(*args: str, env: dict[str, str] | None = None) -> Iterator[ServerProcess]:
    """For fixtures (`yield from running(...)`): a ready server, stopped when the fixture ends."""
    srv = ServerProcess(*args, env=env)
    try:
        yield srv.wait_ready()
    finally:
        srv.stop()


def metric(base_url: str, name: str, headers: dict[str, str] | None = None) -> float:
    """One unlabelled sample from /metrics."""
    text = httpx.get(f"{base_url}/metrics", headers=headers or {}, timeout=10).text
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise KeyError(name)


def wait_engine_idle(base_url: str, timeout: float = 10.0) -> tuple[float, float]:
    """Wait until nothing runs or waits and no KV block is held; returns the last (running, kv_used)."""
    deadline = time.monotonic() + timeout
    running = kv = -1.0
    while time.monotonic() < deadline:
        running = metric(base_url, "dashchat_num_requests_running") + metric(base_url, "dashchat_num_requests_waiting")
        kv = metric(base_url, "dashchat_kv_cache_blocks_used")
        if running == 0 and kv == 0:
            break
        time.sleep(0.05)
    return running, kv


__all__ = ["SMOLLM", "SMOLLM_ARGS", "ServerProcess", "free_port", "metric", "signal", "wait_engine_idle"]
