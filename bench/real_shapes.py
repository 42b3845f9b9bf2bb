"""dashchat against llama.cpp's llama-server on GGUFs of the sizes people serve (1.5B-8B).

Random-weight GGUFs with the tensor shapes of real models (random weights cost the same per token
as trained ones) and the Qwen tokenizer (taken from the embedded Qwen GGUF):

  qwen2.5-1.5b   hidden 1536, 28 layers, 12/2 heads, FFN 8960, tied output head
  qwen2.5-3b     hidden 2048, 36 layers, 16/2 heads, FFN 11008, tied output head
  qwen2.5-7b     hidden 3584, 28 layers, 28/4 heads, FFN 18944
  llama3.1-8b    Llama-3.1-8B's layers: hidden 4096, 32 layers, 32/8 heads, head_dim 128, FFN 14336
                 (Qwen2 architecture and tokenizer: no Llama tokenizer can be downloaded here)

Q8_0, Q4_0, Q6_K and Q4_K_M files are written block by block with the `gguf` package (random bytes
with finite fp16 scales are valid blocks; Q4_K_M mixes Q4_K and Q6_K tensors by llama.cpp's own
rule); other types (Q5_K_M, Q3_K_M, IQ4_XS, ...) are made from a Q8_0 file by llama.cpp's
`llama-quantize`. Files are made on demand in --workdir and deleted after their runs.

Each file is served by one server at a time, alternating over --rounds: dashchat with default
flags (`--max-model-len` per sequence, --threads), and llama-server with `-np` = the highest
concurrency, `-c` = slots x --max-model-len, `-t/-tb` = --threads. Every request is greedy with its
end tokens banned (bench/peers.py's requests), so answers run to max_tokens. Measured:

  ttft_short/long  median time to first token at ~--short-prompt and ~--long-prompt tokens
  decode           one-stream tok/s (median of --requests streams)
  c8, c32          aggregate tok/s of a closed loop of c clients
  rss_mb           resident memory of all the server's processes after the runs
  decode_t1        one-stream tok/s with 1 thread (a second server start; --no-thread-sweep skips it)

and this machine's read bandwidth (all cores summing a 1 GiB buffer) in the same run: one-stream
decode is printed as a fraction of it, counting the bytes a token reads (every linear weight and the
output head). Results go to --json after every measurement; a second run with the same --json skips
what is there (resumable).

    python bench/real_shapes.py --shapes qwen2.5-1.5b qwen2.5-3b --types Q4_K_M Q4_0
    LLAMA_CPP_BIN=/work/llama-build/build/bin python bench/real_shapes.py --shapes qwen2.5-7b --rounds 2
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import numpy as np  # noqa: E402
from load_common import ServerProcess, closed_loop, free_port, http_client, loadavg, machine_info, stream_chat  # noqa: E402
from peers import SERVED_NAME, end_token_ids, llama_server_version, request_body  # noqa: E402
from gguf_blocks import block_layout, random_blocks  # noqa: E402


@dataclass(frozen=True)
class Shape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    ffn: int
    tied: bool
    head_dim: int = 128


SHAPES = {
    "qwen2.5-1.5b": Shape(1536, 28, 12, 2, 8960, tied=True),
    "qwen2.5-3b": Shape(2048, 36, 16, 2, 11008, tied=True),
    "qwen2.5-7b": Shape(3584, 28, 28, 4, 18944, tied=False),
    "llama3.1-8b": Shape(4096, 32, 32, 8, 14336, tied=False),
}
DIRECT = ("Q8_0", "Q4_0", "Q6_K", "Q4_K_M")  # written here; the others go through llama-quantize
FILE_TYPES = {"Q8_0": 7, "Q4_0": 2, "Q6_K": 18, "Q4_K_M": 15}  # general.file_type (llama_ftype)
# block layout: (values, bytes, offsets of fp16 scales, fp16 scale that gives weights of std ~0.02)
# the float16 scale of each type's blocks: weights of about the size trained ones have
SCALES = {"Q8_0": 3e-4, "Q4_0": 4e-3, "Q4_K": 1.4e-4, "Q6_K": 2e-5}


def tensors(shape: Shape, vocab: int) -> list[tuple[str, int, int]]:
    """(name, rows, cols) of every tensor; cols 0: a 1-D float tensor of `rows` values."""
    h, q, kv = shape.hidden, shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    out = [("token_embd.weight", vocab, h)]
    for i in range(shape.layers):
        b = f"blk.{i}."
        out += [(b + "attn_norm.weight", h, 0), (b + "attn_q.weight", q, h), (b + "attn_q.bias", q, 0),
                (b + "attn_k.weight", kv, h), (b + "attn_k.bias", kv, 0), (b + "attn_v.weight", kv, h),
                (b + "attn_v.bias", kv, 0), (b + "attn_output.weight", h, q), (b + "ffn_norm.weight", h, 0),
                (b + "ffn_gate.weight", shape.ffn, h), (b + "ffn_up.weight", shape.ffn, h),
                (b + "ffn_down.weight", h, shape.ffn)]
    out.append(("output_norm.weight", h, 0))
    if not shape.tied:
        out.append(("output.weight", vocab, h))
    return out


def block_type(ftype: str, name: str, layers: int, tied: bool) -> str:
    """The block type of a weight in a file of `ftype` (Q4_K_M: llama.cpp's llama_tensor_get_type:
    attn_v and ffn_down take Q6_K in the first and last eighth of the layers and every third between,
    the output head (a tied embedding too) Q6_K; the rest Q4_K)."""
    if ftype != "Q4_K_M":
        return ftype
    if name == "output.weight" or (name == "token_embd.weight" and tied):  # the output head
        return "Q6_K"
    if name.endswith(("attn_v.weight", "ffn_down.weight")):
        i = int(name.split(".")[1])
        more_bits = i < layers // 8 or i >= 7 * layers // 8 or (i - layers // 8) % 3 == 2
        return "Q6_K" if more_bits else "Q4_K"
    return "Q4_K"


def write_gguf(path: Path, shape: Shape, ftype: str, source: Path, seed: int = 0) -> int:
    """A random-weight GGUF of `shape` whose weights are `ftype` blocks; metadata and tokenizer from
    `source`. Returns the bytes a decoded token reads (every linear weight and the output head)."""
    import gguf

    reader = gguf.GGUFReader(str(source))
    vocab = len(reader.fields["tokenizer.ggml.tokens"].contents())
    writer = gguf.GGUFWriter(str(path), "qwen2")
    own = {"block_count": shape.layers, "context_length": 32768, "embedding_length": shape.hidden,
           "feed_forward_length": shape.ffn, "attention.head_count": shape.heads,
           "attention.head_count_kv": shape.kv_heads}
    for key, value in own.items():
        writer.add_uint32(f"qwen2.{key}", value)
    writer.add_uint32("general.file_type", FILE_TYPES[ftype])
    writer.add_string("general.name", f"random {path.stem}")
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key in ("general.architecture", "general.file_type", "general.name") or (
                key.startswith("qwen2.") and key.removeprefix("qwen2.") in own):
            continue
        sub = field.types[1] if len(field.types) > 1 else None
        writer.add_key_value(key, field.contents(), field.types[0], sub)
    layout = tensors(shape, vocab)
    read = 0
    for name, rows, cols in layout:
        if cols == 0:
            writer.add_tensor_info(name, (rows,), np.dtype(np.float32), 4 * rows)
            continue
        t = block_type(ftype, name, shape.layers, shape.tied)
        per, nbytes = block_layout(t)
        size = rows * cols // per * nbytes
        writer.add_tensor_info(name, (rows, cols // per * nbytes), np.dtype(np.uint8), size,
                               raw_dtype=gguf.GGMLQuantizationType[t])
        if name != "token_embd.weight" or shape.tied:
            read += size
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    rng = np.random.default_rng(seed)
    for name, rows, cols in layout:
        if cols == 0:
            writer.write_tensor_data(np.ones(rows, np.float32) if name.endswith("norm.weight")
                                     else np.zeros(rows, np.float32))
        else:
            t = block_type(ftype, name, shape.layers, shape.tied)
            writer.write_tensor_data(random_blocks(rng, t, rows, cols, SCALES[t]))
    writer.close()
    return read


def weight_bytes(path: Path) -> int:
    """Bytes of every linear weight and the output head (the tied embedding where there is no
    output.weight) of a GGUF file."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    sizes = {t.name: int(t.n_bytes) for t in reader.tensors if len(t.shape) == 2}
    if "output.weight" in sizes:
        sizes.pop("token_embd.weight", None)
    return sum(sizes.values())


def make_file(workdir: Path, shape_name: str, ftype: str, source: Path, quantize: Path) -> Path:
    path = workdir / f"{shape_name}-{ftype}.gguf"
    if path.exists():
        return path
    shape = SHAPES[shape_name]
    tmp = path.with_suffix(".part")
    t0 = time.perf_counter()
    if ftype in DIRECT:
        write_gguf(tmp, shape, ftype, source)
    else:
        base = workdir / f"{shape_name}-Q8_0.base.gguf"
        try:
            write_gguf(base, shape, "Q8_0", source)
            subprocess.run([str(quantize), "--allow-requantize", str(base), str(tmp), ftype], check=True,
                           stdout=subprocess.DEVNULL)
        finally:
            base.unlink(missing_ok=True)
    os.replace(tmp, path)
    print(f"made {path.name} ({path.stat().st_size / 1e9:.2f} GB) in {time.perf_counter() - t0:.0f} s", flush=True)
    return path


# common English words, one token each (with their leading space) in the Qwen tokenizer
WORDS = ("the river stone house green water light small table window garden music paper winter summer "
         "market letter friend school street morning evening bread honey silver forest island mountain "
         "orange yellow purple circle square simple quiet little famous modern ancient golden").split()


def prompt_body(i: int, tokens: int, max_tokens: int, ban: list[int], peer: str) -> dict[str, Any]:
    """A request whose prompt is about `tokens` tokens long (the chat template and system message
    included), unique from its first words on so no prefix cache shortens it."""
    body = request_body(i, max_tokens, ban, peer)
    words = max(1, tokens - 40)
    filler = " ".join(WORDS[(i * 7 + j * (1 + i % 5)) % len(WORDS)] for j in range(words))
    body["messages"][1]["content"] = f"{i} {filler}"
    return body


async def measure(base_url: str, peer: str, args: argparse.Namespace, ban: list[int], full: bool) -> dict[str, Any]:
    out: dict[str, Any] = {}
    counter = iter(range(10**9))
    async with http_client(base_url, max(args.concurrency), args.request_timeout) as client:
        async def one(max_tokens: int, words: int = 0):
            i = next(counter) + 1
            body = prompt_body(i, words, max_tokens, ban, peer) if words else request_body(i, max_tokens, ban, peer)
            res = await stream_chat(client, body)
            if not res.ok:
                raise RuntimeError(f"{peer}: request failed: {res.error}")
            return res

        await one(args.max_tokens)  # warm-up
        rates = []
        for _ in range(args.requests):
            res = await one(args.max_tokens)
            n, _ = res.completion_tokens(args.max_tokens)
            if n > 1 and res.t_last > res.t_first:
                rates.append((n - 1) / (res.t_last - res.t_first))
        out["decode"] = statistics.median(rates)
        if not full:
            return out
        for key, words in (("ttft_short", args.short_prompt), ("ttft_long", args.long_prompt)):
            r = await client.post("/v1/chat/completions",
                                  json={**prompt_body(0, words, 1, ban, peer), "stream": False})
            r.raise_for_status()
            out[key.replace("ttft", "prompt")] = r.json()["usage"]["prompt_tokens"]
            out[key] = statistics.median([(await one(2, words)).ttft for _ in range(args.ttft_requests)]) * 1000
        for c in args.concurrency:
            await closed_loop(c, c, lambda i: one(4))  # warm the batch sizes
            results, wall = await closed_loop(c, c, lambda i: one(args.max_tokens))
            out[f"c{c}"] = sum(r.completion_tokens(args.max_tokens)[0] for r in results) / wall
    return out


def serve_and_measure(peer: str, gguf: Path, threads: int, args: argparse.Namespace, ban: list[int],
                      full: bool) -> dict[str, Any]:
    slots = max(args.concurrency)
    if peer == "dashchat":
        cmd = [sys.executable, "-m", "dashchat.openai_server", "--model-path", str(gguf), "--served-model-name",
               SERVED_NAME, "--host", "127.0.0.1", "--port", "{port}", "--threads", str(threads),
               "--max-model-len", str(args.max_model_len), "--max-num-seqs", str(slots), "--log-level", "warning",
               "--speculative-config", "off"]  # compared without speculation, as llama-server runs here
    else:
        cmd = [str(args.llama_bin / "llama-server"), "-m", str(gguf), "--alias", SERVED_NAME, "--host", "127.0.0.1",
               "--port", "{port}", "-t", str(threads), "-tb", str(threads), "-np", str(slots),
               "-c", str(slots * args.max_model_len), "--cont-batching", "--no-webui"]
    port = free_port()
    cmd = [a.replace("{port}", str(port)) for a in cmd]
    srv = ServerProcess(peer, cmd, port, args.workdir / f"{peer}-{port}.log", ready_path="/health",
                        start_timeout=args.start_timeout)
    try:
        srv.start()
        res = asyncio.run(measure(srv.base_url, peer, args, ban, full))
        res["rss_mb"] = round(srv.rss_mb(), 1)
    finally:
        srv.stop()
    return res


def read_bandwidth() -> float:
    """GB/s of every core summing a 1 GiB buffer (far larger than the caches)."""
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    buf = torch.ones(1 << 28, dtype=torch.float32)
    buf.sum()
    times = []
    for _ in range(7):
        t = time.perf_counter()
        buf.sum()
        times.append(time.perf_counter() - t)
    return buf.numel() * 4 / statistics.median(times) / 1e9


def report(results: dict[str, Any], bandwidth: list[float], concurrency: list[int]) -> str:
    bw = statistics.median(bandwidth) if bandwidth else float("nan")
    keys = ["decode", *(f"c{c}" for c in concurrency), "ttft_short", "ttft_long", "rss_mb", "decode_t1"]
    lines = [f"read bandwidth {bw:.1f} GB/s (median of {len(bandwidth)})", "",
             "| file | server | 1 stream | " + " | ".join(f"c{c}" for c in concurrency)
             + " | TTFT short ms | TTFT long ms | RSS MiB | 1 stream, 1 thread | GB/s a stream (% of read bw) |",
             "|---|---|" + "---:|" * (len(keys) + 1)]
    for fname, entry in results.items():
        meds = {}
        for peer in ("dashchat", "llama-server"):
            runs = entry.get(peer, [])
            meds[peer] = {k: statistics.median([r[k] for r in runs if k in r]) for k in keys
                          if any(k in r for r in runs)}
            m = meds[peer]
            if not m:
                continue
            gbs = m.get("decode", 0) * entry["bytes"] / 1e9
            cells = [f"{m[k]:.1f}" if k in m else "-" for k in keys]
            lines.append(f"| {fname} | {peer} | " + " | ".join(cells) + f" | {gbs:.1f} ({100 * gbs / bw:.0f}%) |")
        a, b = meds.get("dashchat"), meds.get("llama-server")
        if a and b:
            ratio = [f"{a[k] / b[k]:.2f}x" if k in a and k in b and b[k] else "-" for k in keys]
            lines.append(f"| {fname} | **ratio** | " + " | ".join(ratio) + " | |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=["qwen2.5-1.5b", "qwen2.5-3b"], choices=sorted(SHAPES))
    ap.add_argument("--types", nargs="+", default=["Q4_K_M", "Q4_0"])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--requests", type=int, default=3, help="one-stream requests (median)")
    ap.add_argument("--ttft-requests", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--concurrency", type=lambda s: [int(c) for c in s.split(",")], default=[8, 32])
    ap.add_argument("--short-prompt", type=int, default=128, help="~tokens of the short TTFT prompt")
    ap.add_argument("--long-prompt", type=int, default=1500, help="~tokens of the long TTFT prompt")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--no-thread-sweep", action="store_true", help="skip the one-thread one-stream runs")
    ap.add_argument("--decode-only", action="store_true",
                    help="measure one-stream decode and RSS only (no TTFT, no concurrency): a quick sweep of types")
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--peers", nargs="+", default=["dashchat", "llama-server"])
    ap.add_argument("--llama-bin", type=Path,
                    default=Path(os.environ.get("LLAMA_CPP_BIN", HERE / ".llama-server" / "bin")),
                    help="folder with llama-server and llama-quantize (env LLAMA_CPP_BIN)")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/dashchat-real-shapes"),
                    help="where the GGUF files are made (and deleted after)")
    ap.add_argument("--keep-files", action="store_true")
    ap.add_argument("--json", type=Path, default=HERE / "results" / "real_shapes.json")
    ap.add_argument("--request-timeout", type=float, default=1200.0)
    ap.add_argument("--start-timeout", type=float, default=900.0)
    args = ap.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    from dashchat.models.embedded import embedded_gguf

    source = embedded_gguf("qwen2.5-coder-0.5b-instruct")
    state: dict[str, Any] = json.loads(args.json.read_text()) if args.json.exists() else {}
    state.setdefault("results", {})
    state.setdefault("bandwidth", [])
    state.setdefault("started", dt.datetime.now().astimezone().isoformat())
    state["machine"] = machine_info()
    if "llama-server" in args.peers:
        state["llama_server"] = llama_server_version(args.llama_bin / "llama-server")

    def save() -> None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(state, indent=1))

    print(f"{state['machine']['cpu']}, {state['machine']['cores']} cores | load avg {loadavg()} | "
          f"llama-server {state.get('llama_server', '-')}", flush=True)
    try:
        for shape_name in args.shapes:
            for ftype in args.types:
                fname = f"{shape_name}-{ftype}"
                entry = state["results"].setdefault(fname, {})
                plan = [(rnd, peer, threads) for rnd in range(args.rounds) for peer in args.peers
                        for threads in ([args.threads] + ([] if args.no_thread_sweep or args.threads == 1 else [1]))]
                todo = [p for p in plan if not any(
                    r["round"] == p[0] and r["threads"] == p[2] for r in entry.get(p[1], []))]
                if not todo:
                    continue
                path = make_file(args.workdir, shape_name, ftype, source, args.llama_bin / "llama-quantize")
                entry["bytes"] = weight_bytes(path)
                entry["file_gb"] = round(path.stat().st_size / 1e9, 3)
                ban = end_token_ids(path)
                for rnd, peer, threads in todo:
                    state["bandwidth"].append(round(read_bandwidth(), 2))
                    print(f"{fname} round {rnd + 1} {peer} -t {threads} (load avg {loadavg()})", flush=True)
                    res = serve_and_measure(peer, path, threads, args, ban,
                                            full=threads == args.threads and not args.decode_only)
                    if threads != args.threads:
                        res = {"decode_t1": res["decode"]}
                    res.update(round=rnd, threads=threads, load=loadavg())
                    entry.setdefault(peer, []).append(res)
                    print(f"   {res}", flush=True)
                    save()
                if not args.keep_files:
                    path.unlink()
    finally:
        ServerProcess.stop_all()
        save()
    print("\n" + report(state["results"], state["bandwidth"], args.concurrency))
    return 0


if __name__ == "__main__":
    sys.exit(main())
