"""Shared pieces for the HTTP benches: start/stop a server process on 127.0.0.1, stream an
OpenAI-style chat completion and time it, run a closed loop of requests at a fixed concurrency,
and describe the machine. No dashchat imports: any OpenAI-compatible server works.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, ClassVar

import httpx

LOOPBACK = "127.0.0.1"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


class ServerProcess:
    """A server command in its own process group, logging to a file; stop() always ends the group.

    `ready_path` is polled with GET until it answers 200 (or the process exits, or `start_timeout`).
    """

    _live: ClassVar[list[ServerProcess]] = []

    def __init__(self, name: str, cmd: Sequence[str], port: int, log_path: Path,
                 ready_path: str = "/health", env: dict[str, str] | None = None,
                 start_timeout: float = 600.0) -> None:
        self.name, self.cmd, self.port = name, list(cmd), port
        self.log_path, self.ready_path, self.env = log_path, ready_path, env
        self.start_timeout = start_timeout
        self.proc: subprocess.Popen | None = None
        self.base_url = f"http://{LOOPBACK}:{port}"

    def start(self) -> ServerProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.cmd, stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=self.env, start_new_session=True)
        ServerProcess._live.append(self)
        deadline = time.monotonic() + self.start_timeout
        with httpx.Client(trust_env=False, timeout=5.0) as c:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"{self.name} exited with {self.proc.returncode} while starting; "
                                       f"log {self.log_path}:\n{self.log_tail()}")
                try:
                    if c.get(self.base_url + self.ready_path).status_code == 200:
                        return self
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{self.name} not ready after {self.start_timeout:.0f} s; "
                                       f"log {self.log_path}:\n{self.log_tail()}")
                time.sleep(0.5)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def rss_mb(self) -> float:
        """Resident memory of the server's process group, MiB (0 if gone)."""
        if self.proc is None or self.proc.poll() is not None:
            return 0.0
        total = 0
        for status in Path("/proc").glob("[0-9]*/stat"):
            try:
                parts = status.read_text().rsplit(")", 1)[1].split()
                if int(parts[2]) == self.proc.pid:  # pgrp (field 5)
                    total += int(parts[21]) * os.sysconf("SC_PAGE_SIZE")  # rss pages (field 24)
            except (OSError, IndexError, ValueError):
                continue
        return total / 2**20

    def stop(self, grace: float = 15.0) -> None:
        """SIGTERM to the group, then SIGKILL after `grace` seconds. Safe to call twice."""
        proc = self.proc
        if proc is not None and proc.poll() is None:
            for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    proc.wait(timeout=wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        if proc is not None:
            # children left in the group (none expected) go too
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        if self in ServerProcess._live:
            ServerProcess._live.remove(self)
        if getattr(self, "_log", None):
            self._log.close()

    @classmethod
    def stop_all(cls) -> None:
        for s in list(cls._live):
            s.stop(grace=5.0)

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass
class StreamResult:
    ok: bool
    error: str = ""
    t_start: float = 0.0              # request sent (perf_counter)
    t_first: float | None = None      # first chunk with non-empty content
    t_last: float | None = None       # last chunk with non-empty content
    t_end: float = 0.0                # stream closed
    content_chunks: int = 0
    text: str = ""
    finish_reason: str | None = None
    usage: dict[str, Any] | None = None
    chunk_times: list[float] = field(default_factory=list, repr=False)

    @property
    def ttft(self) -> float:
        return (self.t_first or self.t_end) - self.t_start

    def completion_tokens(self, max_tokens: int) -> tuple[int, str]:
        """Generated tokens and where the number came from: the server's usage, else max_tokens when
        the stream ended on length, else the count of content chunks (one token each, near enough)."""
        if self.usage and self.usage.get("completion_tokens"):
            return int(self.usage["completion_tokens"]), "usage"
        if self.finish_reason == "length":
            return max_tokens, "max_tokens"
        return self.content_chunks, "chunks"


async def stream_chat(client: httpx.AsyncClient, body: dict[str, Any]) -> StreamResult:
    """POST /v1/chat/completions with stream=true and time every content chunk."""
    res = StreamResult(ok=False, t_start=time.perf_counter())
    try:
        async with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
            if r.status_code != 200:
                res.error = f"HTTP {r.status_code}: {(await r.aread())[:300]!r}"
                res.t_end = time.perf_counter()
                return res
            async for line in r.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    res.error = json.dumps(chunk["error"])[:300]
                    break
                now = time.perf_counter()
                if chunk.get("usage"):
                    res.usage = chunk["usage"]
                for choice in chunk.get("choices") or []:
                    piece = (choice.get("delta") or {}).get("content")
                    if piece:
                        res.content_chunks += 1
                        res.text += piece
                        res.chunk_times.append(now)
                        if res.t_first is None:
                            res.t_first = now
                        res.t_last = now
                    if choice.get("finish_reason"):
                        res.finish_reason = choice["finish_reason"]
        res.ok = not res.error and res.t_first is not None
        if not res.ok and not res.error:
            res.error = "no content streamed"
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        res.error = f"{type(exc).__name__}: {exc}"
    res.t_end = time.perf_counter()
    return res


async def closed_loop(n_requests: int, concurrency: int,
                      one: Callable[[int], Awaitable[StreamResult]]) -> tuple[list[StreamResult], float]:
    """Run `one(i)` for i in range(n_requests), at most `concurrency` in flight; (results, wall s)."""
    queue = iter(range(n_requests))
    results: list[StreamResult | None] = [None] * n_requests

    async def worker() -> None:
        for i in queue:
            results[i] = await one(i)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(min(concurrency, n_requests))))
    return [r for r in results if r is not None], time.perf_counter() - start


def http_client(base_url: str, concurrency: int, timeout: float) -> httpx.AsyncClient:
    """A loopback client: no proxies from the environment, enough connections for `concurrency`."""
    return httpx.AsyncClient(base_url=base_url, trust_env=False,
                             timeout=httpx.Timeout(timeout, connect=10.0),
                             limits=httpx.Limits(max_connections=concurrency + 4,
                                                 max_keepalive_connections=concurrency + 4))


def machine_info() -> dict[str, Any]:
    cpu, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and cpu in ("", platform.machine(), platform.processor()):
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    mem_gib = 0.0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_gib = int(line.split()[1]) / 2**20
    except OSError:
        pass
    simd = [f for f in ("avx512f", "avx512_vnni", "avx_vnni", "avx2", "fma", "f16c") if f in flags]
    return {"cpu": cpu, "arch": platform.machine(), "cores": os.cpu_count(), "mem_gib": round(mem_gib, 1),
            "simd": simd, "python": platform.python_version()}


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"
