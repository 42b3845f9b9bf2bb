"""Mixture-of-experts models (Qwen3-MoE, Qwen2-MoE, Mixtral) against transformers.

Tiny random checkpoints (tests/tiny_models.py) through the engine: batches of several shapes, a
prefix-cache hit, chunked prefill and preemption. GGUF files made from them by llama.cpp's own
converter (tests/llama_cpp.py), run as shipped, against transformers on the same
weights dequantized. (Logits per family and 2/4 ranks: test_model_families.py and
distributed/test_tp_layers.py take every family of tiny_models.)
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
import torch

from dashchat.engine.args import EngineArgs
from dashchat.engine.native.llm_engine import AsyncLLMEngine
from dashchat.engine.native.model_runner import ModelRunner
from dashchat.engine.quantization.gguf import GGUFLinear
from dashchat.engine.quantization.gguf_loading import load_gguf_model
from dashchat.engine.quantization.int8 import _causal_attention
from dashchat.engine.types import SamplingParams
from dashchat.models.config import ModelConfig
from dashchat.models.gguf_convert import convert_gguf
from dashchat.models.moe import SparseMoE
from dashchat.models.parallel import ShardPlan
from dashchat.models.registry import build_model
from dashchat.models.weights import iter_weights
from engine_helpers import collect, greedy_tokens
from llama_cpp import convert_to_gguf
from tiny_models import FAMILIES, save_tiny, save_tiny_for_gguf, save_word_tokenizer

transformers = pytest.importorskip("transformers")

MOE_FAMILIES = ["qwen3-moe", "qwen2-moe", "mixtral"]


def _model(model_dir) -> torch.nn.Module:
    model = build_model(ModelConfig.from_dir(model_dir))
    model.load_weights(iter_weights(model_dir))
    return model.eval()


def test_tokens_grouped_by_expert_and_only_chosen_experts_run(tmp_path):
    save_tiny("qwen3-moe", tmp_path)
    moe = _model(tmp_path).layers[0].mlp
    assert isinstance(moe, SparseMoE)
    calls: dict[int, list[int]] = {}
    for e, expert in enumerate(moe.experts):
        expert.register_forward_hook(lambda m, args, out, e=e: calls.setdefault(e, []).append(args[0].shape[0]))
    x = torch.randn(11, 64, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        weights, chosen = moe.route(x)
        got = moe(x)
        # one token at a time, each chosen expert on its own: the sum the grouping must equal
        want = torch.stack([sum(w * moe.experts[int(e)](x[t : t + 1])[0] for w, e in zip(weights[t], chosen[t]))
                            for t in range(len(x))])  # fmt: skip
    used = chosen.unique().tolist()
    per_expert = torch.bincount(chosen.reshape(-1), minlength=len(moe.experts))
    # each chosen expert ran once in the batched call (then once per token for `want`), with all its tokens
    assert sorted(calls) == used
    assert all(calls[e][0] == per_expert[e] for e in used)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    calls.clear()
    with torch.inference_mode():  # a decode step of two tokens: at most 6 of the 8 experts are read
        moe(x[:2])
    assert sorted(calls) == moe.route(x[:2])[1].unique().tolist() and len(calls) <= 6


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_engine_matches_transformers(family, tmp_path):
    """Four prompts at once (decode and prefill rows of several lengths in one step), prefill in
    chunks of 24 tokens, a KV cache that fits their prompts but not their answers (preemption),
    then a prompt sharing another's first block (a prefix-cache hit)."""
    ref = save_tiny(family, tmp_path)
    save_word_tokenizer(tmp_path, eos="t2")
    ref.generation_config.eos_token_id = 2  # banned by min_new_tokens, as ignore_eos bans it in the engine
    prompts = [[(7 * i + 3 * j) % 310 + 5 for j in range(n)] for i, n in enumerate([3, 30, 9, 14])]
    new_tokens = [12, 10, 14, 12]
    expected = greedy_tokens(ref, prompts, new_tokens)
    again = prompts[1][:20] + [41, 42, 43]
    expected += greedy_tokens(ref, [again], [6])
    block_bytes = 16 * ModelRunner.kv_bytes_per_token(ModelConfig.from_dir(tmp_path), torch.float32)
    engine = AsyncLLMEngine.from_args(EngineArgs(
        model_dir=str(tmp_path), max_model_len=64, block_size=16, max_num_batched_tokens=24,
        kv_cache_memory_gb=6 * block_bytes / 2**30))  # fmt: skip
    try:
        assert engine.blocks.num_blocks == 6  # the answers need 8 blocks at once

        def params(n: int) -> SamplingParams:
            return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)

        async def run() -> list[list[int]]:
            outs = await asyncio.gather(*(collect(engine, p, params(n)) for p, n in zip(prompts, new_tokens)))
            hits = engine.blocks.prefix_hits
            last = await collect(engine, again, params(6))
            assert engine.blocks.prefix_hits >= hits + 16  # its first block came from the cache
            return [o[0].token_ids for o in outs] + [last[0].token_ids]

        assert asyncio.run(asyncio.wait_for(run(), timeout=300)) == expected
        assert engine.stats().num_preemptions > 0
    finally:
        engine.shutdown()


# ---------------------------------------------------------------- GGUF through llama.cpp's converter


# family -> llama.cpp's --outtype: Q8_0 runs through the int8 kernels, F16 through the 16-bit ones
GGUF_FILES = {"qwen3-moe": "q8_0", "qwen2-moe": "q8_0", "mixtral": "f16"}


@pytest.fixture(scope="module")
def gguf_files(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """The tiny MoE checkpoints (SmolLM2's tokenizer: the converter needs a real one) as GGUF files
    written by llama.cpp's converter, with dashchat's model folder of each: {family: (file, folder)}."""
    from dashchat.models.resolve import resolve_model

    tokenizer = resolve_model("smollm2-135m-instruct").path
    root = tmp_path_factory.mktemp("moe-gguf")
    runs, files = [], {}
    for family, outtype in GGUF_FILES.items():
        hf = root / family
        save_tiny_for_gguf(family, hf, tokenizer)
        files[family] = root / f"{family}-{outtype}.gguf"
        runs.append((hf, files[family], outtype))
    convert_to_gguf(runs)
    return {family: (path, convert_gguf(path, root / "cache")) for family, path in files.items()}


def _gguf_model(path: Path, cfg: ModelConfig) -> tuple[torch.nn.Module, dict[str, int]]:
    """The model as `--quantization gguf` loads it: built on the meta device, filled from the file."""
    with torch.device("meta"):
        model = build_model(cfg)
    counts = load_gguf_model(model, path, cfg, ShardPlan(cfg, 0, 1))
    fresh = type(model.rotary)(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta, cfg.rope_scaling)
    model.rotary.cos, model.rotary.sin = fresh.cos, fresh.sin
    return model.eval(), counts


def _routes(model: torch.nn.Module) -> list[torch.Tensor]:
    """Record each MoE layer's chosen experts (sorted per token) on the next forward."""
    seen: list[torch.Tensor] = []
    for layer in model.layers:
        if isinstance(layer.mlp, SparseMoE):
            layer.mlp.register_forward_hook(lambda m, args, out: seen.append(m.route(args[0])[1].sort(-1)[0]))
    return seen


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_gguf_matches_transformers_on_the_dequantized_weights(family, gguf_files):
    """F16 experts run through the 16-bit kernels: equal to transformers. Q8_0 experts run through
    the int8 kernels on their rows of the 3-D tensors: close, and where a token's router scores two
    experts nearly alike the kernels' rounding may swap them (a near-tie) -- counted here: that
    token's logits then move as far as the swap does, in this layer's output only."""
    path, folder = gguf_files[family]
    cfg = ModelConfig.from_dir(folder)
    assert cfg.architecture == FAMILIES[family][1] and cfg.moe is not None
    model, counts = _gguf_model(path, cfg)
    experts = sum(cfg.is_moe_layer(i) for i in range(cfg.num_layers)) * cfg.moe.num_experts
    quantized = GGUF_FILES[family] == "q8_0"
    # every expert's gate/up and down, the attention and the head as shipped (F16: the 16-bit kernels)
    assert sum(isinstance(m, GGUFLinear) for m in model.modules()) == counts["gguf"]
    assert counts["gguf"] >= 2 * experts + 2 * cfg.num_layers + 1
    float_model = _model(folder)  # writes the folder's float32 weights, dequantized, for transformers too
    ref = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = torch.randint(0, cfg.vocab_size, (48,), generator=torch.Generator().manual_seed(3))
    routes_gguf, routes_float = _routes(model), _routes(float_model)
    with torch.inference_mode():
        want = ref(ids[None]).logits[0]
        got = model.compute_logits(model(ids, torch.arange(len(ids)), _causal_attention))
        float_model.compute_logits(float_model(ids, torch.arange(len(ids)), _causal_attention))
    if not quantized:  # float16 weights exactly, products in float32
        torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-4)
        return
    swapped = sum(int((a != b).any(-1).sum()) for a, b in zip(routes_gguf, routes_float))
    decisions = sum(len(r) for r in routes_float)
    print(f"{family} Q8_0: {swapped} of {decisions} token-layer routings differ from float32's; "
          f"max |logit diff| {(got - want).abs().max():.4f}")
    assert swapped <= 0.1 * decisions
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.9
    assert (got - want).abs().mean() < 0.02 * want.abs().mean() + 0.01


def test_gguf_engine_runs_the_fused_decode_step(gguf_files):
    """--quantization gguf on a MoE model: decode steps run the fused C step (experts included), and
    the engine's tokens are those of the same GGUF model run without a KV cache."""
    path, folder = gguf_files["qwen3-moe"]
    cfg = ModelConfig.from_dir(folder)
    model, _ = _gguf_model(path, cfg)
    prompt, n = [5, 17, 42, 99, 7, 3, 250, 11, 64, 128, 200, 31, 8, 9, 10, 12, 13, 300], 8
    ids = list(prompt)
    with torch.inference_mode():
        for _ in range(n):  # greedy by full recomputation, the module path
            x = torch.tensor(ids)
            ids.append(int(model.compute_logits(model(x, torch.arange(len(x)), _causal_attention))[-1].argmax()))
    engine = AsyncLLMEngine.from_args(EngineArgs(model_dir=str(folder), max_model_len=64, quantization="gguf"))
    try:
        assert engine.runner.fused_decode is not None
        out = asyncio.run(collect(engine, prompt, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)))
        assert out[0].token_ids == ids[len(prompt):]
    finally:
        engine.shutdown()


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_fused_decode_step_equals_the_modules(family, gguf_files):
    """The fused decode step (decode_step.c) on a MoE GGUF -- router, softmax and top k, the routed
    experts, Qwen2-MoE's gated shared expert -- gives the module path's logits bit for bit, at 1, 5
    and 16 rows; past 16 rows (where the float router's module product leaves the C kernel) the
    modules run the step. Mixtral's file is F16 throughout, whose attention the step declines (16-bit
    products): its q/k/v and o become random Q8_0 blocks, its experts stay F16 (the 16-bit kernels)."""
    from dashchat.engine.cpu.decode_step import FusedDecode
    from dashchat.engine.quantization.gguf import GGUFPart
    from engine.test_fused_decode import BLOCK, decode_both_ways
    from engine.test_gguf_kernels import random_blocks

    _, folder = gguf_files[family]
    cfg = ModelConfig.from_dir(folder)
    runner = ModelRunner(str(folder), cfg, torch.device("cpu"), torch.float32, 64, BLOCK, "gguf")
    if family == "mixtral":
        assert runner.fused_decode is None
        for layer in runner.model.layers:
            for name in ("qkv_proj", "o_proj"):
                old = getattr(layer.self_attn, name)
                data = random_blocks("Q8_0", old.out_features, old.in_features, 7)
                setattr(layer.self_attn, name, GGUFLinear(old.in_features, old.out_features,
                                                          [GGUFPart("Q8_0", torch.from_numpy(data), old.in_features)]))
        runner.fused_decode = FusedDecode.build(runner.model, runner.kv_cache, BLOCK, cfg.attention_scale)
    fused = runner.fused_decode
    assert fused is not None and fused.runs(16) and not fused.runs(17)
    for batch, context in ((1, 20), (5, 40), (16, 23)):
        reference, got = decode_both_ways(runner, batch, context, seed=batch)
        assert torch.equal(got, reference), (family, batch)


def test_gguf_expert_shards_sum_to_one_rank(gguf_files):
    """Each of two ranks holds its 32 of every expert's 64 gate/up rows and the blocks of its 32
    inputs of every expert's down rows (the file's blocks, one copy of the rank's part of each 3-D
    tensor); their partial block outputs, summed as the all-reduce sums them, are the one-rank output. (The whole
    model over two gloo ranks, float weights: distributed/test_tp_layers.py.)"""
    from dashchat.models.parallel import TensorParallel

    path, folder = gguf_files["qwen3-moe"]
    cfg = ModelConfig.from_dir(folder)
    one, _ = _gguf_model(path, cfg)
    x = torch.randn(13, cfg.hidden_size, generator=torch.Generator().manual_seed(4))
    partial = []
    for rank in range(2):
        with torch.device("meta"):
            model = build_model(cfg, TensorParallel(rank, 2))  # its all-reduce left out: summed below
        load_gguf_model(model, path, cfg, ShardPlan(cfg, rank, 2))
        mlp = model.layers[1].mlp
        assert all(isinstance(m, GGUFLinear) for m in mlp.experts[5].modules() if m is not mlp.experts[5])
        assert mlp.experts[5].down_proj.parts[0].k_full == 32  # only the blocks of its 32 inputs
        with torch.inference_mode():
            partial.append(mlp(x))
    with torch.inference_mode():
        want = one.layers[1].mlp(x)
    torch.testing.assert_close(partial[0] + partial[1], want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("quantization", ["int8", "int4"])
def test_quantized_experts(quantization, tmp_path, monkeypatch):
    """--quantization int8/int4 reach every expert's linears (int8: the norm before a mixture of
    experts is not smoothed, the calibration text does not reach every expert) and stay close."""
    monkeypatch.setenv("DASHCHAT_CACHE", str(tmp_path / "cache"))
    ref = save_tiny("qwen3-moe", tmp_path)
    save_word_tokenizer(tmp_path, eos="t2")
    ref.generation_config.eos_token_id = 2
    prompt = [5, 17, 42, 99, 7, 3, 250, 11, 64, 128]
    expected = greedy_tokens(ref, [prompt], [8])[0]
    engine = AsyncLLMEngine.from_args(EngineArgs(model_dir=str(tmp_path), max_model_len=64, quantization=quantization))
    try:
        experts = engine.runner.model.layers[0].mlp.experts
        assert all(type(e.gate_up_proj).__name__.startswith(quantization.capitalize()) for e in experts)
        out = asyncio.run(collect(engine, prompt, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)))
        assert out[0].token_ids[:4] == expected[:4]
    finally:
        engine.shutdown()


def test_grammar_constrains_a_moe_model(gguf_files):
    """Constrained decoding is a logits processor: a MoE model's output follows a JSON schema too."""
    pytest.importorskip("xgrammar")
    from dashchat.server.text.grammar import GrammarBackend

    _, folder = gguf_files["qwen3-moe"]
    engine = AsyncLLMEngine.from_args(EngineArgs(model_dir=str(folder), max_model_len=128, quantization="gguf"))
    try:
        backend = GrammarBackend(engine.tokenizer, ModelConfig.from_dir(folder).vocab_size)
        schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
                  "additionalProperties": False}
        params = SamplingParams(max_tokens=60, temperature=0.0, logits_processor_factories=[backend.json_schema(schema)])
        out = asyncio.run(collect(engine, engine.tokenizer.encode("Answer in JSON:"), params))[0]
        assert out.finish_reason == "stop"  # the grammar ended it: its end token is the only one left
        assert json.loads(engine.tokenizer.decode(out.token_ids)) in ({"ok": True}, {"ok": False})
    finally:
        engine.shutdown()


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_grouped_gguf_experts_equal_the_per_expert_loop(family, gguf_files):
    """The one-call expert kernel (gguf_moe.py) gives the Python loop's output bit for bit: the same
    int8 activations and products (Q8_0), the same 16-bit products (Mixtral's F16), decode-sized and
    prefill-sized batches; and on each of two ranks, so their sum is still the one-rank output."""
    from dashchat.engine.cpu.ops import use_cpu_kernels
    from dashchat.engine.quantization.gguf_moe import grouped_gguf_experts
    from dashchat.models.parallel import TensorParallel

    path, folder = gguf_files[family]
    cfg = ModelConfig.from_dir(folder)
    model, _ = _gguf_model(path, cfg)
    assert use_cpu_kernels(model)  # the loop's SiLU then is the kernel's, as the engine runs it
    moe = next(layer.mlp for layer in model.layers if isinstance(layer.mlp, SparseMoE))
    runner = moe.expert_runner
    assert runner is not None
    gen = torch.Generator().manual_seed(5)
    with torch.inference_mode():
        for rows in (1, 3, 8, 40):
            x = torch.randn(rows, cfg.hidden_size, generator=gen)
            weights, chosen = moe.route(x)
            torch.testing.assert_close(runner(x, weights, chosen), moe.run_experts(x, weights, chosen), atol=0, rtol=0)
    if family != "qwen3-moe":
        return
    x = torch.randn(13, cfg.hidden_size, generator=gen)
    partial = []
    for rank in range(2):
        with torch.device("meta"):
            sharded = build_model(cfg, TensorParallel(rank, 2))
        load_gguf_model(sharded, path, cfg, ShardPlan(cfg, rank, 2))
        mlp = next(layer.mlp for layer in sharded.layers if isinstance(layer.mlp, SparseMoE))
        mlp.expert_runner = grouped_gguf_experts(mlp.experts)
        assert mlp.expert_runner is not None
        with torch.inference_mode():
            partial.append(mlp(x))
    with torch.inference_mode():
        torch.testing.assert_close(partial[0] + partial[1], moe(x), atol=1e-5, rtol=1e-4)


def test_grouped_q4k_experts_in_chunks_equal_the_per_expert_loop():
    """K-quant experts (one activation scale a super-block) wide enough that the kernel splits each
    expert's products into several row chunks on its work list, at 1 and 2 threads: the tokens' rows
    quantized once and gathered (or read in place where an expert's tokens are consecutive), batches
    whose expert row counts leave 1-4 rows past whole blocks of 8 (a call of their own) -- all equal to
    the per-expert loop bit for bit."""
    from types import SimpleNamespace

    from dashchat.engine.cpu.ops import kernel_silu_and_mul
    from dashchat.engine.quantization.gguf import GGUFPart
    from dashchat.engine.quantization.gguf_moe import grouped_gguf_experts, kernel_softmax_top_k
    from dashchat.models.layers import GatedMLP
    from engine.test_gguf_kernels import random_blocks

    hidden, width, count, top_k = 256, 512, 6, 2

    def linear(rows: int, cols: int, seeds: list[int]) -> GGUFLinear:
        parts = [GGUFPart("Q4_K", torch.from_numpy(random_blocks("Q4_K", rows, cols, s)), cols) for s in seeds]
        return GGUFLinear(cols, rows * len(seeds), parts)

    experts = torch.nn.ModuleList()
    for e in range(count):
        mlp = GatedMLP(hidden, width)
        mlp.gate_up_proj, mlp.down_proj = linear(width, hidden, [3 * e, 3 * e + 1]), linear(hidden, width, [3 * e + 2])
        mlp.act_and_mul = kernel_silu_and_mul
        experts.append(mlp)
    runner = grouped_gguf_experts(experts)
    assert runner is not None
    loop = SimpleNamespace(experts=experts, top_k=top_k)
    gen = torch.Generator().manual_seed(8)
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            with torch.inference_mode():
                for rows in (1, 3, 9, 14, 30):
                    x = torch.randn(rows, hidden, generator=gen)
                    weights, chosen = kernel_softmax_top_k(torch.randn(rows, count, generator=gen), top_k, True)
                    want = SparseMoE.run_experts(loop, x, weights, chosen)
                    torch.testing.assert_close(runner(x, weights, chosen), want, atol=0, rtol=0)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("grouped", [True, False])
def test_stacked_experts_equal_the_per_expert_loop(grouped, tmp_path):
    """The CUDA runner's arithmetic (engine/cuda/moe.py), run here on the CPU: tokens sorted by expert,
    torch._grouped_mm over the stacked weights (bfloat16, as on an H100) or one torch.mm a used expert
    (float32: the fallback) -- the per-expert loop's output; the experts keep views of the stacks."""
    from dashchat.engine.cuda.moe import GroupedExperts

    save_tiny("qwen3-moe", tmp_path)
    dtype = torch.bfloat16 if grouped else torch.float32
    model = _model(tmp_path).to(dtype)
    moe = model.layers[0].mlp
    assert GroupedExperts.eligible(moe.experts)
    runner = GroupedExperts(moe.experts, grouped=grouped)
    assert moe.experts[3].down_proj.weight.data_ptr() == runner.down[3].data_ptr()
    gen = torch.Generator().manual_seed(6)
    with torch.inference_mode():
        for rows in (1, 2, 11, 40):
            x = torch.randn(rows, 64, generator=gen).to(dtype)
            weights, chosen = moe.route(x)
            want = moe.run_experts(x, weights, chosen)
            tol = {"atol": 2e-2, "rtol": 2e-2} if grouped else {"atol": 1e-6, "rtol": 1e-5}
            torch.testing.assert_close(runner(x, weights, chosen), want, **tol)


@pytest.mark.parametrize("types", [("Q4_K", "Q4_K", "Q6_K"), ("Q8_0", "Q4_0", "Q5_0"), ("IQ4_XS", "IQ4_XS", "Q2_K")])
def test_interleaved_q4k_q6k_experts_equal_the_file_layout(types):
    """Experts loaded as the GGUF loader holds them (`_Blocks.part` over one copy of all experts):
    Q4_K gate/up and Q6_K down rows (or 32-value types), whole groups of 8, are interleaved in place expert by expert
    (the type id's ROWS8_LAYOUT bit), and the one-call expert kernel gives the file layout's output
    bit for bit at decode and prefill batches, 1 and 2 threads (row chunks start on groups); an
    expert tensor whose rows are not whole groups keeps the file's layout."""
    import numpy as np

    from dashchat.engine.cpu.ops import kernel_silu_and_mul
    from dashchat.engine.quantization.gguf import ROWS8_LAYOUT, GGUFPart
    from dashchat.engine.quantization.gguf_loading import _Blocks, _ExpertCopy
    from dashchat.engine.quantization.gguf_moe import grouped_gguf_experts, kernel_softmax_top_k
    from dashchat.models.layers import GatedMLP
    from engine.test_gguf_kernels import random_blocks

    hidden, width, count, top_k = 256, 512, 6, 2

    def stacked(type_name: str, rows: int, cols: int, seed: int):
        blocks = [random_blocks(type_name, rows, cols, seed + e) for e in range(count)]
        return np.stack(blocks), type_name, cols

    tensors = [stacked(types[0], width, hidden, 0), stacked(types[1], width, hidden, 100),
               stacked(types[2], hidden, width, 200)]

    def experts(loaded: bool) -> torch.nn.ModuleList:
        parts = []
        for view, type_name, cols in tensors:
            copy = _ExpertCopy(view, type_name, cols)
            parts.append([_Blocks(type_name, view[e], cols, cols, 0, "blk", lambda e=e: copy.expert(e)).part()
                          if loaded else GGUFPart(type_name, torch.from_numpy(view[e].copy()), cols)
                          for e in range(count)])
        out = torch.nn.ModuleList()
        for e in range(count):
            mlp = GatedMLP(hidden, width)
            mlp.gate_up_proj = GGUFLinear(hidden, 2 * width, [parts[0][e], parts[1][e]])
            mlp.down_proj = GGUFLinear(width, hidden, [parts[2][e]])
            mlp.act_and_mul = kernel_silu_and_mul
            out.append(mlp)
        return out

    interleaved, file_layout = experts(True), experts(False)
    for mlp in interleaved:
        assert all(p.type_id & ROWS8_LAYOUT for p in (*mlp.gate_up_proj.parts, *mlp.down_proj.parts))
    assert not any(p.type_id & ROWS8_LAYOUT for mlp in file_layout for p in mlp.gate_up_proj.parts)
    runners = grouped_gguf_experts(interleaved), grouped_gguf_experts(file_layout)
    assert None not in runners
    gen = torch.Generator().manual_seed(9)
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            with torch.inference_mode():
                for rows in (1, 5, 16):
                    x = torch.randn(rows, hidden, generator=gen)
                    weights, chosen = kernel_softmax_top_k(torch.randn(rows, count, generator=gen), top_k, True)
                    want = runners[1](x, weights, chosen)
                    torch.testing.assert_close(runners[0](x, weights, chosen), want, atol=0, rtol=0)
    finally:
        torch.set_num_threads(threads)
    view = np.stack([random_blocks("Q4_K", 12, hidden, e) for e in range(2)])
    copy = _ExpertCopy(view, "Q4_K", hidden)
    part = _Blocks("Q4_K", view[1], hidden, hidden, 0, "blk", lambda: copy.expert(1)).part()
    assert not part.interleaved and torch.equal(part.data, torch.from_numpy(view[1]))
