"""Pooling requests in the native engine, against sentence-transformers and transformers on tiny
random Qwen3 folders (tests/tiny_embeddings.py): the folder's own pooling, several prompts of
different lengths at once through chunked prefill, a prefix-cache hit, beside a generation, and
a reranker's yes/no logits."""

from __future__ import annotations

import asyncio

import pytest
import torch
from engine_helpers import collect
from tiny_embeddings import write_causal_with_st_files, write_reranker, write_st_model

from dashchat.engine.args import EngineArgs
from dashchat.engine.native.llm_engine import AsyncLLMEngine
from dashchat.engine.types import PoolingParams, SamplingParams
from dashchat.models.pooling import read_embedding_spec, resolve_task

TEXTS = ["a", "hello world", "the quick brown fox jumps over the lazy dog " * 3, "hello world, and more words"]


def _engine(path) -> AsyncLLMEngine:
    # 16-token steps and 4-token blocks: the long prompts are prefilled over several steps
    return AsyncLLMEngine.from_args(EngineArgs(model_dir=str(path), max_model_len=256, block_size=4,
                                               max_num_batched_tokens=16, kv_cache_memory_gb=0.01))


def _st_vectors(path) -> torch.Tensor:
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(path), device="cpu")
    return torch.stack([torch.from_numpy(model.encode(t)) for t in TEXTS])


async def _pool_all(engine: AsyncLLMEngine, pooling: str) -> list:
    prompts = [engine.tokenizer.encode(t, add_special_tokens=True) for t in TEXTS]
    return await asyncio.gather(*(engine.pool(p, PoolingParams(pooling), f"p{i}") for i, p in enumerate(prompts)))


def _finish(vec: torch.Tensor, normalize: bool) -> torch.Tensor:
    return torch.nn.functional.normalize(vec, dim=0) if normalize else vec


@pytest.mark.parametrize("layout", ["headless-last", "headless-mean", "causal-cls"])
def test_embeddings_match_sentence_transformers(layout, tmp_path):
    kind, pooling = layout.split("-")
    path = tmp_path / layout
    if kind == "headless":
        write_st_model(path, pooling)
    else:
        write_causal_with_st_files(path, pooling)
    spec = read_embedding_spec(path)
    assert (spec.pooling, spec.normalize) == (pooling, True)
    assert resolve_task("auto", path, None) == "embed"
    ref = _st_vectors(path)
    engine = _engine(path)
    try:
        outs = asyncio.run(_pool_all(engine, pooling))
        for out, want, text in zip(outs, ref, TEXTS):
            assert torch.allclose(_finish(out.hidden, spec.normalize), want, atol=1e-5), text
        assert engine.stats().kv_blocks_used == 0  # every pooling request gave its blocks back
    finally:
        engine.shutdown()


def test_prefix_cache_hit_and_beside_a_generation(tmp_path):
    path = write_st_model(tmp_path / "st", "last")
    ref = _st_vectors(path)
    engine = _engine(path)
    long_ids = engine.tokenizer.encode(TEXTS[2], add_special_tokens=True)
    greedy = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)

    async def run() -> tuple:
        alone = await collect(engine, long_ids, greedy)
        first = await engine.pool(long_ids, PoolingParams("last"), "first")
        # the same prompt again, while a generation (another prompt) decodes in the same steps
        gen, again, mean = await asyncio.gather(
            collect(engine, long_ids[::-1], greedy), engine.pool(long_ids, PoolingParams("last"), "again"),
            engine.pool(long_ids, PoolingParams("mean"), "mean"))
        beside = await asyncio.gather(collect(engine, long_ids, greedy), *_pool_many(engine))
        return alone, first, again, mean, gen, beside

    try:
        alone, first, again, mean, gen, beside = asyncio.run(run())
    finally:
        engine.shutdown()
    assert first.num_cached_tokens > 0  # the generation's prompt blocks were cached
    assert again.num_cached_tokens >= len(long_ids) - 4
    for out in (first, again):
        assert torch.allclose(_finish(out.hidden, True), ref[2], atol=1e-5)
    assert mean.num_cached_tokens == 0  # mean pooling needs every position: no cache reuse
    assert beside[0][0].token_ids == alone[0].token_ids  # pooling requests beside it change nothing
    assert len(gen[0].token_ids) == 12
    for out, want in zip(beside[1:], ref):
        assert torch.allclose(_finish(out.hidden, True), want, atol=1e-5)


def _pool_many(engine: AsyncLLMEngine) -> list:
    return [engine.pool(engine.tokenizer.encode(t, add_special_tokens=True), PoolingParams("last"), f"m{i}")
            for i, t in enumerate(TEXTS)]


def test_reranker_logits_match_transformers(tmp_path):
    import transformers

    path = write_reranker(tmp_path / "rr")
    engine = _engine(path)
    tok = engine.tokenizer
    yes, no = tok.token_to_id("yes"), tok.token_to_id("no")
    prompts = [tok.encode(f"<|im_start|>user\nIs {t} a fruit?<|im_end|>\n") for t in TEXTS]
    async def run() -> list:
        return await asyncio.gather(*(engine.pool(p, PoolingParams("last", [no, yes]), f"r{i}")
                                      for i, p in enumerate(prompts)))

    try:
        outs = asyncio.run(run())
    finally:
        engine.shutdown()
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    for out, ids in zip(outs, prompts):
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, -1]
        assert torch.allclose(out.logits, logits[[no, yes]], atol=1e-4)
