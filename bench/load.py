"""Load test: 64 concurrent clients against a real server on 127.0.0.1, streaming and
not, mixed lengths, some hanging up mid-stream, for a fixed number of requests.

Checks every completed response is well-formed and complete, no 5xx, the KV cache returns to
empty; reports requests/s, p50/p99 time-to-first-token and latency, and the server's RSS
before and after.

    python bench/load.py [--requests 256] [--concurrency 64] [--model-path smollm2-135m-instruct]
    python bench/load.py --url http://127.0.0.1:8000 --model NAME   # an already running server
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "server"))
from server_proc import ServerProcess, wait_engine_idle


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def one(c: httpx.AsyncClient, model: str, i: int, rng: random.Random) -> dict[str, Any]:
    stream = rng.random() < 0.7
    hang_up = stream and rng.random() < 0.2
    body: dict[str, Any] = {
        "model": model, "stream": stream, "max_tokens": rng.choice([8, 16, 32, 64]),
        "messages": [{"role": "user", "content": f"#{i} " + "tell me about the sea " * rng.randint(1, 40)}],
    }
    t0 = time.perf_counter()
    if not stream:
        r = await c.post("/v1/chat/completions", json=body)
        out: dict[str, Any] = {"status": r.status_code, "latency": time.perf_counter() - t0}
        if r.status_code == 200:
            ch = r.json()["choices"][0]
            out["ok"] = ch["finish_reason"] in ("stop", "length") and isinstance(ch["message"]["content"], str)
            out["ttft"] = out["latency"]
        return out
    async with c.stream("POST", "/v1/chat/completions", json=body) as r:
        out = {"status": r.status_code}
        if r.status_code != 200:
            await r.aread()
            return out
        finish, done, n = None, False, 0
        async for line in r.aiter_lines():
            if not line:
                continue
            if line == "data: [DONE]":
                done = True
                break
            chunk = json.loads(line[6:])
            if "error" in chunk:
                out["error"] = chunk["error"]
                break
            n += 1
            if n == 2:
                out["ttft"] = time.perf_counter() - t0
            finish = chunk["choices"][0]["finish_reason"] or finish
            if hang_up and n == 4:
                out["hung_up"] = True
                return out
        out["latency"] = time.perf_counter() - t0
        out["ok"] = done and finish in ("stop", "length")
        return out


def pct(xs: list[float], q: float) -> float:
    return statistics.quantiles(xs, n=100)[q - 1] if len(xs) > 1 else (xs[0] if xs else float("nan"))


async def run(base_url: str, model: str, n: int, concurrency: int, seed: int) -> tuple[list[dict[str, Any]], float]:
    rng = random.Random(seed)
    sem = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=base_url, timeout=600, limits=limits) as c:
        async def guarded(i: int) -> dict[str, Any]:
            async with sem:
                return await one(c, model, i, rng)

        t0 = time.perf_counter()
        results = await asyncio.gather(*(guarded(i) for i in range(n)))
        return results, time.perf_counter() - t0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=256)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--model-path", default="smollm2-135m-instruct")
    p.add_argument("--url", default=None, help="use a running server instead of starting one")
    p.add_argument("--model", default=None, help="served name (with --url)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    srv = None
    if args.url is None:
        srv = ServerProcess("--model-path", args.model_path, "--device", "cpu", "--max-model-len", "1024",
                            "--max-num-seqs", "32", "--kv-cache-memory", "0.5", "--log-level", "warning").wait_ready()
        base = srv.base_url
    else:
        base = args.url
    try:
        model = args.model or httpx.get(f"{base}/v1/models").json()["data"][0]["id"]
        rss0 = rss_mb(srv.proc.pid) if srv else float("nan")
        results, elapsed = asyncio.run(run(base, model, args.requests, args.concurrency, args.seed))
        idle = wait_engine_idle(base, timeout=30)
        rss1 = rss_mb(srv.proc.pid) if srv else float("nan")
    finally:
        if srv:
            srv.stop()
    statuses: dict[int, int] = {}
    for r in results:
        statuses[r["status"]] = statuses.get(r["status"], 0) + 1
    completed = [r for r in results if r["status"] == 200 and not r.get("hung_up")]
    bad = [r for r in completed if not r.get("ok")]
    ttft = [r["ttft"] for r in results if "ttft" in r]
    lat = [r["latency"] for r in completed if "latency" in r]
    report = {
        "requests": len(results), "concurrency": args.concurrency, "seconds": round(elapsed, 1),
        "requests_per_s": round(len(results) / elapsed, 2), "statuses": statuses,
        "hung_up": sum(1 for r in results if r.get("hung_up")), "malformed_or_incomplete": len(bad),
        "ttft_p50_s": round(pct(ttft, 50), 3), "ttft_p99_s": round(pct(ttft, 99), 3),
        "latency_p50_s": round(pct(lat, 50), 3), "latency_p99_s": round(pct(lat, 99), 3),
        "engine_after": {"running_plus_waiting": idle[0], "kv_blocks_used": idle[1]},
        "server_rss_mb": {"before": round(rss0, 1), "after": round(rss1, 1)},
    }
    print(json.dumps(report, indent=1))
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    (out / "load.json").write_text(json.dumps(report, indent=1))
    failed = bad or any(s >= 500 for s in statuses) or idle != (0, 0)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
