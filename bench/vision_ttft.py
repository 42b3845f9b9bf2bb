"""Time to first token with an image, at Qwen2.5-VL-3B's full shape (random weights), through the real server.

A random-weight Qwen2.5-VL-3B folder (language model: hidden 2048, 36 layers, 16 query / 2 KV heads,
MLP 11008, vocabulary 151936, tied embeddings; the vision tower of bench/vision_tower.py) is written
in bfloat16 under --workdir (made on demand, deleted afterwards unless --keep), with the embedded
Qwen2.5 model's tokenizer and chat template. dashchat's server runs it on 127.0.0.1 with --dtype
bfloat16 (a float32 3B model would take ~15 GB), and the same short question is asked with one
448x448 PNG (base64 `image_url`) and without it, rounds alternating, one token each (non-streamed,
max_tokens=1: the latency is the time to first token), a fresh cache salt per request so that the
prefix cache never answers. Then, unless --no-transformers, transformers'
Qwen2_5_VLForConditionalGeneration loads the same folder in bfloat16 and prefills the same token ids
(taken from the server's /tokenize) and pixels: its forward alone, no HTTP, no preprocessing.

    flock /work/bench.lock python bench/vision_ttft.py [--rounds 3] [--side 448] [--workdir /tmp/vision-ttft]
"""

from __future__ import annotations

import argparse
import base64
import gc
import json
import os
import shutil
import statistics
import sys
import time
import uuid
from pathlib import Path

import httpx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from load_common import LOOPBACK, ServerProcess, free_port, loadavg  # noqa: E402
from vision_tower import SHAPE, picture  # noqa: E402

TEXT = dict(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
            num_attention_heads=16, num_key_value_heads=2, max_position_embeddings=128000, rms_norm_eps=1e-6,
            tie_word_embeddings=True, hidden_act="silu",
            rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]})
QUESTION = "What is in this picture? Answer in one sentence."
NAME = "qwen2.5-vl-3b-random"


def make_folder(path: Path, tiny: bool) -> None:
    """The random bfloat16 checkpoint, its config and the tokenizer files (tiny: a few layers, narrow,
    to check this script itself)."""
    import transformers

    from dashchat.models.resolve import resolve_model

    if (path / "config.json").exists():
        return
    path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    text, vision = dict(TEXT), dict(SHAPE)
    if tiny:
        text.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    rope_parameters=dict(TEXT["rope_parameters"], mrope_section=[2, 3, 3]))
        vision.update(depth=2, hidden_size=64, num_heads=2, intermediate_size=96, out_hidden_size=64,
                      fullatt_block_indexes=[1])
    config = transformers.Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True)
    model = transformers.Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(path, safe_serialization=True)
    del model
    gc.collect()
    qwen = Path(resolve_model("qwen2.5-coder-0.5b-instruct").path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(qwen / name, path / name)


def messages(side: int | None, seed: int) -> list[dict]:
    """The question, after a side x side picture (a different one per seed) when side is given."""
    parts: list[dict] = []
    if side:
        url = "data:image/png;base64," + base64.b64encode(picture(side, seed)).decode()
        parts.append({"type": "image_url", "image_url": {"url": url}})
    parts.append({"type": "text", "text": QUESTION})
    return [{"role": "user", "content": parts}]


def ask(client: httpx.Client, msgs: list[dict]) -> tuple[float, int]:
    """Seconds to the first (only) token, and the prompt's tokens."""
    body = {"model": NAME, "messages": msgs, "max_tokens": 1, "temperature": 0, "ignore_eos": True,
            "cache_salt": uuid.uuid4().hex}
    start = time.perf_counter()
    r = client.post("/v1/chat/completions", json=body)
    took = time.perf_counter() - start
    r.raise_for_status()
    return took, r.json()["usage"]["prompt_tokens"]


def through_server(path: Path, args: argparse.Namespace) -> tuple[dict, list[int]]:
    port = free_port()
    cmd = [sys.executable, "-m", "dashchat.openai_server", "--model-path", str(path), "--served-model-name", NAME,
           "--host", LOOPBACK, "--port", str(port), "--dtype", "bfloat16", "--max-model-len", "4096",
           "--kv-cache-memory", "0.5"]
    times: dict[str, list[float]] = {"image": [], "text": []}
    tokens: dict[str, int] = {}
    with ServerProcess("dashchat", cmd, port, Path(args.workdir) / "server.log") as srv, \
            httpx.Client(base_url=srv.base_url, timeout=1800, trust_env=False) as client:
        ask(client, messages(args.side, seed=99))  # warm-up: first-call costs (allocations, oneDNN kernels)
        ask(client, messages(None, seed=0))
        for r in range(args.rounds):  # alternating rounds
            for kind, side in (("image", args.side), ("text", None)):
                took, n = ask(client, messages(side, seed=r))
                times[kind].append(took)
                tokens[kind] = n
                print(f"  round {r} {kind}: {took:.2f} s ({n} prompt tokens), load {loadavg()}", flush=True)
        ids = client.post("/tokenize", json={"model": NAME, "messages": messages(args.side, seed=0),
                                              "add_generation_prompt": True}).json()["tokens"]
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"seconds": med, "prompt_tokens": tokens, "rounds": times}, ids


def transformers_prefill(path: Path, ids: list[int], args: argparse.Namespace) -> dict:
    import transformers

    from dashchat.models.image_processing import ImageProcessorConfig, open_image, preprocess

    model = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(path, dtype=torch.bfloat16).eval()
    img = preprocess(open_image(picture(args.side, 0), 10**8), ImageProcessorConfig())
    pad = model.config.image_token_id
    kwargs = dict(input_ids=torch.tensor([ids]), pixel_values=torch.from_numpy(img.pixel_values).to(torch.bfloat16),
                  image_grid_thw=torch.tensor([img.grid]), mm_token_type_ids=torch.tensor([[int(t == pad) for t in ids]]))
    times = []
    with torch.inference_mode():
        for r in range(1 + args.rounds):
            start = time.perf_counter()
            model(**kwargs, logits_to_keep=1)
            if r:  # the first call warms up
                times.append(time.perf_counter() - start)
            print(f"  transformers round {r}: {time.perf_counter() - start:.2f} s, load {loadavg()}", flush=True)
    return {"seconds": statistics.median(times), "rounds": times, "prompt_tokens": len(ids)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--side", type=int, default=448)
    ap.add_argument("--workdir", default="/tmp/vision-ttft")
    ap.add_argument("--keep", action="store_true", help="keep the random checkpoint for another run")
    ap.add_argument("--no-transformers", action="store_true")
    ap.add_argument("--tiny", action="store_true", help="a tiny model of the same kind: checks the script, times nothing")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    path = Path(args.workdir) / "model"
    import transformers

    print(f"torch {torch.__version__}, transformers {transformers.__version__}, threads {torch.get_num_threads()}, "
          f"cpus {os.cpu_count()}, load {loadavg()}", flush=True)
    try:
        start = time.perf_counter()
        make_folder(path, args.tiny)
        print(f"random checkpoint in {path} ({time.perf_counter() - start:.0f} s)", flush=True)
        served, ids = through_server(path, args)
        result = {"dashchat": served}
        s = served["seconds"]
        print(f"dashchat (server, bf16): TTFT with a {args.side}x{args.side} image {s['image']:.2f} s "
              f"({served['prompt_tokens']['image']} prompt tokens), without {s['text']:.2f} s "
              f"({served['prompt_tokens']['text']} tokens)", flush=True)
        if not args.no_transformers:
            ref = transformers_prefill(path, ids, args)
            result["transformers"] = ref
            print(f"transformers prefill (forward only, bf16): "
                  f"{ref['seconds']:.2f} s for {ref['prompt_tokens']} tokens; dashchat's TTFT is "
                  f"{ref['seconds'] / s['image']:.2f}x faster", flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=1))
    finally:
        if not args.keep:
            shutil.rmtree(path, ignore_errors=True)


if __name__ == "__main__":
    main()
