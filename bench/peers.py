"""dashchat's server against llama.cpp's servers, over HTTP, same GGUF, one run.

The peers: llama.cpp's own C++ `llama-server` (bench/.llama-server, built by
bench/setup_llama_server.sh), which batches requests across --parallel slots, and, as a second row,
llama-cpp-python's server (one request at a time).

Starts each server in turn on 127.0.0.1 (never both at once), streams chat completions to it with
httpx/asyncio, stops it, and prints a Markdown table:

  TTFT          median time from sending a single request to its first content chunk (lower is better)
  decode tok/s  single stream, median over --requests: (completion tokens - 1) / (last - first chunk)
  agg tok/s @c  --concurrency c clients in a closed loop, max(c, --requests) requests:
                all completion tokens / wall time from the first request sent to the last finished

Every request is the same for both servers: greedy (temperature 0), fixed max_tokens, and
logit_bias -100 on the model's end tokens (<|endoftext|>, <|im_start|>, <|im_end|>, the GGUF's
EOS) so every answer runs to max_tokens (llama.cpp's server has no ignore_eos). Completion tokens
come from the stream's usage chunk where the server sends one (dashchat), else max_tokens when the
stream ends on finish_reason "length" (checked), else the number of content chunks. Each request has
its own system message, so neither server's prefix cache shortens prefill.

    python bench/peers.py                                   # both, defaults below
    python bench/peers.py --dashchat-args "--quantization int8"
    python bench/peers.py --dashchat-args "" --dashchat-args "--quantization int8"   # two dashchat rows
    python bench/peers.py --requests 3 --max-tokens 64 --concurrency 8 --skip-llamacpp
    python bench/peers.py --rounds 2 --json bench/results/peers.json   # alternate, medians over rounds

`llama-server` runs with -t/-tb = --threads, --parallel = the highest concurrency (continuous
batching is its default), a context of --max-model-len per slot (-c = slots x --max-model-len, so
every slot has room), and no web UI. Ratios in the table are against it when it runs.

llama-cpp-python's side is `python -m llama_cpp.server` from bench/.venv-llamacpp, built by
bench/setup_llamacpp.sh when missing (a compile of many minutes). It runs with
--n_threads/--n_threads_batch = --threads, --n_ctx = --max-model-len, and --interrupt_requests False
(its default True would cut a running stream short whenever another request arrives). Its server
holds one llama_cpp.Llama and serves one request at a time (no n_parallel / batching in
llama-cpp-python's server), so concurrent requests queue: its aggregate is its single-stream rate.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import math
import os
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

from load_common import (  # noqa: E402
    ServerProcess, StreamResult, closed_loop, free_port, http_client, loadavg, machine_info, stream_chat,
)

SERVED_NAME = "bench-model"
SYSTEM = "Request {i}. You are a helpful, imaginative writer who answers at length."
USER = ("Write a long, detailed story about a robot who learns to paint in a small seaside town. "
        "Describe the town, the people the robot meets, each painting it makes and how it feels, "
        "chapter by chapter.")
END_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<|end|>",
              "</s>", "<|endofturn|>")


def end_token_ids(gguf_path: Path) -> list[int]:
    """The GGUF's EOS/EOT ids and the ids of the usual chat end markers it has."""
    from gguf import GGUFReader

    reader = GGUFReader(str(gguf_path))
    ids: set[int] = set()
    for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id"):
        f = reader.fields.get(key)
        if f is not None:
            ids.add(int(f.contents()))
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    index = {t: i for i, t in enumerate(tokens[:1024])}  # special tokens sit at the front
    ids.update(index[t] for t in END_TOKENS if t in index)
    return sorted(ids)


def request_body(i: int, max_tokens: int, ban: list[int], peer: str) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": SERVED_NAME,
        "messages": [{"role": "system", "content": SYSTEM.format(i=i)}, {"role": "user", "content": USER}],
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "top_p": 1.0,
        "logit_bias": {str(t): -100 for t in ban},
        "stream_options": {"include_usage": True},
    }
    if peer in ("llamacpp", "llama-server"):
        # llama-cpp-python's request defaults are top_k 40, min_p 0.05, repeat_penalty 1.1: switch off
        body.update(top_k=0, min_p=0.0, repeat_penalty=1.0)
    return body


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


async def measure(base_url: str, peer: str, args: argparse.Namespace, ban: list[int]) -> dict[str, Any]:
    """Warm up, then TTFT + single-stream decode, then aggregate at each concurrency."""
    max_c = max(args.concurrency)
    out: dict[str, Any] = {"token_source": set(), "errors": []}
    counter = iter(range(10**9))

    def tokens(r: StreamResult) -> int:
        n, src = r.completion_tokens(args.max_tokens)
        out["token_source"].add(src)
        if r.finish_reason != "length":
            out["errors"].append(f"finish_reason {r.finish_reason!r} (not 'length') after {n} tokens")
        return n

    async with http_client(base_url, max_c, args.request_timeout) as client:
        async def one(max_tokens: int) -> StreamResult:
            res = await stream_chat(client, request_body(next(counter), max_tokens, ban, peer))
            if not res.ok:
                raise RuntimeError(f"{peer}: request failed: {res.error}")
            return res

        # reference prompt length, non-streaming (llama.cpp's stream has no usage)
        r = await client.post("/v1/chat/completions", json={**request_body(0, 1, ban, peer), "stream": False})
        r.raise_for_status()
        out["prompt_tokens"] = r.json()["usage"]["prompt_tokens"]
        # warm-up: one full-length stream and one burst at the highest concurrency
        await one(args.max_tokens)
        await closed_loop(max_c, max_c, lambda i: one(4))

        ttfts, rates = [], []
        for _ in range(args.requests):
            res = await one(args.max_tokens)
            n = tokens(res)
            ttfts.append(res.ttft)
            if n > 1 and res.t_last > res.t_first:
                rates.append((n - 1) / (res.t_last - res.t_first))
        out["ttft_ms"] = median(ttfts) * 1000
        out["ttft_ms_all"] = [round(t * 1000, 1) for t in ttfts]
        out["decode_tok_s"] = median(rates)
        out["decode_tok_s_all"] = [round(x, 1) for x in rates]
        for c in args.concurrency:
            n_req = max(c, args.requests)
            results, wall = await closed_loop(n_req, c, lambda i: one(args.max_tokens))
            total = sum(tokens(r) for r in results)
            out[f"agg_tok_s_c{c}"] = total / wall
            out[f"c{c}"] = {"requests": n_req, "tokens": total, "wall_s": round(wall, 2),
                            "ttft_ms_median": round(median([r.ttft for r in results]) * 1000, 1),
                            "ttft_ms_max": round(max(r.ttft for r in results) * 1000, 1)}
            print(f"  {peer} c={c}: {total} tokens in {wall:.1f} s = {total / wall:.1f} tok/s", flush=True)
    out["token_source"] = sorted(out["token_source"])
    return out


def ensure_llamacpp(venv: Path, setup: bool) -> Path:
    python = venv / "bin" / "python"
    ok = python.exists() and subprocess.run([str(python), "-c", "import llama_cpp.server"],
                                            capture_output=True, check=False).returncode == 0
    if not ok:
        if not setup:
            raise SystemExit(f"{venv} has no llama-cpp-python; run bash bench/setup_llamacpp.sh")
        print(f"{venv} missing: running bench/setup_llamacpp.sh (compiles llama.cpp; many minutes)", flush=True)
        subprocess.run(["bash", str(HERE / "setup_llamacpp.sh")], check=True,
                       env={**os.environ, "VENV": str(venv), "PYTHON": os.environ.get("PYTHON", sys.executable)})
    return python


def ensure_llama_server(binary: Path, setup: bool) -> Path:
    if not binary.exists():
        if not setup:
            raise SystemExit(f"{binary} missing; run bash bench/setup_llama_server.sh")
        print(f"{binary} missing: running bench/setup_llama_server.sh (compiles llama.cpp; many minutes)",
              flush=True)
        subprocess.run(["bash", str(HERE / "setup_llama_server.sh")], check=True)
    return binary


def llama_server_version(binary: Path) -> str:
    r = subprocess.run([str(binary), "--version"], capture_output=True, text=True, check=False)
    lines = [ln for ln in (r.stdout + r.stderr).splitlines() if ln.startswith("version")]
    return lines[0].removeprefix("version: ") if lines else "?"


def llamacpp_version(python: Path) -> str:
    r = subprocess.run([str(python), "-c", "import llama_cpp; print(llama_cpp.__version__)"],
                       capture_output=True, text=True, check=False)
    return r.stdout.strip() or "?"


def run_server(name: str, cmd: list[str], ready: str, peer: str, args: argparse.Namespace,
               ban: list[int], logdir: Path) -> dict[str, Any]:
    port = free_port()
    cmd = [a.replace("{port}", str(port)) for a in cmd]
    print(f"\n== {name}\n   {shlex.join(cmd)}", flush=True)
    srv = ServerProcess(name, cmd, port, logdir / f"{peer}-{port}.log", ready_path=ready,
                        start_timeout=args.start_timeout)
    t0 = time.perf_counter()
    try:
        srv.start()
        print(f"   ready in {time.perf_counter() - t0:.1f} s (log {srv.log_path})", flush=True)
        res = asyncio.run(measure(srv.base_url, peer, args, ban))
        res["rss_mb"] = round(srv.rss_mb(), 1)
    finally:
        srv.stop()
    res["command"] = shlex.join(cmd)
    print(f"   {json.dumps({k: v for k, v in res.items() if not isinstance(v, (dict, list))})}", flush=True)
    if res["errors"]:
        print(f"   WARNING: {len(res['errors'])} requests did not end on length, e.g. {res['errors'][0]}",
              flush=True)
    return res


def fmt(x: float, digits: int = 1) -> str:
    return "n/a" if math.isnan(x) else f"{x:.{digits}f}"


def table(results: dict[str, dict], concurrency: list[int], peer_name: str | None) -> str:
    """Rows, then each dashchat row's ratio to the peer (`peer_name`)."""
    cols = ["ttft_ms", "decode_tok_s"] + [f"agg_tok_s_c{c}" for c in concurrency]
    head = ["TTFT ms (median, lower is better)", "decode tok/s (1 stream)"] + \
        [f"aggregate tok/s (c={c})" for c in concurrency]
    lines = ["| server | " + " | ".join(head) + " |", "|---|" + "---:|" * len(cols)]
    for name, row in results.items():
        lines.append(f"| {name} | " + " | ".join(fmt(row[c]) for c in cols) + " |")
    if peer_name:
        base = results[peer_name]
        for name, row in results.items():
            if not name.startswith("dashchat"):
                continue
            cells = []
            for c in cols:
                r = row[c] / base[c] if base[c] else float("nan")
                cells.append(f"{fmt(r, 2)}x" + (" (lower is better)" if c == "ttft_ms" else ""))
            lines.append(f"| **{name} / {peer_name.split(' (')[0]}** | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct",
                    help="embedded model name whose GGUF both servers load (default %(default)s)")
    ap.add_argument("--gguf", type=Path, help="a .gguf file instead of the embedded model's")
    ap.add_argument("--dashchat-args", action="append", default=None, metavar="FLAGS",
                    help="extra flags for dashchat.openai_server, one string (e.g. '--quantization int8'); "
                         "repeat for several dashchat rows (default: one row, no extra flags)")
    ap.add_argument("--llamacpp-args", default="", metavar="FLAGS",
                    help="extra flags for llama_cpp.server (e.g. '--flash_attn True')")
    ap.add_argument("--requests", type=int, default=5,
                    help="single-stream requests (medians); each concurrency c runs max(c, this) requests")
    ap.add_argument("--max-tokens", type=int, default=128, help="completion tokens per request")
    ap.add_argument("--concurrency", type=lambda s: [int(c) for c in s.split(",") if c], default=[8, 32],
                    help="comma list (default 8,32)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="measure every server this many times, alternating (background load then hits "
                         "all alike); the table shows medians over rounds")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="CPU threads for both servers")
    ap.add_argument("--max-model-len", type=int, default=2048, help="context of both servers")
    ap.add_argument("--skip-llamacpp", action="store_true", help="skip llama-cpp-python's server")
    ap.add_argument("--skip-llama-server", action="store_true", help="skip llama.cpp's C++ llama-server")
    ap.add_argument("--llama-server", type=Path, default=HERE / ".llama-server" / "bin" / "llama-server",
                    help="the llama-server binary (default: built by bench/setup_llama_server.sh when missing)")
    ap.add_argument("--llama-server-args", default="", metavar="FLAGS", help="extra flags for llama-server")
    ap.add_argument("--skip-dashchat", action="store_true", help="measure llama.cpp only")
    ap.add_argument("--no-setup", action="store_true", help="fail instead of building the llama.cpp venv")
    ap.add_argument("--llamacpp-venv", type=Path, default=HERE / ".venv-llamacpp")
    ap.add_argument("--request-timeout", type=float, default=600.0, help="seconds per request")
    ap.add_argument("--start-timeout", type=float, default=600.0, help="seconds for a server to get ready")
    ap.add_argument("--logdir", type=Path, help="server logs (default: a temporary folder)")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    if args.requests < 1 or args.max_tokens < 2 or not args.concurrency:
        ap.error("--requests >= 1, --max-tokens >= 2 and at least one concurrency, please")

    # Ctrl-C and SIGTERM unwind through the finally blocks that stop the servers
    def on_term(*_: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)

    if args.gguf is None:
        from dashchat.models.embedded import embedded_gguf

        args.gguf = embedded_gguf(args.model)
    gguf = args.gguf.resolve()
    ban = end_token_ids(gguf)
    logdir = args.logdir or Path(tempfile.mkdtemp(prefix="dashchat-peers-"))
    machine = machine_info()
    started = dt.datetime.now().astimezone()
    load_start = loadavg()
    print(f"{started:%Y-%m-%d %H:%M %Z} | {machine['cpu']}, {machine['cores']} cores, {machine['mem_gib']} GiB, "
          f"{' '.join(machine['simd'])} | load avg {load_start}\nmodel {gguf}\nbanned end tokens {ban}", flush=True)

    runs: list[tuple[str, list[str], str, str]] = []  # (row name, command, ready path, peer kind)
    peer_name = None
    if not args.skip_dashchat:
        for extra in args.dashchat_args or [""]:
            name = "dashchat" + (f" `{extra.strip()}`" if extra.strip() else "")
            cmd = [sys.executable, "-m", "dashchat.openai_server", "--model-path", str(gguf),
                   "--served-model-name", SERVED_NAME, "--host", "127.0.0.1", "--port", "{port}",
                   "--device", "cpu", "--threads", str(args.threads), "--max-model-len",
                   str(args.max_model_len), "--max-num-seqs", str(max(32, *args.concurrency)),
                   "--log-level", "warning", "--speculative-config", "off",  # as the peer: none unless asked
                   *shlex.split(extra)]
            runs.append((name, cmd, "/health", "dashchat"))
    if not args.skip_llama_server:
        server = ensure_llama_server(args.llama_server, not args.no_setup)
        slots = max(args.concurrency)
        name = f"llama-server ({llama_server_version(server)}, -np {slots})"
        cmd = [str(server), "-m", str(gguf), "--alias", SERVED_NAME, "--host", "127.0.0.1", "--port", "{port}",
               "-t", str(args.threads), "-tb", str(args.threads), "-np", str(slots),
               "-c", str(slots * args.max_model_len), "--cont-batching", "--no-webui",
               *shlex.split(args.llama_server_args)]
        runs.append((name, cmd, "/health", "llama-server"))
        peer_name = name
    if not args.skip_llamacpp:
        python = ensure_llamacpp(args.llamacpp_venv, not args.no_setup)
        llamacpp_name = f"llama.cpp server (llama-cpp-python {llamacpp_version(python)})"
        peer_name = peer_name or llamacpp_name
        cmd = [str(python), "-m", "llama_cpp.server", "--model", str(gguf), "--model_alias", SERVED_NAME,
               "--host", "127.0.0.1", "--port", "{port}", "--n_threads", str(args.threads),
               "--n_threads_batch", str(args.threads), "--n_ctx", str(args.max_model_len),
               "--interrupt_requests", "False", "--verbose", "False", *shlex.split(args.llamacpp_args)]
        runs.append((llamacpp_name, cmd, "/v1/models", "llamacpp"))

    per_round: dict[str, list[dict]] = {name: [] for name, *_ in runs}
    try:
        for rnd in range(args.rounds):
            if args.rounds > 1:
                print(f"\n-- round {rnd + 1}/{args.rounds}", flush=True)
            for name, cmd, ready, peer in runs:
                per_round[name].append(run_server(name, cmd, ready, peer, args, ban, logdir))
    except KeyboardInterrupt:
        print("\ninterrupted: servers stopped", file=sys.stderr)
        return 130
    finally:
        ServerProcess.stop_all()

    results: dict[str, dict] = {}
    for name, rows in per_round.items():
        merged = dict(rows[-1])
        for key in ["ttft_ms", "decode_tok_s"] + [f"agg_tok_s_c{c}" for c in args.concurrency]:
            merged[key] = median([r[key] for r in rows])
        merged["ttft_ms_all"] = [t for r in rows for t in r["ttft_ms_all"]]
        merged["decode_tok_s_all"] = [t for r in rows for t in r["decode_tok_s_all"]]
        merged["token_source"] = sorted({s for r in rows for s in r["token_source"]})
        merged["rounds"] = rows
        results[name] = merged

    prompt_tokens = sorted({r["prompt_tokens"] for r in results.values()})
    header = (f"{started:%Y-%m-%d} · {machine['cpu']} ({machine['arch']}, {machine['cores']} cores, "
              f"{' '.join(machine['simd']) or 'no AVX'}), {machine['mem_gib']} GiB · load avg {load_start} "
              f"at start, {loadavg()} at end\n\n"
              f"{gguf.name} · prompt {'/'.join(map(str, prompt_tokens))} tokens · {args.max_tokens} completion "
              f"tokens per request (end tokens banned, greedy) · {args.requests} single-stream requests, "
              f"closed loop of max(c, {args.requests}) requests at each concurrency c · {args.threads} threads"
              + (f" · medians over {args.rounds} alternating rounds" if args.rounds > 1 else ""))
    print("\n" + header + "\n\n" + table(results, args.concurrency, peer_name))
    for name, r in results.items():
        print(f"\n{name}: {r['command']}\n  tokens counted from {', '.join(r['token_source'])}; "
              f"RSS after {r['rss_mb']:.0f} MiB; TTFTs ms {r['ttft_ms_all']}; decode tok/s {r['decode_tok_s_all']}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"date": started.isoformat(), "machine": machine, "model": str(gguf),
                                         "load_avg": [load_start, loadavg()], "args": {
                                             k: str(v) for k, v in vars(args).items()}, "results": results},
                                        indent=2, default=str))
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
