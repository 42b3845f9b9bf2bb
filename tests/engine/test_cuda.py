"""The engine on a CUDA device, on tiny random checkpoints; skipped where no GPU is visible.

float32 with TF32 off must give transformers' greedy tokens exactly (alone, in a staggered
batch, and through the compiled decode graph); bfloat16, the CUDA default, must stay close to
float32 logits; seeds, aborts and preemption behave as on the CPU.
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from dashchat.engine.args import EngineArgs
from dashchat.engine.cuda.graphs import PaddedDecode
from dashchat.engine.native.llm_engine import AsyncLLMEngine
from dashchat.engine.quantization.int8 import _causal_attention
from dashchat.engine.types import SamplingParams
from dashchat.models.config import ModelConfig
from dashchat.models.registry import build_model
from dashchat.models.weights import iter_weights
from engine_helpers import collect, greedy_tokens
from test_model_families import _save_tiny, _save_word_tokenizer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible")

PROMPTS = [[(7 * i + 3 * j) % 310 + 5 for j in range(n)] for i, n in enumerate([3, 18, 9, 30, 14, 40, 1, 25])]
NEW_TOKENS = [12, 20, 6, 15, 24, 9, 17, 11]


@pytest.fixture(autouse=True)
def _exact_float32():
    """TF32 matmuls would make float32 drift from the reference; restore the setting after."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def _greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


def _reference(family: str, path) -> list[list[int]]:
    ref = _save_tiny(family, path).to("cuda")
    _save_word_tokenizer(path, eos="t2")  # ignore_eos in the engine; the reference never stops early
    return greedy_tokens(ref, PROMPTS, NEW_TOKENS)


def _run_all(engine: AsyncLLMEngine) -> tuple[list[int], list[list[int]]]:
    async def run() -> tuple[list[int], list[list[int]]]:
        alone = await collect(engine, PROMPTS[0], _greedy(NEW_TOKENS[0]))
        together = await asyncio.gather(
            *(collect(engine, p, _greedy(n), delay=0.01 * i) for i, (p, n) in enumerate(zip(PROMPTS, NEW_TOKENS)))
        )
        return alone[0].token_ids, [o[0].token_ids for o in together]

    return asyncio.run(run())


def _graphs(engine: AsyncLLMEngine) -> int:
    decode = engine.runner._decode
    return len(decode.graphs) if isinstance(decode, PaddedDecode) else 0


@pytest.mark.parametrize("enforce_eager", [False, True], ids=["cuda-graphs", "eager"])
@pytest.mark.parametrize("family", ["llama3-rope-scaling", "qwen2-tied", "qwen3"])
def test_float32_greedy_matches_transformers(family, enforce_eager, tmp_path):
    expected = _reference(family, tmp_path)
    engine = AsyncLLMEngine.from_args(
        EngineArgs(model_dir=str(tmp_path), device="cuda", dtype="float32", max_model_len=128, block_size=16,
                   max_num_seqs=6, enforce_eager=enforce_eager)
    )
    try:
        assert engine.runner.kv_cache[0][0].device.type == "cuda"
        alone, together = _run_all(engine)
        assert alone == expected[0]
        assert together == expected
        # batches of 1..6 and tables of 1..4 blocks: several buckets, each captured once
        assert _graphs(engine) == 0 if enforce_eager else _graphs(engine) >= 3
    finally:
        engine.shutdown()


def test_compiled_decode_matches_transformers(tmp_path):
    expected = _reference("llama3-rope-scaling", tmp_path)
    engine = AsyncLLMEngine.from_args(
        EngineArgs(model_dir=str(tmp_path), device="cuda", dtype="float32", max_model_len=128, compile=True)
    )
    torch.compiler.set_stance("fail_on_recompile")
    try:
        alone, together = _run_all(engine)
        assert alone == expected[0]
        assert together == expected
        assert engine.runner.compiled_decode_steps > 0
        assert _graphs(engine) > 0  # the compiled step replayed as CUDA graphs
    finally:
        torch.compiler.set_stance("default")
        engine.shutdown()


@pytest.mark.parametrize("family", ["llama3-rope-scaling", "qwen2-tied"])
def test_bfloat16_logits_close_to_float32(family, tmp_path):
    """--dtype auto is bfloat16 on CUDA: its logits stay within bfloat16 rounding of float32's."""
    ref = _save_tiny(family, tmp_path)
    cfg = ModelConfig.from_dir(tmp_path)
    ours = build_model(cfg)
    ours.load_weights(iter_weights(tmp_path))
    ours = ours.to("cuda", torch.bfloat16).eval()
    ids = torch.randint(0, 320, (40,), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        expected = ref(ids[None]).logits[0].float()
        got = ours.compute_logits(ours(ids.cuda(), torch.arange(len(ids), device="cuda"), _causal_attention))
    assert ours.lm_head.weight.dtype == torch.bfloat16  # logits come back in float32
    scale = expected.abs().max().item()
    torch.testing.assert_close(got.float().cpu(), expected, atol=0.03 * scale, rtol=0.0)


def test_bfloat16_engine_serves_and_seeds_reproduce(tmp_path):
    _save_tiny("qwen2-tied", tmp_path)
    _save_word_tokenizer(tmp_path)
    engine = AsyncLLMEngine.from_args(EngineArgs(model_dir=str(tmp_path), device="cuda", max_model_len=128))
    try:
        assert engine.runner.dtype == torch.bfloat16  # auto on CUDA
        assert engine.scheduler.max_num_batched_tokens == 2048  # the CUDA default step budget
        seeded = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, seed=7, ignore_eos=True, logprobs=2)

        async def run():
            alone = await collect(engine, PROMPTS[1], seeded)
            crowd = await asyncio.gather(
                collect(engine, PROMPTS[1], seeded),
                *(collect(engine, p, SamplingParams(max_tokens=16, temperature=1.0, ignore_eos=True)) for p in PROMPTS),
            )
            return alone[0], crowd[0][0]

        alone, in_crowd = asyncio.run(run())
        assert len(alone.token_ids) == 16 and all(0 <= t < 320 for t in alone.token_ids)
        assert alone.token_ids == in_crowd.token_ids  # the same seed, whatever else is in the batch
        assert all(lp.logprob <= 0.0 and len(lp.top) == 2 for lp in alone.logprobs)
    finally:
        engine.shutdown()


def test_abort_and_preemption_on_cuda(tmp_path):
    """A KV cache of a few blocks forces preemption; aborting frees every block."""
    expected = _reference("qwen2-tied", tmp_path)
    engine = AsyncLLMEngine.from_args(
        EngineArgs(model_dir=str(tmp_path), device="cuda", dtype="float32", max_model_len=64, block_size=16,
                   kv_cache_memory_gb=6 * 16 * engine_kv_bytes(tmp_path) / 2**30)
    )
    try:
        async def run():
            results = await asyncio.gather(*(collect(engine, p, _greedy(n)) for p, n in zip(PROMPTS, NEW_TOKENS)))
            stream = engine.generate(PROMPTS[3], _greedy(20), "to-abort")
            await stream.__anext__()
            await stream.aclose()  # the client hangs up: the engine frees the request's KV
            for _ in range(100):
                if engine.stats().kv_blocks_used == 0:
                    break
                await asyncio.sleep(0.02)
            return [r[0].token_ids for r in results]

        assert asyncio.run(run()) == expected
        assert engine.stats().num_preemptions > 0
        assert engine.stats().kv_blocks_used == 0
    finally:
        engine.shutdown()


def engine_kv_bytes(model_dir) -> int:
    from dashchat.engine.native.model_runner import ModelRunner

    return ModelRunner.kv_bytes_per_token(ModelConfig.from_dir(model_dir), torch.float32)


def test_moe_grouped_gemm_matches_the_cpu_reference(tmp_path):
    """A Qwen3-MoE layer on CUDA: bfloat16 through the grouped GEMM (sm90+, else the per-expert
    torch.mm fallback) and float32 through the fallback, against the float32 CPU module path."""
    from dashchat.engine.cuda.moe import GroupedExperts, grouped_mm_available, use_grouped_experts
    from dashchat.models.moe import SparseMoE
    from tiny_models import save_tiny

    save_tiny("qwen3-moe", tmp_path)
    ref = build_model(ModelConfig.from_dir(tmp_path))
    ref.load_weights(iter_weights(tmp_path))
    ref_moe = ref.eval().layers[0].mlp
    x = torch.randn(37, ref.config.hidden_size, generator=torch.Generator().manual_seed(7))
    with torch.inference_mode():
        want = ref_moe(x)
    for dtype, tol in ((torch.bfloat16, 3e-2), (torch.float32, 1e-4)):
        model = build_model(ModelConfig.from_dir(tmp_path))
        model.load_weights(iter_weights(tmp_path))
        model = model.eval().to("cuda", dtype)
        assert use_grouped_experts(model) == sum(isinstance(m, SparseMoE) for m in model.modules())
        moe = model.layers[0].mlp
        runner = moe.expert_runner
        assert isinstance(runner, GroupedExperts)
        assert runner.grouped == grouped_mm_available(runner.gate_up)
        if dtype == torch.bfloat16 and torch.cuda.get_device_capability() >= (9, 0):
            assert runner.grouped  # the H100 path: one launch a projection
        with torch.inference_mode():
            got = moe(x.to("cuda", dtype)).float().cpu()
        torch.testing.assert_close(got, want, atol=tol, rtol=tol)
