"""One-stream decode while other processes compete for the cores: dashchat against llama-server.

A server on a shared machine loses a core now and then to another job. This bench measures
one-stream decode tok/s (greedy, end tokens banned, so answers run to --max-tokens; speculation
off) with 0, 1, 2 ... busy processes beside the server (--competitors): each competitor is a pure
CPU loop in its own process, started before the measured requests and killed after them (it also
ends itself after --competitor-timeout s). The conditions alternate within one server start, round
after round, and the servers alternate between rounds; the table gives medians over rounds of the
median of --requests streams.

Files: `embedded` is the embedded default GGUF (Qwen2.5-Coder-0.5B-Instruct, Q8_0); `qwen2.5-1.5b`
(etc.) is a random-weight Q4_K_M file of that shape made by bench/real_shapes.py's file maker in
--workdir (deleted after unless --keep-files).

dashchat variants (--variant NAME=ENV, repeatable) start dashchat with extra environment, e.g.
`--variant spin300k=GOMP_SPINCOUNT=300000` (libgomp's own default) or `--variant
main=PYTHONPATH=/work/main` (another checkout), to compare a change in the same run.

    flock /work/bench.lock python bench/contention.py --files embedded qwen2.5-1.5b --rounds 2
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from load_common import ServerProcess, free_port, http_client, loadavg, machine_info, stream_chat  # noqa: E402
from peers import SERVED_NAME, end_token_ids, llama_server_version, request_body  # noqa: E402

BUSY = "import sys, time\nend = time.monotonic() + float(sys.argv[1])\nwhile time.monotonic() < end:\n    pass\n"


def start_competitors(n: int, timeout: float) -> list[subprocess.Popen]:
    """n busy processes (each one pure-CPU loop, ending itself after `timeout` s)."""
    return [subprocess.Popen([sys.executable, "-c", BUSY, str(timeout)], start_new_session=True,
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            for _ in range(n)]


def stop_competitors(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
        p.wait()


async def decode_rates(base_url: str, peer: str, args: argparse.Namespace, ban: list[int], first: int) -> list[float]:
    """tok/s of --requests one-stream requests (first token to last)."""
    rates = []
    async with http_client(base_url, 1, args.request_timeout) as client:
        for i in range(args.requests):
            res = await stream_chat(client, request_body(first + i, args.max_tokens, ban, peer))
            if not res.ok:
                raise RuntimeError(f"{peer}: request failed: {res.error}")
            n, _ = res.completion_tokens(args.max_tokens)
            if n > 1 and res.t_last > res.t_first:
                rates.append((n - 1) / (res.t_last - res.t_first))
    return rates


def server_cmd(peer: str, gguf: Path | None, port: int, args: argparse.Namespace) -> list[str]:
    if peer == "llama-server":
        return [str(args.llama_bin / "llama-server"), "-m", str(gguf), "--alias", SERVED_NAME, "--host", "127.0.0.1",
                "--port", str(port), "-t", str(args.threads), "-tb", str(args.threads), "-np", "1",
                "-c", str(args.max_model_len), "--no-webui"]
    cmd = [sys.executable, "-m", "dashchat.openai_server", "--served-model-name", SERVED_NAME, "--device", "cpu",
           "--host", "127.0.0.1", "--port", str(port), "--max-model-len", str(args.max_model_len),
           "--log-level", "warning", "--speculative-config", "off"]  # one token a step, as llama-server here
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    return cmd + (["--model-path", str(gguf)] if gguf is not None else [])


def run_server(peer: str, env_extra: dict[str, str], gguf: Path | None, ban: list[int],
               args: argparse.Namespace) -> dict[int, float]:
    """Start one server, measure every competitor count (in the order given), stop it."""
    port = free_port()
    env = {**os.environ, **env_extra}
    srv = ServerProcess(peer, server_cmd(peer, gguf, port, args), port,
                        args.workdir / f"{peer}-{port}.log", ready_path="/health", env=env,
                        start_timeout=args.start_timeout)
    out: dict[int, float] = {}
    try:
        srv.start()
        asyncio.run(decode_rates(srv.base_url, peer, args, ban, 0))  # warm-up
        for n in args.competitors:
            procs = start_competitors(n, args.competitor_timeout)
            try:
                time.sleep(0.5)  # let the competitors get going
                out[n] = statistics.median(asyncio.run(decode_rates(srv.base_url, peer, args, ban, 100 * (n + 1))))
            finally:
                stop_competitors(procs)
    finally:
        srv.stop()
    return out


def resolve_file(name: str, args: argparse.Namespace) -> tuple[Path, bool]:
    """(path, made here) of a file name: `embedded` or a bench/real_shapes.py shape (Q4_K_M)."""
    from dashchat.models.embedded import embedded_gguf

    source = embedded_gguf("qwen2.5-coder-0.5b-instruct")
    if name == "embedded":
        return source, False
    from real_shapes import make_file

    existed = (args.workdir / f"{name}-Q4_K_M.gguf").exists()
    return make_file(args.workdir, name, "Q4_K_M", source, args.llama_bin / "llama-quantize"), not existed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", nargs="+", default=["embedded", "qwen2.5-1.5b"])
    ap.add_argument("--competitors", type=lambda s: [int(c) for c in s.split(",")], default=[0, 1, 2],
                    help="busy-process counts, comma-separated (default 0,1,2)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--requests", type=int, default=3, help="one-stream requests per condition (median)")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="both servers' threads (0: dashchat's default)")
    ap.add_argument("--max-model-len", type=int, default=1024)
    ap.add_argument("--peers", nargs="+", default=["dashchat", "llama-server"])
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=K=V[,K=V]",
                    help="an extra dashchat run with this environment (repeatable)")
    ap.add_argument("--competitor-timeout", type=float, default=300.0)
    ap.add_argument("--llama-bin", type=Path,
                    default=Path(os.environ.get("LLAMA_CPP_BIN", HERE / ".llama-server" / "bin")))
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/dashchat-contention"))
    ap.add_argument("--keep-files", action="store_true")
    ap.add_argument("--json", type=Path, default=None, help="write the results here too")
    ap.add_argument("--request-timeout", type=float, default=600.0)
    ap.add_argument("--start-timeout", type=float, default=600.0)
    args = ap.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    # a `timeout` or Ctrl-C ends the run through the finally blocks: no server or competitor left behind
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    runs: list[tuple[str, str, dict[str, str]]] = []  # (label, peer, extra env)
    for peer in args.peers:
        runs.append((peer, peer, {}))
    for spec in args.variant:
        name, _, env = spec.partition("=")
        runs.append((f"dashchat {name}", "dashchat", dict(kv.split("=", 1) for kv in env.split(",") if kv)))
    info = machine_info()
    print(f"{info['cpu']}, {info['cores']} cores | load avg {loadavg()} | "
          f"llama-server {llama_server_version(args.llama_bin / 'llama-server') if 'llama-server' in args.peers else '-'}",
          flush=True)
    results: dict[str, dict[str, dict[int, list[float]]]] = {}
    try:
        for fname in args.files:
            path, made = resolve_file(fname, args)
            ban = end_token_ids(path)
            table = results.setdefault(fname, {})
            try:
                for rnd in range(args.rounds):
                    order = runs if rnd % 2 == 0 else runs[::-1]
                    for label, peer, env in order:
                        print(f"{fname} round {rnd + 1} {label} (load avg {loadavg()})", flush=True)
                        gguf = None if (fname == "embedded" and peer == "dashchat") else path
                        res = run_server(peer, env, gguf, ban, args)
                        print(f"   {' '.join(f'{n} busy: {r:.2f} tok/s' for n, r in res.items())}", flush=True)
                        for n, r in res.items():
                            table.setdefault(label, {}).setdefault(n, []).append(r)
            finally:
                if made and not args.keep_files:
                    path.unlink(missing_ok=True)
    finally:
        ServerProcess.stop_all()
    print(f"\nload avg after {loadavg()}\n")
    cols = args.competitors
    print("| file | server | " + " | ".join(f"{n} busy tok/s" for n in cols) + " | "
          + " | ".join(f"{n} busy / quiet" for n in cols if n) + " |")
    print("|---|---|" + "---:|" * (len(cols) + len([n for n in cols if n])))
    for fname, table in results.items():
        for label, by_n in table.items():
            med = {n: statistics.median(v) for n, v in by_n.items()}
            ratios = [f"{med[n] / med[0]:.2f}" if 0 in med and med[0] else "-" for n in cols if n]
            print(f"| {fname} | {label} | " + " | ".join(f"{med[n]:.2f}" for n in cols) + " | "
                  + " | ".join(ratios) + " |")
    if args.json:
        args.json.write_text(json.dumps({"machine": info, "args": {k: str(v) for k, v in vars(args).items()},
                                         "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
