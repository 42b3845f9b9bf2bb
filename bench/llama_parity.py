"""dashchat's GGUF path against llama-server on the same tiny GGUF files: greedy tokens and top-5
log-probs, and the reference fixture CI checks (tests/data/llama_parity.json).

The files are the tests' tiny random checkpoints of each family (tests/llama_cpp.py: PARITY_FILES,
torch seed 0, SmolLM2's tokenizer) through llama.cpp's own converter, so CI rebuilds them byte for
byte. The files are built twice, each time in a fresh process, and must hash the same. Then per
file: dashchat loads it as `--quantization gguf` does and decodes greedily; llama-server decodes
the same token-id prompt with top-k 1 and reports its top log-probs. Prints where the tokens first
differ, the largest top-5 log-prob difference over the positions before, and the smallest top-2
margin (a near-tie, in the logits or in a router, is where the two may part).

    python bench/llama_parity.py --llama-server /path/to/llama-server [--write-fixture]

--write-fixture records llama-server's outputs, the files' sha256 and recipe in the fixture
(tests/engine/test_llama_parity.py checks dashchat against it).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent / "tests"))

from llama_cpp import PARITY_FILES, PARITY_FIXTURE, build_parity_ggufs, dashchat_greedy, recipe_versions  # noqa: E402

PROMPT = [5, 17, 42, 99, 7, 3, 250, 11, 64, 128, 200, 31, 8, 9, 10, 12, 13, 300]
TOP = 5


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def build_fresh(root: Path, families: list[str]) -> dict[str, Path]:
    """The files built by a new Python process (a seed or state leaking between builds shows up as
    a different hash)."""
    subprocess.run([sys.executable, __file__, "--build-only", str(root), "--families", *families], check=True)
    return {f: root / f"{f}-{PARITY_FILES[f]}.gguf" for f in families}


def server_greedy(binary: Path, path: Path, n: int, port: int) -> tuple[list[int], list[list[tuple[int, float]]]]:
    server = subprocess.Popen([str(binary), "-m", str(path), "--host", "127.0.0.1", "--port", str(port), "-t", "1",
                               "-c", "256", "--no-webui"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health")
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError(f"llama-server did not start on {path}")
                time.sleep(0.5)
        body = {"prompt": PROMPT, "n_predict": n, "temperature": 0, "n_probs": TOP, "ignore_eos": True,
                "samplers": ["top_k"], "top_k": 1, "cache_prompt": False}
        request = urllib.request.Request(f"http://127.0.0.1:{port}/completion", json.dumps(body).encode(),
                                         {"Content-Type": "application/json"})
        steps = json.loads(urllib.request.urlopen(request).read())["completion_probabilities"]
        return [s["id"] for s in steps], [[(t["id"], t["logprob"]) for t in s["top_logprobs"]] for s in steps]
    finally:
        server.terminate()
        server.wait()


def compare(ours: list[int], our_top: list, theirs: list[int], their_top: list) -> dict:
    """Where the greedy tokens first differ, and over the steps up to it (their inputs are the
    same): the largest |log-prob difference| of the tokens both top-5 lists hold, the largest
    difference in the margin between llama-server's top two tokens (what decides a near-tie), and
    the smallest such margin."""
    agree = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), len(ours))
    diff = margin_diff = 0.0
    for mine, ref in zip(our_top[: agree + 1], their_top[: agree + 1]):
        mine_d, ref_d = dict(mine), dict(ref)
        diff = max([diff] + [abs(lp - ref_d[t]) for t, lp in mine if t in ref_d])
        (a, _), (b, _) = ref[0], ref[1]
        if b in mine_d:
            margin_diff = max(margin_diff, abs((mine_d[a] - mine_d[b]) - (ref_d[a] - ref_d[b])))
    margins = [s[0][1] - s[1][1] for s in their_top]
    return {"agree": agree, "max_logprob_diff": diff, "max_margin_diff": margin_diff,
            "min_margin": min(margins[: agree + 1])}


def dump_fixture(fixture: dict) -> str:
    """JSON with one line per file's token list and per step of its top log-probs: short, and a
    rerun's diff reads step by step."""
    lines = ["{"] + [f" {json.dumps(k)}: {json.dumps(v)}," for k, v in fixture.items() if k != "files"]
    lines.append(' "files": {')
    for n, (family, entry) in enumerate(fixture["files"].items()):
        lines.append(f"  {json.dumps(family)}: {{")
        lines += [f"   {json.dumps(k)}: {json.dumps(v)}," for k, v in entry.items() if k != "top_logprobs"]
        steps = [f"    {json.dumps(step)}" for step in entry["top_logprobs"]]
        lines += ['   "top_logprobs": ['] + [",\n".join(steps)] + ["   ]"]
        lines.append("  }," if n + 1 < len(fixture["files"]) else "  }")
    return "\n".join(lines + [" }", "}"]) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--families", nargs="+", default=list(PARITY_FILES), choices=list(PARITY_FILES))
    ap.add_argument("--tokens", type=int, default=12)
    ap.add_argument("--llama-server", type=Path, default=HERE / ".llama-server" / "bin" / "llama-server")
    ap.add_argument("--port", type=int, default=18232)
    ap.add_argument("--write-fixture", action="store_true")
    ap.add_argument("--build-only", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.build_only:
        build_parity_ggufs(args.build_only, args.families)
        return 0
    work = Path(tempfile.mkdtemp(prefix="dashchat-llama-parity-"))
    first, second = build_fresh(work / "a", args.families), build_fresh(work / "b", args.families)
    hashes = {f: sha256(p) for f, p in first.items()}
    unstable = [f for f in args.families if sha256(second[f]) != hashes[f]]
    if unstable:
        print(f"not reproducible (two builds differ): {unstable}")
        return 1
    version = subprocess.run([str(args.llama_server), "--version"], capture_output=True, text=True)
    version = " ".join((version.stdout + version.stderr).split())
    fixture = {"llama_server": version, "versions": recipe_versions(),
               "recipe": "tests/llama_cpp.py build_parity_ggufs: torch seed 0, SmolLM2-135M's tokenizer",
               "prompt": PROMPT, "tokens": args.tokens, "top": TOP, "files": {}}  # fmt: skip
    for family, path in first.items():
        ours, our_top = dashchat_greedy(path, PROMPT, args.tokens, work / "cache", TOP)
        theirs, their_top = server_greedy(args.llama_server, path, args.tokens, args.port)
        result = compare(ours, our_top, theirs, their_top)
        print(f"{family} ({PARITY_FILES[family]}): greedy tokens agree for {result['agree']} of {len(ours)}; "
              f"max |top-5 log-prob diff| {result['max_logprob_diff']:.5f}; max top-2 margin diff "
              f"{result['max_margin_diff']:.5f}; smallest top-2 margin {result['min_margin']:.4f}")
        fixture["files"][family] = {"outtype": PARITY_FILES[family], "sha256": hashes[family], "tokens": theirs,
                                    "top_logprobs": their_top, "measured": result}  # fmt: skip
    if args.write_fixture:
        PARITY_FIXTURE.write_text(dump_fixture(fixture))
        print(f"wrote {PARITY_FIXTURE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
