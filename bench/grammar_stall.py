"""Does compiling a grammar stall other requests? (a compile on a shared executor could block everyone)

A real server (subprocess) streams one plain request; while it runs, requests with heavy, distinct
JSON schemas (response_format json_schema, ~1.5 s to compile each on a 2-core box, never cached)
arrive one after another. Reported: the gaps between the stream's tokens (longest, median, p99)
with the schemas arriving, against the same stream alone, and how long each schema request took.
Before the fix a schema compiled on the event loop, so every stream froze for the whole compile.

    python bench/grammar_stall.py [--model-path smollm2-135m-instruct] [--schemas 6] [--tokens 160] \\
        [--json bench/results/grammar_stall.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "server"))
from server_proc import ServerProcess


def heavy_schema(nonce: str, width: int = 12) -> dict[str, Any]:
    """Bounded strings, patterns, integer ranges, bounded arrays and enums: slow to compile; the nonce
    makes every schema new, so no cache helps."""
    props = {}
    for i in range(width):
        props[f"f_{nonce}_{i}"] = {
            "type": "object",
            "properties": {
                "name": {"type": "string", "minLength": 3, "maxLength": 40},
                "code": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{3,6}$"},
                "count": {"type": "integer", "minimum": -1000, "maximum": 100000},
                "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "minItems": 1, "maxItems": 8},
                "kind": {"enum": [f"k_{nonce}_{j}" for j in range(20)]},
            },
            "required": ["name", "code", "count", "tags", "kind"],
        }
    return {"type": "object", "properties": props, "required": list(props)}


async def stream_gaps(client: httpx.AsyncClient, model: str, tokens: int, started: asyncio.Event) -> list[float]:
    body = {"model": model, "messages": [{"role": "user", "content": "Tell a long story."}], "max_tokens": tokens,
            "ignore_eos": True, "stream": True, "temperature": 0}
    stamps: list[float] = []
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        async for line in r.aiter_lines():
            if line.startswith("data: {") and '"content":"' in line:
                stamps.append(time.perf_counter())
                if len(stamps) == 10:
                    started.set()
    return [b - a for a, b in zip(stamps, stamps[1:])]


async def schema_request(client: httpx.AsyncClient, model: str) -> float:
    nonce = uuid.uuid4().hex[:8]
    body = {"model": model, "messages": [{"role": "user", "content": "Fill in the record."}], "max_tokens": 8,
            "response_format": {"type": "json_schema", "json_schema": {"name": "r", "schema": heavy_schema(nonce)}}}
    t0 = time.perf_counter()
    r = await client.post("/v1/chat/completions", json=body)
    r.raise_for_status()
    return time.perf_counter() - t0


def summary(gaps: list[float]) -> dict[str, float]:
    s = sorted(gaps)
    return {"tokens": len(s) + 1, "max_gap_ms": round(s[-1] * 1000, 1),
            "median_gap_ms": round(statistics.median(s) * 1000, 1),
            "p99_gap_ms": round(s[min(len(s) - 1, int(len(s) * 0.99))] * 1000, 1)}


async def run(base_url: str, model: str, args: argparse.Namespace) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=base_url, timeout=600) as client:
        await schema_request(client, model)  # warm-up: the grammar backend indexes the vocabulary once
        alone = await stream_gaps(client, model, args.tokens, asyncio.Event())
        started = asyncio.Event()
        stream = asyncio.create_task(stream_gaps(client, model, args.tokens, started))
        await started.wait()
        latencies = []
        for _ in range(args.schemas):  # one after another: the stream is never without a compile
            latencies.append(await schema_request(client, model))
        with_schemas = await stream
    return {"alone": summary(alone), "with_schemas": summary(with_schemas),
            "schema_request_s": [round(x, 2) for x in latencies]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-path", default="smollm2-135m-instruct")
    ap.add_argument("--schemas", type=int, default=6)
    ap.add_argument("--tokens", type=int, default=160)
    ap.add_argument("--json", default=None, help="also write the result here")
    args = ap.parse_args()
    srv = ServerProcess("--model-path", args.model_path, "--device", "cpu", "--kv-cache-memory", "0.25",
                        "--max-model-len", "2048", "--served-model-name", "m",
                        # The bench measures stalls, not the compile deadline: let every compile finish.
                        "--grammar-compile-timeout", "600").wait_ready()
    try:
        result = asyncio.run(run(srv.base_url, "m", args))
    finally:
        srv.stop()
    result["model"] = args.model_path
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
