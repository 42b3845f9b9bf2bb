"""Mixture-of-experts speed at Qwen3-30B-A3B's layer shape: dashchat against llama-server, same GGUF.

Writes a random-weight GGUF (`qwen3moe`) with Qwen3-30B-A3B's layers -- hidden 2048, 32 query /
4 KV heads of 128, q/k norms, 128 experts of width 768, 8 routed a token -- and --layers of its 48
(default 24, so the layers, not the 151k-row output head, dominate a token's reads), Qwen's
tokenizer (copied from the embedded Qwen2.5 GGUF). The weights are Q4_K blocks of random bytes with
small scales (Q4_K_M would put Q6_K in some attn_v/ffn_down tensors; the head is Q6_K here), about
9 GB at 24 layers: written in a couple of minutes, no quantizer run.

Then:
  1. the MoE layers' time per token alone: one SparseMoE block (router, experts) of the loaded
     dashchat model at 1, 8 and 128 rows, its experts run by the one-call kernel and by the Python
     loop over experts, against the same layer's attention block (module path);
  2. whole decode steps at 1 and 8 rows: the fused C step against the module path, same runner;
  3. bench/peers.py on the file: dashchat and llama-server, TTFT, one stream, --concurrency streams,
     --rounds alternating (medians). The issue's targets: one stream >= 1.0x, 8 streams >= 1.5x,
     TTFT <= 1.0x.
The file is kept (--delete removes it at the end) and a rerun with the same --layers and --out
reuses it: it is written under a `.partial` name and renamed when complete, so an interrupted run
just starts again. Each phase can be skipped (--skip-layer-time, --skip-step-time, --skip-peers).

    python bench/moe_shapes.py --llama-server /path/to/llama-server       # 24 layers
    python bench/moe_shapes.py --layers 4 --skip-peers                     # a quick check
    python bench/moe_shapes.py --gguf /tmp/moe-4l.gguf --skip-layer-time   # reuse a file

Numbers on a machine shared with other work are not reliable: the script prints the load average
beside them.
"""

from __future__ import annotations

import argparse
import contextlib
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


def _load(path: Path, threads: int):
    """The model as `--quantization gguf` serves it on the CPU (kernels swapped in)."""
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
    fresh = type(model.rotary)(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta, cfg.rope_scaling)
    model.rotary.cos, model.rotary.sin = fresh.cos, fresh.sin  # built on the meta device above
    use_cpu_kernels(model)
    return model.eval(), cfg


def baseline_library(rev: str, out_dir: Path):
    """The kernel library of git revision `rev` (built as bench/kernel_speed.py --baseline builds it),
    with the entry points these timings swap in declared."""
    import ctypes

    from kernel_speed import build_revision

    lib = build_revision(rev, out_dir)
    p, i = ctypes.c_void_p, ctypes.c_int
    lib.dc_moe_gguf_routed.argtypes = [i, i, i, p, p, p, i, i, p, p, p, p, p, p, p, p]
    lib.dc_gguf_decode_layers.argtypes = [p, p, p, i, p, p, p, p, p, i]
    lib.dc_moe_gguf_routed.restype = lib.dc_gguf_decode_layers.restype = i
    return lib


@contextlib.contextmanager
def _experts_in_file_layout():
    """Models loaded inside keep their experts' rows in the file's layout (no 8-row groups; the other
    tensors as the loader holds them): what --experts-file-layout times this tree's kernels on."""
    from dashchat.engine.quantization.gguf import GGUFPart
    from dashchat.engine.quantization.gguf_loading import _Blocks

    part = _Blocks.part

    def file_layout(blocks: _Blocks, shared=None) -> GGUFPart:
        if blocks.copy is None:  # not an expert
            return part(blocks, shared)
        return GGUFPart(blocks.type_name, blocks.data(), blocks.width, blocks.k_full, blocks.k0)

    _Blocks.part = file_layout
    try:
        yield
    finally:
        _Blocks.part = part


FILE_LAYOUT = "file layout"  # the timings' name for the experts in the file's layout


def layer_time(path: Path, threads: int, repeats: int, rows_list: tuple[int, ...], baseline=None,
               file_layout: bool = False) -> list[dict]:
    """Per-layer time of the MoE blocks (router + experts) and of the attention blocks, on dashchat's
    module path, every layer in turn (so weights come from memory as in a real step, not from a cache
    that one layer fits): the experts run by the one-call kernel ("grouped") and by the Python loop
    over experts ("loop"), alternating, each repeat a fresh random batch (so other experts are read),
    medians. 1 and 8 rows are decode steps, 128 a prefill chunk (attention: causal over the rows, no
    KV cache: its projections and its attention over the chunk). `baseline`: (name, library) of
    another revision's kernels, whose one-call kernel runs too ("baseline"), its output checked equal.
    `file_layout`: a second copy of the experts, held in the file's layout, run by this tree's one-call
    kernel too (FILE_LAYOUT), its output checked equal."""
    import torch

    from dashchat.engine.quantization.int8 import _causal_attention

    model, cfg = _load(path, threads)
    layers = list(model.layers)
    grouped = [layer.mlp.expert_runner for layer in layers]
    if any(g is None for g in grouped):
        raise SystemExit("the experts did not get the one-call kernel (no C compiler?)")

    this_lib = grouped[0]._lib
    names = ("grouped", "loop", "attention") + (("baseline",) if baseline else ())
    names += (FILE_LAYOUT,) if file_layout else ()
    if file_layout:
        with _experts_in_file_layout():
            plain, _ = _load(path, threads)
        plain_runners = [layer.mlp.expert_runner for layer in plain.layers]

    def run(name: str, x: torch.Tensor, rope) -> list[torch.Tensor]:
        outs = []
        for layer, runner in zip(layers, grouped):  # every layer in turn: weights come from memory, as in a step
            if name == "attention":
                layer.self_attn(rope, layer.input_layernorm(x), _causal_attention)
            else:
                runner._lib = baseline[1] if name == "baseline" else this_lib
                layer.mlp.expert_runner = None if name == "loop" else runner
                if name == FILE_LAYOUT:
                    layer.mlp.expert_runner = plain_runners[layers.index(layer)]
                outs.append(layer.mlp(x))
        return outs

    gen = torch.Generator().manual_seed(0)
    results = []
    for rows in rows_list:
        n = max(3, repeats if rows <= 8 else repeats // 4)
        xs = [torch.randn(rows, cfg.hidden_size, generator=gen) for _ in range(n + 2)]
        rope = model.rotary(torch.arange(rows), torch.float32)
        times: dict[str, list[float]] = {name: [] for name in names}
        with torch.inference_mode():
            for i, x in enumerate(xs):
                outs = {}
                for name in names if i % 2 else reversed(names):  # alternating which runs first
                    t0 = time.perf_counter()
                    outs[name] = run(name, x, rope)
                    if i >= 2:  # two warm-up batches
                        times[name].append((time.perf_counter() - t0) / len(layers))
                if baseline and not all(map(torch.equal, outs["grouped"], outs["baseline"])):
                    raise SystemExit(f"the {baseline[0]} expert kernel's output differs at {rows} rows")
                if file_layout and not all(map(torch.equal, outs["grouped"], outs[FILE_LAYOUT])):
                    raise SystemExit(f"the experts in the file's layout give another output at {rows} rows")
        for layer, runner in zip(layers, grouped):
            layer.mlp.expert_runner, runner._lib = runner, this_lib
        ms = {name: statistics.median(t) * 1e3 for name, t in times.items()}
        experts = len(layers[0].mlp.route(xs[0])[1].unique())
        row = {"rows": rows, "experts_read": experts, **{f"{k}_ms": round(v, 3) for k, v in ms.items()}}
        results.append(row)
        print(f"{rows:4d} row(s), {experts:3d} experts read a layer: MoE block {ms['grouped']:.2f} ms a layer "
              f"({ms['grouped'] / rows:.3f} ms a token; Python loop over experts {ms['loop']:.2f} ms, "
              f"{ms['loop'] / ms['grouped']:.2f}x), attention block {ms['attention']:.2f} ms; "
              f"x {cfg.num_layers} layers: MoE {ms['grouped'] * cfg.num_layers:.0f} ms, "
              f"attention {ms['attention'] * cfg.num_layers:.0f} ms a step", flush=True)
        if baseline:
            print(f"      {baseline[0]}'s one-call kernel: MoE block {ms['baseline']:.2f} ms a layer "
                  f"(its time / this tree's: {ms['baseline'] / ms['grouped']:.2f}x)", flush=True)
        if file_layout:
            print(f"      experts in the file's layout: MoE block {ms[FILE_LAYOUT]:.2f} ms a layer "
                  f"(its time / interleaved: {ms[FILE_LAYOUT] / ms['grouped']:.2f}x)", flush=True)
    return results


def decode_step_time(path: Path, threads: int, repeats: int, rows_list: tuple[int, ...], context: int = 100,
                     baseline=None, file_layout: bool = False) -> list[dict]:
    """A whole decode step (embedding, every layer, final norm, head) of `rows` sequences `context`
    tokens long, as the engine runs it: the fused C step (decode_step.c, one call for every layer)
    against the module path (a Python call per layer, attention and routing through torch ops), on
    the same runner and cache, alternating, medians. Checks the two give equal logits. `baseline`:
    (name, library) of another revision's kernels, whose fused step runs too ("baseline").
    `file_layout`: a second runner over the model loaded with its experts in the file's layout, its
    fused step run too (FILE_LAYOUT), its logits checked equal."""
    import torch

    from dashchat.engine.native.model_runner import ModelRunner
    from dashchat.models.config import ModelConfig
    from dashchat.models.gguf_convert import convert_gguf

    torch.set_num_threads(threads)
    folder = convert_gguf(path)
    block = 16
    width = -(-context // block) + 1
    def new_runner() -> ModelRunner:
        return ModelRunner(str(folder), ModelConfig.from_dir(folder), torch.device("cpu"), torch.float32,
                           max(rows_list) * width + 1, block, "gguf")

    runner = new_runner()
    if file_layout:
        with _experts_in_file_layout():
            plain = new_runner()
    fused = runner.fused_decode
    if fused is None:
        raise SystemExit("the fused decode step declined this model")
    this_lib = fused._lib
    gen = torch.Generator().manual_seed(0)
    results = []
    for rows in rows_list:
        tables = torch.stack([torch.arange(i * width, (i + 1) * width) for i in range(rows)])
        lens = torch.full((rows,), context)
        positions = lens - 1
        slots = tables[torch.arange(rows), positions // block] * block + positions % block
        names = ("fused", "modules") + (("baseline",) if baseline else ()) + ((FILE_LAYOUT,) if file_layout else ())
        times: dict[str, list[float]] = {name: [] for name in names}
        with torch.inference_mode():
            for i in range(repeats + 2):
                ids = torch.randint(0, runner.cfg.vocab_size, (rows,), generator=gen)
                logits = {}
                for name in names if i % 2 else reversed(names):  # alternating which runs first
                    runner.fused_decode = None if name == "modules" else fused
                    fused._lib = baseline[1] if name == "baseline" else this_lib
                    step = plain if name == FILE_LAYOUT else runner
                    t0 = time.perf_counter()
                    logits[name] = step._decode_eager(ids, positions, slots, tables, lens)
                    if i >= 2:
                        times[name].append(time.perf_counter() - t0)
                if not all(torch.equal(logits["fused"], logits[name]) for name in names):
                    raise SystemExit(f"the decode steps' logits differ at {rows} rows")
        runner.fused_decode, fused._lib = fused, this_lib
        ms = {name: statistics.median(t) * 1e3 for name, t in times.items()}
        results.append({"rows": rows, **{f"{k}_ms": round(v, 2) for k, v in ms.items()}})
        print(f"{rows:4d} row(s): decode step fused {ms['fused']:.1f} ms ({rows * 1e3 / ms['fused']:.1f} tok/s), "
              f"modules {ms['modules']:.1f} ms ({rows * 1e3 / ms['modules']:.1f} tok/s): "
              f"{ms['modules'] / ms['fused']:.2f}x", flush=True)
        if baseline:
            print(f"      {baseline[0]}'s fused step {ms['baseline']:.1f} ms ({rows * 1e3 / ms['baseline']:.1f} tok/s): "
                  f"its time / this tree's: {ms['baseline'] / ms['fused']:.2f}x", flush=True)
        if file_layout:
            print(f"      fused step, experts in the file's layout {ms[FILE_LAYOUT]:.1f} ms: "
                  f"its time / interleaved: {ms[FILE_LAYOUT] / ms['fused']:.2f}x", flush=True)
    return results


def _complete(path: Path, layers: int) -> bool:
    """A file an earlier run wrote completely for this layer count (written under another name and
    renamed when done, so a killed write never looks complete)."""
    if not path.is_file():
        return False
    try:
        from dashchat.models.gguf_convert import open_gguf, read_metadata

        return read_metadata(open_gguf(path)).get("qwen3moe.block_count") == layers
    except Exception:  # noqa: BLE001 -- anything unreadable is rewritten
        return False


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--out", type=Path, default=None,
                    help="the GGUF to write, or to reuse when an earlier run wrote it for --layers "
                         "(default: /tmp/dashchat-moe-shapes-<layers>l.gguf)")
    ap.add_argument("--gguf", type=Path, help="use this file (written by an earlier run) instead")
    ap.add_argument("--delete", action="store_true", help="delete the file at the end (default: keep it)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=20, help="batches timed for 1 and 8 rows (a quarter at 128)")
    ap.add_argument("--rows", default="1,8,128", help="batch sizes of the MoE/attention timing")
    ap.add_argument("--json", type=Path, help="write the MoE/attention timings here")
    ap.add_argument("--skip-layer-time", action="store_true")
    ap.add_argument("--skip-step-time", action="store_true",
                    help="skip timing whole decode steps, fused C step against the module path")
    ap.add_argument("--step-rows", default="1,8", help="batch sizes of the decode-step timing")
    ap.add_argument("--baseline", metavar="REV",
                    help="also time git revision REV's kernels (the one-call expert kernel, the fused step), "
                         "alternating with this tree's, outputs checked equal")
    ap.add_argument("--experts-file-layout", action="store_true",
                    help="also time this tree's kernels on a second copy of the model whose experts keep the "
                         "file's layout (no interleaved 8-row groups), alternating, outputs checked equal")
    ap.add_argument("--skip-peers", action="store_true")
    ap.add_argument("--llama-server", type=Path, help="the llama-server binary (passed to bench/peers.py)")
    ap.add_argument("--peers-args", default="--requests 3 --max-tokens 64 --concurrency 8 --rounds 2 --skip-llamacpp",
                    help="flags for bench/peers.py (default: %(default)s)")
    args = ap.parse_args()
    import gc
    import json
    import os
    import shlex

    threads = args.threads or os.cpu_count()
    path = args.gguf
    if path is None:
        path = args.out or Path(f"/tmp/dashchat-moe-shapes-{args.layers}l.gguf")
        if _complete(path, args.layers):
            print(f"reusing {path} ({path.stat().st_size / 2**30:.1f} GiB, {args.layers} layers)", flush=True)
        else:
            t0 = time.perf_counter()
            partial = path.with_name(path.name + ".partial")
            write_gguf(partial, args.layers)
            partial.replace(path)
            print(f"wrote {path} ({path.stat().st_size / 2**30:.1f} GiB) in {time.perf_counter() - t0:.0f} s",
                  flush=True)
    baseline = None
    if args.baseline:
        import tempfile

        build_dir = tempfile.TemporaryDirectory()
        baseline = (args.baseline, baseline_library(args.baseline, Path(build_dir.name)))
    try:
        print(f"load average {os.getloadavg()}, {threads} threads", flush=True)
        if not args.skip_layer_time:
            rows = tuple(int(r) for r in args.rows.split(",") if r)
            results = layer_time(path, threads, args.repeats, rows, baseline, args.experts_file_layout)
            gc.collect()
            if args.json:
                args.json.write_text(json.dumps({"gguf": str(path), "threads": threads, "load": os.getloadavg(),
                                                 "layer_time": results}, indent=2))
        if not args.skip_step_time:
            rows = tuple(int(r) for r in args.step_rows.split(",") if r)
            steps = decode_step_time(path, threads, args.repeats, rows, baseline=baseline,
                                     file_layout=args.experts_file_layout)
            gc.collect()  # the runner's ~9 GB must be gone before the servers start
            if args.json:
                done = json.loads(args.json.read_text()) if args.json.is_file() else {}
                args.json.write_text(json.dumps({**done, "decode_step": steps, "step_load": os.getloadavg()}, indent=2))
        if not args.skip_peers:
            cmd = [sys.executable, str(HERE / "peers.py"), "--gguf", str(path), "--threads", str(threads),
                   *(["--llama-server", str(args.llama_server)] if args.llama_server else []),
                   *shlex.split(args.peers_args)]
            rss = next(line.split()[1] for line in open("/proc/self/status") if line.startswith("VmRSS"))
            print(f"(this process holds {int(rss) / 2**20:.1f} GiB)\n$", shlex.join(cmd), flush=True)
            subprocess.run(cmd, check=True)
    finally:
        if args.delete and args.gguf is None:
            path.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
