"""Tensor parallelism end to end, on 127.0.0.1: a server over two CPU ranks (`--device-list 0 1`),
two "nodes" (`--nnodes 2`, one `--headless`), and what a lost or broken rank does to the server.

A tiny random Llama with SmolLM2's tokenizer and chat template keeps these fast; the quick-start's
own script on the embedded default model at two ranks is in test_e2e_default_model.py.
"""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from server_proc import REPO, ServerProcess, free_port
from tiny_models import save_tiny_chat_model

QUESTION = [{"role": "user", "content": "Say something about the sea."}]


@pytest.fixture(scope="module")
def tiny_chat(tmp_path_factory) -> str:
    d = tmp_path_factory.mktemp("tiny-chat")
    save_tiny_chat_model(d)
    return str(d)


def tiny_args(model: str, *extra: str) -> tuple[str, ...]:
    return ("--model-path", model, "--served-model-name", "tiny", "--device", "cpu", "--kv-cache-memory", "0.05",
            "--max-model-len", "512", *extra)


def greedy_answer(base_url: str, stream: bool = False) -> str:
    body = {"model": "tiny", "messages": QUESTION, "max_tokens": 24, "temperature": 0, "ignore_eos": True}
    if not stream:
        r = httpx.post(f"{base_url}/v1/chat/completions", json=body, timeout=120)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["message"]["content"]
    text = []
    with httpx.stream("POST", f"{base_url}/v1/chat/completions", json={**body, "stream": True}, timeout=120) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                for choice in json.loads(line[6:])["choices"]:
                    text.append(choice["delta"].get("content") or "")
    return "".join(text)


def children(pid: int) -> list[int]:
    """Live processes whose parent is `pid`."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            out.append(int(stat.parent.name))
    return out


def wait_gone(pids: list[int], timeout: float = 30) -> list[int]:
    deadline = time.monotonic() + timeout
    alive = pids
    while alive and time.monotonic() < deadline:
        alive = [p for p in alive if Path(f"/proc/{p}").exists() and "Z" not in _state(p)]
        time.sleep(0.05)
    return alive


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def one_rank_answers(tiny_chat) -> tuple[str, str]:
    srv = ServerProcess(*tiny_args(tiny_chat)).wait_ready()
    try:
        return greedy_answer(srv.base_url), greedy_answer(srv.base_url, stream=True)
    finally:
        srv.stop()


def listening(pids: list[int]) -> set[tuple[str, int]]:
    """(address, port) of every TCP socket these processes listen on (/proc/net/tcp and tcp6)."""
    inodes = set()
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    out = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state != "0A" or inode not in inodes:  # 0A: LISTEN
                continue
            hex_addr, hex_port = local.split(":")
            raw = bytes.fromhex(hex_addr)  # 32-bit words in host (little-endian) order
            words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
            out.add((str(ipaddress.ip_address(words)), int(hex_port, 16)))
    return out


def test_two_ranks_answer_as_one(tiny_chat, one_rank_answers) -> None:
    srv = ServerProcess(*tiny_args(tiny_chat, "--device-list", "0", "1")).wait_ready()
    try:
        workers = children(srv.proc.pid)
        assert len(workers) == 1
        # the rendezvous store and gloo's own connections listen on loopback only, like the HTTP port
        sockets = listening([srv.proc.pid, *workers])
        assert len(sockets) >= 3 and {addr for addr, _ in sockets} == {"127.0.0.1"}, sockets
        assert httpx.get(f"{srv.base_url}/version").json()["tensor_parallel_size"] == 2
        assert (greedy_answer(srv.base_url), greedy_answer(srv.base_url, stream=True)) == one_rank_answers
        assert "dashchat_tensor_parallel_collective_seconds" in httpx.get(f"{srv.base_url}/metrics").text
    finally:
        assert srv.stop() == 0
    assert wait_gone(workers) == []


def test_two_nodes_on_localhost(tiny_chat, one_rank_answers) -> None:
    port = str(free_port())
    common = tiny_args(tiny_chat, "--device-list", "0", "--threads", "1", "--nnodes", "2", "--master-port", port)
    node1 = subprocess.Popen([sys.executable, "-m", "dashchat.openai_server", *common, "--node-rank", "1", "--headless"],
                             cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    node0 = ServerProcess(*common, "--node-rank", "0")
    try:
        node0.wait_ready()
        ranks = children(node1.pid)
        assert len(ranks) == 1 and children(node0.proc.pid) == []  # node 0's only rank is its engine
        assert (greedy_answer(node0.base_url), greedy_answer(node0.base_url, stream=True)) == one_rank_answers
        assert node0.stop() == 0
        rc = node1.wait(timeout=60)
        assert rc == 0, node1.stdout.read().decode(errors="replace")[-3000:]  # node 0 told its ranks to stop
        assert wait_gone(ranks) == []
    finally:
        node0.stop()
        if node1.poll() is None:
            node1.kill()
        node1.wait()


def test_sigterm_to_the_whole_group_lets_a_stream_finish(tiny_chat) -> None:
    """A service manager's stop signals every process: the worker rank ignores it, the server drains
    the stream in flight, then tells the rank to stop; everything exits 0."""
    srv = ServerProcess(*tiny_args(tiny_chat, "--device-list", "0", "1", "--shutdown-grace", "600"),
                        new_session=True).wait_ready()
    try:
        [worker] = children(srv.proc.pid)
        body = {"model": "tiny", "messages": QUESTION, "max_tokens": 120, "ignore_eos": True, "stream": True}
        lines: list[str] = []
        with httpx.stream("POST", f"{srv.base_url}/v1/chat/completions", json=body, timeout=300) as r:
            for line in r.iter_lines():
                if not line:
                    continue
                lines.append(line)
                if len(lines) == 3:  # the stream is running
                    os.killpg(srv.proc.pid, signal.SIGTERM)
        assert lines[-1] == "data: [DONE]"
        chunks = [json.loads(line[6:]) for line in lines[:-1]]
        assert not any("error" in c for c in chunks), lines[-2]
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        assert srv.wait(timeout=120) == 0, srv.log()
    finally:
        srv.stop()
    assert wait_gone([worker]) == []


def test_node_0_names_the_ranks_that_never_joined(tiny_chat) -> None:
    port = free_port()
    srv = ServerProcess(*tiny_args(tiny_chat, "--device-list", "0", "--nnodes", "2", "--master-port", str(port),
                                   "--distributed-load-timeout", "2"))
    try:
        assert srv.wait(timeout=300) == 1
        assert f"tensor-parallel rank 1 did not join the rendezvous at 127.0.0.1:{port} within 2 s" in srv.log()
    finally:
        srv.stop()


def test_a_killed_rank_fails_requests_and_the_server_exits(tiny_chat) -> None:
    srv = ServerProcess(*tiny_args(tiny_chat, "--device-list", "0", "1")).wait_ready()
    try:
        [worker] = children(srv.proc.pid)
        health: list[int] = []

        def poll_health() -> None:  # until the server has exited
            while srv.proc.poll() is None:
                try:
                    health.append(httpx.get(f"{srv.base_url}/health", timeout=2).status_code)
                except httpx.HTTPError:
                    pass
                time.sleep(0.02)

        body = {"model": "tiny", "messages": QUESTION, "max_tokens": 400, "ignore_eos": True, "stream": True}
        lines: list[str] = []
        with httpx.stream("POST", f"{srv.base_url}/v1/chat/completions", json=body, timeout=60) as r:
            for line in r.iter_lines():
                if not line:
                    continue
                lines.append(line)
                if len(lines) == 3:  # the stream is running: kill rank 1
                    poller = threading.Thread(target=poll_health, daemon=True)
                    poller.start()
                    os.kill(worker, signal.SIGKILL)
        assert lines[-1] == "data: [DONE]"
        error = json.loads(lines[-2][6:])["error"]
        assert error["type"] == "server_error"
        assert srv.wait(timeout=60) != 0
        poller.join(timeout=10)
        assert 503 in health  # between the loss and the exit
    finally:
        srv.stop()
    assert wait_gone([worker]) == []


def test_a_rank_that_fails_to_load_stops_the_start_with_its_error(tiny_chat, tmp_path) -> None:
    # Only worker processes carry DASHCHAT_WORKER_SPEC: point theirs at a model folder that does not exist.
    (tmp_path / "sitecustomize.py").write_text(
        "import json, os\n"
        "spec = os.environ.get('DASHCHAT_WORKER_SPEC')\n"
        "if spec:\n"
        "    spec = json.loads(spec)\n"
        "    spec['args']['model_dir'] = '/nonexistent/dashchat-test-model'\n"
        "    os.environ['DASHCHAT_WORKER_SPEC'] = json.dumps(spec)\n"
    )
    env = {"PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    srv = ServerProcess(*tiny_args(tiny_chat, "--device-list", "0", "1"), env=env)
    try:
        assert srv.wait(timeout=300) == 1
        assert "tensor-parallel rank 1 failed" in srv.log() and "/nonexistent/dashchat-test-model" in srv.log()
    finally:
        srv.stop()


def test_a_busy_master_port_is_a_clear_error(tiny_chat) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        srv = ServerProcess(*tiny_args(tiny_chat, "--device-list", "0", "1", "--master-port", str(port)))
        try:
            assert srv.wait(timeout=300) == 1
            assert f"--master-port {port} on 127.0.0.1 is not free" in srv.log()
        finally:
            srv.stop()


def test_a_model_that_does_not_split_is_refused() -> None:
    srv = ServerProcess("--model-path", "smollm2-135m-instruct", "--device", "cpu", "--device-list", "0", "1")
    try:
        assert srv.wait(timeout=300) == 1
        assert "cannot be split over 2 ranks" in srv.log() and "sizes that work for it: 1, 3" in srv.log()
        assert children(srv.proc.pid) == []
    finally:
        srv.stop()


def test_torchrun_ranks(tiny_chat, one_rank_answers) -> None:
    """torchrun starts both ranks with one command line: rank 0 serves HTTP, rank 1 runs headless."""
    port = free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), "-m", "dashchat.openai_server",
           *tiny_args(tiny_chat, "--device-list", "0", "1", "--host", "127.0.0.1", "--port", str(port))]
    agent = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base_url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        assert agent.poll() is None, "torchrun exited"
        try:
            return httpx.get(f"{base_url}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_for(ready, 300, "the server under torchrun")
        ranks = children(agent.pid)
        assert len(ranks) == 2
        assert httpx.get(f"{base_url}/version").json()["tensor_parallel_size"] == 2
        assert (greedy_answer(base_url), greedy_answer(base_url, stream=True)) == one_rank_answers
        agent.send_signal(signal.SIGTERM)
        agent.wait(timeout=60)
        assert wait_gone(ranks) == []
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()
