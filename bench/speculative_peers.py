"""Speculative decoding over HTTP: dashchat with and without it against llama-server with each of its
n-gram `--spec-type` modes and none, the same GGUF, the same requests, one stream.

Servers, one resident at a time, restarted every round (so neither keeps n-gram state from an earlier
round), the order reversed every other round, medians over rounds:

  dashchat                 default flags (`--speculative-config auto`: n-gram lookup on the CPU GGUF path)
  dashchat off             `--speculative-config off`
  llama-server none        `--spec-type none`
  llama-server <type>      `--spec-type <type>` with its own defaults, for ngram-simple, ngram-mod,
                           ngram-map-k, ngram-map-k4v, ngram-cache

All with --threads (-t/-tb for llama-server), one slot (-np 1), an explicit context (-c / --max-model-len).
Requests (greedy, temperature 0, streamed):

  edit     bench/speculative.py's code-editing requests: ~60 lines of Python and a small change
           asked for, the whole file back (300+ tokens)
  summary  a ~1,500-token report, summarised section by section quoting a sentence of each

Per request: decode tok/s = (completion tokens - 1) / (last content chunk - first), the time to the
first chunk, and the speculation counters of that request: proposed and accepted tokens (dashchat:
/metrics before and after; llama-server: `timings.draft_n` / `draft_n_accepted` of its last chunk).
Tokens per forward pass = decode tokens / decode steps, a step yielding one token plus the proposals
it accepted: (n - 1) / (n - 1 - accepted).

    flock /work/bench.lock python bench/speculative_peers.py --rounds 2
    python bench/speculative_peers.py --servers dashchat "dashchat off" --cases summary --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import re
import shlex
import signal
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import httpx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from load_common import ServerProcess, free_port, http_client, loadavg, machine_info  # noqa: E402
from peers import SERVED_NAME, llama_server_version  # noqa: E402
from speculative import CODE, EDITS  # noqa: E402

SPEC_TYPES = ("ngram-simple", "ngram-mod", "ngram-map-k", "ngram-map-k4v", "ngram-cache")
SERVERS = ("dashchat", "dashchat off", "llama-server none", *(f"llama-server {t}" for t in SPEC_TYPES))

DOC = """Harbor Street Water Main Replacement: Project Review

1. Background
The water main under Harbor Street was laid in 1931 and had burst eleven times in the five years before the project began. Each burst closed the street for at least two days and cut water to the fish market, the ferry terminal and about four hundred homes. The city council approved the replacement in March, with a budget of 4.2 million and a deadline of the end of November, before the winter storms make excavation near the harbour unsafe. The work covered 1.8 kilometres of pipe, from the junction with Mill Road to the pumping station at the north pier.

2. Planning and design
The design team chose ductile iron pipe with a diameter of 400 millimetres, replacing the old 300 millimetre cast iron main. The larger pipe allows for the new housing planned on the former rail yard, which the water company expects to add about six hundred connections within ten years. The team considered trenchless methods, but the survey found that the old main ran under a layer of rubble from the 1940s harbour wall, which would have deflected a drilling head. Open trenching was therefore used for the whole route, in sections of no more than eighty metres, so that no more than one block of the street was closed at any time.

3. Traffic and access
Harbor Street carries about nine thousand vehicles a day, and the ferry terminal depends on it for freight. The traffic plan kept one lane open in each direction for the whole project, with a temporary signal at each open section. Deliveries to the fish market were moved to the early morning, between four and seven, when the street is quiet. The bus route was diverted along Quay Lane for fourteen weeks. Complaints about noise were most frequent in July, when night work was needed near the terminal; after a meeting with residents the contractor stopped all work after ten in the evening, except for two nights when a connection could not be interrupted.

4. Schedule
Work started on the fourth of April and the last section was connected on the twenty-second of October, five weeks ahead of the deadline. The schedule slipped twice. In May, an unrecorded gas line was found crossing the trench near Mill Road, and work in that section stopped for nine days while the gas company moved it. In August, a week of heavy rain flooded two open sections, and the pumps hired for the project could not keep up; the contractor brought in two larger pumps and the lost time was recovered by working Saturdays in September.

5. Costs
The final cost was 3.9 million, about 300 thousand below the budget. Pipe and fittings cost less than estimated because the order was placed in January, before a price rise in the spring. The largest overrun was the gas line in May, which added 120 thousand for the delay and the extra excavation. The flood in August added 45 thousand for the larger pumps and the weekend work. The contingency of 400 thousand was used only in part, and the remainder will be returned to the capital fund.

6. Water quality and service
Water was cut to each property for no more than six hours at a time, and every cut was announced at least two days in advance by letter and by text message. Temporary overground pipes supplied the fish market during its own connection, so that it never lost water during trading hours. After each section was connected, the new pipe was flushed and disinfected, and samples were taken at three points; all samples met the drinking water standard on the first test except one in June, which passed on the second test after a further flush.

7. Safety
There were no serious injuries during the project. Two minor incidents were reported: a worker sprained an ankle stepping into a trench in poor light, and a cyclist fell when a temporary ramp at a road plate was displaced. After the second incident the contractor added a daily check of all plates and ramps at the start of each shift, and no further incidents occurred. Lighting at open trenches was also improved after the first incident.

8. Lessons learned
The project team identified three lessons for future work. First, the records of buried services were incomplete, and a ground radar survey of the whole route before the design would have found the gas line and avoided the delay in May. Second, the pumps should be sized for the worst week of rain in recent years, not for the average, since the cost of larger pumps is small compared with the cost of flooded sections. Third, the early meeting with residents and market traders reduced complaints and should be held before every project of this size, not only after the complaints begin.

9. Next steps
The old cast iron main has been left in the ground and filled with grout, which is cheaper and less disruptive than removing it. The road surface over the trench will be resurfaced in the spring, once the backfill has settled. The water company will monitor pressure and leakage on the new main for twelve months and report to the council in the autumn. A similar replacement is planned for Quay Lane in two years, and the team recommends that it start with the ground radar survey described above.
"""

SUMMARY = ("Here is a project report:\n\n" + DOC + "\nSummarise this report section by section. For each of the "
           "nine sections, give its title, then quote its most important sentence word for word, then say in "
           "one sentence why it matters.")


def cases(names: list[str]) -> list[tuple[str, str]]:
    """(case name, user message) of every request a server gets in a round."""
    out = []
    if "edit" in names:
        out += [(f"edit{i}", f"Here is my Python file:\n```python\n{CODE}```\n{change}, and give me the whole "
                             "file back.") for i, change in enumerate(EDITS)]
    if "summary" in names:
        out.append(("summary", SUMMARY))
    return out


async def stream(client: httpx.AsyncClient, body: dict[str, Any]) -> dict[str, Any]:
    """`stream_once`, sent again once on a kept-alive connection the server had closed (llama-server
    closes them now and then: the request never reached it)."""
    try:
        return await stream_once(client, body)
    except httpx.RemoteProtocolError:
        return await stream_once(client, body)


async def stream_once(client: httpx.AsyncClient, body: dict[str, Any]) -> dict[str, Any]:
    """One streamed chat completion: times of the first and last content chunk, usage, timings."""
    t0 = time.perf_counter()
    first = last = None
    text, chunks, usage, timings = "", 0, None, None
    async with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:300]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data:") or line[5:].strip() == "[DONE]":
                continue
            chunk = json.loads(line[5:])
            now = time.perf_counter()
            usage = chunk.get("usage") or usage
            timings = chunk.get("timings") or timings
            for choice in chunk.get("choices") or []:
                piece = (choice.get("delta") or {}).get("content")
                if piece:
                    chunks += 1
                    text += piece
                    first = first or now
                    last = now
    n = (usage or {}).get("completion_tokens") or (timings or {}).get("predicted_n") or chunks
    return {"tokens": n, "ttft_s": (first or last or t0) - t0, "decode_s": (last or t0) - (first or t0),
            "text": text, "timings": timings}


_SPEC = re.compile(r"^dashchat_spec_decode_num_(draft_tokens|accepted_tokens)(?:_total)? (\S+)$", re.M)


async def spec_counters(client: httpx.AsyncClient) -> dict[str, float]:
    r = await client.get("/metrics")
    return {k: float(v) for k, v in _SPEC.findall(r.text)}


async def measure(base_url: str, peer: str, requests: list[tuple[str, str]], max_tokens: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    async with http_client(base_url, 1, 900.0) as client:
        def body(user: str, n: int) -> dict[str, Any]:
            b = {"model": SERVED_NAME, "messages": [{"role": "user", "content": user}], "max_tokens": n,
                 "temperature": 0.0, "top_p": 1.0, "stream_options": {"include_usage": True}}
            if peer == "llama-server":
                b.update(top_k=0, min_p=0.0, repeat_penalty=1.0)
            return b

        await stream(client, body("Say hello.", 8))  # warm-up, nothing to copy from later
        for name, user in requests:
            before = await spec_counters(client) if peer == "dashchat" else {}
            res = await stream(client, body(user, max_tokens))
            n = res["tokens"]
            if peer == "dashchat":
                after = await spec_counters(client)
                proposed = after.get("draft_tokens", 0) - before.get("draft_tokens", 0)
                accepted = after.get("accepted_tokens", 0) - before.get("accepted_tokens", 0)
            else:
                t = res["timings"] or {}
                proposed, accepted = t.get("draft_n", 0), t.get("draft_n_accepted", 0)
            out[name] = {"tokens": n, "tok_s": (n - 1) / res["decode_s"] if res["decode_s"] > 0 else float("nan"),
                         "ttft_s": res["ttft_s"], "proposed": proposed, "accepted": accepted,
                         "tokens_per_pass": (n - 1) / max(1, n - 1 - accepted), "text_head": res["text"][:80]}
            print(f"  {name}: {n} tokens, {out[name]['tok_s']:.1f} tok/s, proposed {proposed:.0f}, accepted "
                  f"{accepted:.0f}, {out[name]['tokens_per_pass']:.2f} tokens/pass", flush=True)
    return out


def command(server: str, gguf: Path, args: argparse.Namespace) -> tuple[list[str], str]:
    if server.startswith("dashchat"):
        cmd = [sys.executable, "-m", "dashchat.openai_server", "--model-path", str(gguf), "--served-model-name",
               SERVED_NAME, "--host", "127.0.0.1", "--port", "{port}", "--device", "cpu", "--threads",
               str(args.threads), "--max-model-len", str(args.ctx), "--log-level", "warning"]
        if server == "dashchat off":
            cmd += ["--speculative-config", "off"]
        return cmd + shlex.split(args.dashchat_args), "dashchat"
    spec = server.split()[1]
    return [str(args.llama_server), "-m", str(gguf), "--alias", SERVED_NAME, "--host", "127.0.0.1", "--port",
            "{port}", "-t", str(args.threads), "-tb", str(args.threads), "-np", "1", "-c", str(args.ctx),
            "--no-webui", "--spec-type", spec], "llama-server"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--gguf", type=Path, help="a .gguf file instead of the embedded model's")
    ap.add_argument("--servers", nargs="+", default=list(SERVERS), choices=SERVERS)
    ap.add_argument("--cases", nargs="+", default=["edit", "summary"], choices=["edit", "summary"])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ctx", type=int, default=4096, help="context of every server (one slot)")
    ap.add_argument("--max-tokens", type=int, default=700)
    ap.add_argument("--dashchat-args", default="", metavar="FLAGS", help="extra flags for both dashchat rows")
    ap.add_argument("--llama-server", type=Path,
                    default=Path(os.environ.get("LLAMA_CPP_BIN", HERE / ".llama-server" / "bin")) / "llama-server")
    ap.add_argument("--logdir", type=Path, default=Path("/tmp/speculative-peers"))
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    def on_term(*_: Any) -> None:  # a timeout's SIGTERM unwinds through the finally that stops the servers
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    if args.gguf is None:
        from dashchat.models.embedded import embedded_gguf

        args.gguf = embedded_gguf(args.model)
    gguf = args.gguf.resolve()
    requests = cases(args.cases)
    machine = machine_info()
    version = llama_server_version(args.llama_server) if any("llama" in s for s in args.servers) else None
    print(f"{dt.datetime.now():%Y-%m-%d %H:%M} | {machine['cpu']}, {machine['cores']} cores | load {loadavg()}\n"
          f"model {gguf}\nllama-server {version}", flush=True)
    runs: dict[str, list[dict]] = {s: [] for s in args.servers}
    try:
        for rnd in range(args.rounds):
            order = args.servers if rnd % 2 == 0 else list(reversed(args.servers))
            for server in order:
                cmd, peer = command(server, gguf, args)
                port = free_port()
                cmd = [a.replace("{port}", str(port)) for a in cmd]
                print(f"\n== round {rnd + 1}: {server}\n   {shlex.join(cmd)}", flush=True)
                try:
                    with ServerProcess(server, cmd, port, args.logdir / f"{server.replace(' ', '-')}-{port}.log"):
                        runs[server].append(asyncio.run(measure(f"http://127.0.0.1:{port}", peer, requests,
                                                                args.max_tokens)))
                except (RuntimeError, httpx.HTTPError) as exc:  # one server failing leaves the others' rows
                    print(f"   FAILED: {exc}", flush=True)
                if args.json:  # after every server: a run cut short keeps what it measured
                    args.json.parent.mkdir(parents=True, exist_ok=True)
                    args.json.write_text(json.dumps({
                        "date": dt.datetime.now().isoformat(), "machine": machine, "llama_server": version,
                        "model": str(gguf), "args": {k: str(v) for k, v in vars(args).items()},
                        "load": loadavg(), "results": summarise(runs, requests), "runs": runs}, indent=2, default=str))
    finally:
        ServerProcess.stop_all()
    print(f"\nload average at end {loadavg()}\n\n" + table(summarise(runs, requests), [n for n, _ in requests]))
    return 0


def summarise(runs: dict[str, list[dict]], requests: list[tuple[str, str]]) -> dict[str, dict]:
    """Per server and case: median tok/s over rounds; acceptance and tokens/pass over all its requests."""
    out: dict[str, dict] = {}
    for server, rounds in runs.items():
        if not rounds:
            continue
        row: dict[str, Any] = {}
        for kind in sorted({n.rstrip("0123456789") for n, _ in requests}):
            reqs = [r[n] for r in rounds for n in r if n.rstrip("0123456789") == kind]
            proposed, accepted = sum(r["proposed"] for r in reqs), sum(r["accepted"] for r in reqs)
            decode = sum(r["tokens"] - 1 for r in reqs)
            # one round's tok/s of a kind: its tokens over its decode time (the edits pooled)
            per_round = []
            for r in rounds:
                mine = [r[n] for n in r if n.rstrip("0123456789") == kind]
                per_round.append(sum(x["tokens"] - 1 for x in mine) / sum((x["tokens"] - 1) / x["tok_s"] for x in mine))
            row[kind] = {"tok_s": statistics.median(per_round), "tok_s_rounds": per_round,
                         "tokens": [r["tokens"] for r in reqs],
                         "acceptance": accepted / proposed if proposed else None,
                         "tokens_per_pass": decode / max(1, decode - accepted)}
        out[server] = row
    return out


def table(results: dict[str, dict], names: list[str]) -> str:
    kinds = sorted({n.rstrip("0123456789") for n in names})
    head = " | ".join(f"{k} tok/s | {k} accepted | {k} tokens/pass" for k in kinds)
    lines = [f"| server | {head} |", "|---|" + "---:|" * (3 * len(kinds))]
    for server, row in results.items():
        cells = []
        for k in kinds:
            c = row[k]
            acc = "-" if c["acceptance"] is None else f"{c['acceptance']:.0%}"
            cells.append(f"{c['tok_s']:.1f} | {acc} | {c['tokens_per_pass']:.2f}")
        lines.append(f"| {server} | " + " | ".join(cells) + " |")
    for k in kinds:
        spec = [s for s in results if s.startswith("llama-server") and s != "llama-server none"]
        best = max(spec, key=lambda s: results[s][k]["tok_s"], default=None)
        if "dashchat" in results and best:
            lines.append(f"\n{k}: dashchat / best llama-server ({best}) = "
                         f"{results['dashchat'][k]['tok_s'] / results[best][k]['tok_s']:.2f}x")
        if "dashchat" in results and "dashchat off" in results:
            lines.append(f"{k}: dashchat / dashchat off = "
                         f"{results['dashchat'][k]['tok_s'] / results['dashchat off'][k]['tok_s']:.2f}x")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
