"""dashchat's GGUF path against llama-server on the same MoE GGUF files: greedy tokens and top log-probs.

For each file: dashchat loads it as `--quantization gguf` does (experts as shipped) and decodes
greedily by full recomputation; llama-server (bench/.llama-server, or --llama-server) decodes the
same token-id prompt with top-k 1 and reports its top log-probs. Prints whether the tokens agree,
both top log-probs and dashchat's margin between its top two tokens (a small margin is where a
near-tie, in the logits or in a router, could make the two disagree).

    python bench/moe_llama_parity.py tiny-qwen3-moe-q8_0.gguf tiny-mixtral-q8_0.gguf

tests/engine/test_moe.py shows how to make tiny MoE GGUFs with llama.cpp's converter.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from dashchat.engine.quantization.gguf_loading import load_gguf_model  # noqa: E402
from dashchat.engine.quantization.int8 import _causal_attention  # noqa: E402
from dashchat.models.config import ModelConfig  # noqa: E402
from dashchat.models.gguf_convert import convert_gguf  # noqa: E402
from dashchat.models.parallel import ShardPlan  # noqa: E402
from dashchat.models.registry import build_model  # noqa: E402

PROMPT = [5, 17, 42, 99, 7, 3, 250, 11, 64, 128, 200, 31, 8, 9, 10, 12, 13, 300]


def dashchat_greedy(path: Path, n: int, cache: Path) -> tuple[list[int], list[float], list[float]]:
    """(tokens, top log-prob, top-1 minus top-2 log-prob) per step."""
    cfg = ModelConfig.from_dir(convert_gguf(path, cache))
    with torch.device("meta"):
        model = build_model(cfg)
    load_gguf_model(model, path, cfg, ShardPlan(cfg, 0, 1))
    fresh = type(model.rotary)(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta, cfg.rope_scaling)
    model.rotary.cos, model.rotary.sin = fresh.cos, fresh.sin
    ids, top, margin = list(PROMPT), [], []
    with torch.inference_mode():
        for _ in range(n):
            logits = model.compute_logits(model(torch.tensor(ids), torch.arange(len(ids)), _causal_attention))[-1]
            values, index = torch.log_softmax(logits, -1).topk(2)
            ids.append(int(index[0]))
            top.append(float(values[0]))
            margin.append(float(values[0] - values[1]))
    return ids[len(PROMPT):], top, margin


def server_greedy(binary: Path, path: Path, n: int, port: int) -> tuple[list[int], list[float]]:
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
        body = {"prompt": PROMPT, "n_predict": n, "temperature": 0, "n_probs": 1, "ignore_eos": True,
                "samplers": ["top_k"], "top_k": 1}
        request = urllib.request.Request(f"http://127.0.0.1:{port}/completion", json.dumps(body).encode(),
                                         {"Content-Type": "application/json"})
        steps = json.loads(urllib.request.urlopen(request).read())["completion_probabilities"]
        return [s["id"] for s in steps], [s["top_logprobs"][0]["logprob"] for s in steps]
    finally:
        server.terminate()
        server.wait()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("gguf", nargs="+", type=Path)
    ap.add_argument("--tokens", type=int, default=12)
    ap.add_argument("--llama-server", type=Path, default=HERE / ".llama-server" / "bin" / "llama-server")
    ap.add_argument("--port", type=int, default=18232)
    args = ap.parse_args()
    cache = Path(tempfile.mkdtemp(prefix="dashchat-moe-parity-"))
    for path in args.gguf:
        ours, our_top, margin = dashchat_greedy(path, args.tokens, cache)
        theirs, their_top = server_greedy(args.llama_server, path, args.tokens, args.port)
        agree = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), len(ours))
        print(f"{path.name}: greedy tokens agree for {agree} of {len(ours)}; max |top log-prob diff| "
              f"{max(abs(a - b) for a, b in zip(our_top, their_top)):.4f}; smallest top-2 margin "
              f"{min(margin):.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
