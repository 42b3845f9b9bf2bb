"""Mixture-of-experts speed at Qwen3-30B-A3B's layer shape: dashchat against llama-server, same GGUF.

Writes a random-weight GGUF (`qwen3moe`) with Qwen3-30B-A3B's layers -- hidden 2048, 32 query /
4 KV heads of 128, q/k norms, 128 experts of width 768, 8 routed a token -- and --layers of its 48
(default 24, so the layers, not the 151k-row output head, dominate a token's reads), Qwen's
tokenizer (copied from the embedded Qwen2.5 GGUF). The weights are Q4_K blocks of random bytes with
small scales (Q4_K_M would put Q6_K in some attn_v/ffn_down tensors; the head is Q6_K here), about
9 GB at 24 layers: written in a couple of minutes, no quantizer run.

Then:
  1. the MoE layers' time per token alone: one SparseMoE block (router, grouped experts) of the
     loaded dashchat model, batch 1 and 8 tokens, against its whole decoder layer (module path);
  2. bench/peers.py on the file: dashchat and llama-server, TTFT, one stream, --concurrency streams,
     --rounds alternating (medians). The issue's targets: one stream >= 1.0x, 8 streams >= 1.5x,
     TTFT <= 1.0x.
The file is deleted at the end unless --keep.

    python bench/moe_shapes.py                       # 24 layers, write, measure, delete
    python bench/moe_shapes.py --layers 2 --keep --out /tmp/moe-2l.gguf --skip-peers   # a quick check
    python bench/moe_shapes.py --gguf /tmp/moe-2l.gguf --skip-layer-time   # reuse a file

Numbers on a machine shared with other work are not reliable: the script prints the load average
beside them.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from gguf_blocks import block_layout, random_blocks  # noqa: E402

HIDDEN, HEADS, KV_HEADS, HEAD_DIM = 2048, 32, 4, 128
EXPERTS, ACTIVE, EXPERT_WIDTH = 128, 8, 768
# the float16 scale of each type's blocks: weights of about the size trained ones have
SCALES = {"Q4_K": 1.4e-4, "Q6_K": 2e-5}


def write_gguf(path: Path, layers: int, seed: int = 0) -> None:
    from gguf import GGMLQuantizationType, GGUFWriter

    from dashchat.models.embedded import embedded_gguf
    from dashchat.models.gguf_convert import open_gguf, read_metadata

    meta = read_metadata(open_gguf(embedded_gguf("qwen2.5-coder-0.5b-instruct")))
    tokens = meta["tokenizer.ggml.tokens"]
    vocab = len(tokens)
    rng = np.random.default_rng(seed)
    q4k, q6k, f32 = GGMLQuantizationType.Q4_K, GGMLQuantizationType.Q6_K, GGMLQuantizationType.F32

    # (name, ggml shape [cols, rows(, experts)], type, thunk giving the data)
    tensors: list[tuple[str, list[int], GGMLQuantizationType, object]] = [
        ("token_embd.weight", [HIDDEN, vocab], q4k, lambda: random_blocks(rng, "Q4_K", vocab, HIDDEN, SCALES["Q4_K"])),
        ("output_norm.weight", [HIDDEN], f32, lambda: np.ones(HIDDEN, np.float32)),
        ("output.weight", [HIDDEN, vocab], q6k, lambda: random_blocks(rng, "Q6_K", vocab, HIDDEN, SCALES["Q6_K"])),
    ]
    for i in range(layers):
        def linear(name: str, rows: int, cols: int) -> None:
            tensors.append((f"blk.{i}.{name}", [cols, rows], q4k, lambda: random_blocks(rng, "Q4_K", rows, cols, SCALES["Q4_K"])))

        def experts(name: str, rows: int, cols: int) -> None:
            tensors.append((f"blk.{i}.{name}", [cols, rows, EXPERTS], q4k,
                            lambda: random_blocks(rng, "Q4_K", EXPERTS * rows, cols, SCALES["Q4_K"])))

        for name, dim in (("attn_norm", HIDDEN), ("ffn_norm", HIDDEN), ("attn_q_norm", HEAD_DIM),
                          ("attn_k_norm", HEAD_DIM)):
            tensors.append((f"blk.{i}.{name}.weight", [dim], f32, lambda dim=dim: np.ones(dim, np.float32)))
        linear("attn_q.weight", HEADS * HEAD_DIM, HIDDEN)
        linear("attn_k.weight", KV_HEADS * HEAD_DIM, HIDDEN)
        linear("attn_v.weight", KV_HEADS * HEAD_DIM, HIDDEN)
        linear("attn_output.weight", HIDDEN, HEADS * HEAD_DIM)
        tensors.append((f"blk.{i}.ffn_gate_inp.weight", [HIDDEN, EXPERTS], f32,
                        lambda: (rng.standard_normal((EXPERTS, HIDDEN), np.float32) * 0.02)))
        experts("ffn_gate_exps.weight", EXPERT_WIDTH, HIDDEN)
        experts("ffn_up_exps.weight", EXPERT_WIDTH, HIDDEN)
        experts("ffn_down_exps.weight", HIDDEN, EXPERT_WIDTH)

    w = GGUFWriter(str(path), "qwen3moe")
    w.add_name(f"random Qwen3-30B-A3B shape, {layers} layers")
    w.add_context_length(40960)
    w.add_embedding_length(HIDDEN)
    w.add_block_count(layers)
    w.add_feed_forward_length(6144)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_key_length(HEAD_DIM)
    w.add_value_length(HEAD_DIM)
    w.add_rope_freq_base(1000000.0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_expert_count(EXPERTS)
    w.add_expert_used_count(ACTIVE)
    w.add_expert_feed_forward_length(EXPERT_WIDTH)
    w.add_tokenizer_model(meta["tokenizer.ggml.model"])
    w.add_tokenizer_pre(meta["tokenizer.ggml.pre"])
    w.add_token_list(tokens)
    w.add_token_types(meta["tokenizer.ggml.token_type"])
    w.add_token_merges(meta["tokenizer.ggml.merges"])
    for key, add in (("eos", w.add_eos_token_id), ("bos", w.add_bos_token_id), ("padding", w.add_pad_token_id)):
        if isinstance(meta.get(f"tokenizer.ggml.{key}_token_id"), int):
            add(meta[f"tokenizer.ggml.{key}_token_id"])
    w.add_add_bos_token(False)
    w.add_chat_template(meta["tokenizer.chat_template"])
    for name, shape, qtype, _ in tensors:
        n = int(np.prod(shape))
        nbytes = 4 * n if qtype == f32 else n // block_layout(qtype.name)[0] * block_layout(qtype.name)[1]
        w.add_tensor_info(name, list(reversed(shape)) if qtype == f32 else _byte_shape(shape, qtype),
                          np.float32 if qtype == f32 else np.uint8, nbytes, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for _, _, _, make in tensors:  # one tensor in memory at a time
        w.write_tensor_data(np.ascontiguousarray(make()))
    w.close()


def _byte_shape(ggml_shape: list[int], qtype) -> list[int]:
    """numpy byte shape of a quantized tensor (rows first, bytes of a row last)."""
    per_block, block_bytes = block_layout(qtype.name)
    return [*reversed(ggml_shape[1:]), ggml_shape[0] // per_block * block_bytes]


def layer_time(path: Path, threads: int, repeats: int) -> None:
    """Per-token time of one MoE block and of its whole decoder layer, dashchat's module path."""
    import torch

    from dashchat.engine.cpu.ops import use_cpu_kernels
    from dashchat.engine.quantization.gguf_loading import load_gguf_model
    from dashchat.models.config import ModelConfig
    from dashchat.models.gguf_convert import convert_gguf
    from dashchat.models.parallel import ShardPlan
    from dashchat.models.registry import build_model

    torch.set_num_threads(threads)
    cfg = ModelConfig.from_dir(convert_gguf(path))
    with torch.device("meta"):
        model = build_model(cfg)
    load_gguf_model(model, path, cfg, ShardPlan(cfg, 0, 1))
    use_cpu_kernels(model)
    moe = model.layers[0].mlp
    for batch in (1, 8):
        x = torch.randn(batch, cfg.hidden_size)
        with torch.inference_mode():
            moe(x)  # warm: first touch of the pages
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                moe(x)
                times.append(time.perf_counter() - t0)
        ms = statistics.median(times) * 1e3
        chosen = len(moe.route(x)[1].unique())
        print(f"MoE block, {batch} token(s) ({chosen} experts read): {ms:.2f} ms a step, {ms / batch:.2f} ms a token; "
              f"x {cfg.num_layers} layers = {ms * cfg.num_layers:.0f} ms a step")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--out", type=Path, default=Path("/tmp/dashchat-moe-shapes.gguf"))
    ap.add_argument("--gguf", type=Path, help="use this file (written by an earlier --keep run) instead")
    ap.add_argument("--keep", action="store_true", help="keep the file written")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--skip-layer-time", action="store_true")
    ap.add_argument("--skip-peers", action="store_true")
    ap.add_argument("--peers-args", default="--requests 3 --max-tokens 64 --concurrency 8 --rounds 2 --skip-llamacpp",
                    help="flags for bench/peers.py (default: %(default)s)")
    args = ap.parse_args()
    import os
    import shlex

    threads = args.threads or os.cpu_count()
    path = args.gguf
    written = False
    if path is None:
        path = args.out
        t0 = time.perf_counter()
        write_gguf(path, args.layers)
        written = True
        print(f"wrote {path} ({path.stat().st_size / 2**30:.1f} GiB) in {time.perf_counter() - t0:.0f} s", flush=True)
    try:
        print(f"load average {os.getloadavg()}", flush=True)
        if not args.skip_layer_time:
            layer_time(path, threads, args.repeats)
        if not args.skip_peers:
            cmd = [sys.executable, str(HERE / "peers.py"), "--gguf", str(path), "--threads", str(threads),
                   *shlex.split(args.peers_args)]
            subprocess.run(cmd, check=True)
    finally:
        if written and not args.keep:
            path.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
