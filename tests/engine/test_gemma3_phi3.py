"""Gemma 3 and Phi-3 / Phi-4-mini against transformers (float32) on tiny random checkpoints: the
model code through the paged attention (whole, chunked, decoded token by token), then the engine
(several requests at once, chunked prefill, a prefix hit, decoding past Phi-3's original context)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from dashchat.engine.args import EngineArgs
from dashchat.engine.native.llm_engine import AsyncLLMEngine
from dashchat.engine.types import SamplingParams
from dashchat.models.config import ModelConfig, UnsupportedModelError
from dashchat.models.registry import build_model
from dashchat.models.weights import iter_weights
from engine_helpers import collect, greedy_tokens
from llama_cpp import convert_to_gguf
from tiny_dense import FAMILIES, paged_logits, rank_paged_logits, save_tiny_dense, save_tiny_gemma3_multimodal
from tiny_models import save_word_tokenizer

transformers = pytest.importorskip("transformers")

IDS = torch.randint(3, 300, (40,), generator=torch.Generator().manual_seed(1)).tolist()


def _ours(path) -> torch.nn.Module:
    model = build_model(ModelConfig.from_dir(path))
    model.load_weights(iter_weights(path))
    return model.eval()


@pytest.mark.parametrize("family", [*sorted(FAMILIES), "gemma3-multimodal"])
def test_logits_match_transformers(family, tmp_path):
    """Prompt longer than every window: whole, in chunks over the cached ones, then decodes."""
    ref = save_tiny_gemma3_multimodal(tmp_path) if family == "gemma3-multimodal" else save_tiny_dense(family, tmp_path)
    ours = _ours(tmp_path)
    with torch.inference_mode():
        expected = ref(torch.tensor([IDS])).logits[0].float()
    for chunks in (None, [13, 14, 13], [30] + [1] * 10):
        torch.testing.assert_close(paged_logits(ours, IDS, chunks), expected, atol=2e-4, rtol=1e-4,
                                   msg=f"{family} {chunks}")


@pytest.mark.parametrize("family", ["gemma3", "phi3"])
def test_int8_smoothing_keeps_the_float_function(family, tmp_path):
    """SmoothQuant folds its scales into the norm before each linear: for Gemma that is the
    pre-feedforward norm (its post-attention norm feeds the residual, not the MLP)."""
    from dashchat.engine.quantization.int8 import smooth_activations

    save_tiny_dense(family, tmp_path)
    ours = _ours(tmp_path)
    before = paged_logits(ours, IDS)
    with torch.inference_mode():
        smooth_activations(ours, torch.tensor(IDS))
    torch.testing.assert_close(paged_logits(ours, IDS), before, atol=1e-4, rtol=1e-4)


def test_config_fields(tmp_path):
    save_tiny_dense("gemma3", tmp_path)
    cfg = ModelConfig.from_dir(tmp_path)
    assert cfg.layer_windows == [8] * 5 + [None] and cfg.rope_local_theta == 10_000.0 and cfg.rope_theta == 1e6
    assert cfg.rope_scaling["factor"] == 2.0 and cfg.attention_scale == 24**-0.5
    # a hub multimodal config names only what differs from Gemma3TextConfig's defaults
    hub = ModelConfig.from_dict({"architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3",
                                 "text_config": {"hidden_size": 2560, "intermediate_size": 10240,
                                                 "num_hidden_layers": 34, "sliding_window": 1024,
                                                 "rope_scaling": {"factor": 8.0, "rope_type": "linear"}}})
    assert (hub.num_heads, hub.num_kv_heads, hub.head_dim, hub.vocab_size) == (8, 4, 256, 262_208)
    assert hub.layer_windows[:6] == [1024] * 5 + [None] and hub.tie_word_embeddings
    assert (hub.rope_theta, hub.rope_local_theta, hub.rope_scaling["factor"]) == (1e6, 1e4, 8.0)
    # Phi-4-mini's hub config (transformers < 5 layout)
    phi = ModelConfig.from_dict({"architectures": ["Phi3ForCausalLM"], "hidden_size": 3072, "num_attention_heads": 24,
                                 "num_key_value_heads": 8, "intermediate_size": 8192, "num_hidden_layers": 32,
                                 "vocab_size": 200064, "partial_rotary_factor": 0.75, "max_position_embeddings": 131072,
                                 "original_max_position_embeddings": 4096, "sliding_window": 262144,
                                 "rope_scaling": {"type": "longrope", "short_factor": [1.0] * 48,
                                                  "long_factor": [2.0] * 48}})
    assert phi.rotary_dim == 96 and phi.layer_windows == [None] * 32
    assert phi.rope_scaling["original_max_position_embeddings"] == 4096 and phi.rope_scaling["rope_type"] == "longrope"
    with pytest.raises(UnsupportedModelError, match="Gemma3ForCausalLM.*Phi3ForCausalLM"):
        ModelConfig.from_dict({"architectures": ["Gemma2ForCausalLM"]})


_CUDA = pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible"))


@pytest.fixture
def _exact_float32():
    """TF32 matmuls would make CUDA float32 drift from the reference; restore the setting after."""
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


@pytest.mark.parametrize("device", ["cpu", _CUDA])
@pytest.mark.parametrize("family", ["gemma3", "phi3"])
def test_engine_greedy_matches_transformers(family, device, tmp_path, _exact_float32):
    """Five requests at once in 24-token steps (chunked prefill beside decodes), then one whose
    prompt repeats the first's (a prefix hit). Phi-3's decodes pass its original context (64):
    from there its keys take the long factors, as in transformers' cached generation."""
    ref = save_tiny_dense(family, tmp_path)
    save_word_tokenizer(tmp_path, eos="t2")
    prompts = [[(7 * i + 3 * j) % 290 + 5 for j in range(n)] for i, n in enumerate([3, 21, 9, 45, 14])]
    new_tokens = [12, 40, 6, 30, 16]
    repeat = prompts[3] + [17, 18, 19]
    expected = greedy_tokens(ref, [*prompts, repeat], [*new_tokens, 8])
    engine = AsyncLLMEngine.from_args(EngineArgs(model_dir=str(tmp_path), max_model_len=128, block_size=4,
                                                 max_num_batched_tokens=24, device=device, dtype="float32"))
    try:
        def params(n: int) -> SamplingParams:
            return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)

        async def run() -> tuple[list[list[int]], list[int], int]:
            outs = await asyncio.gather(*(collect(engine, p, params(n), delay=0.01 * i)
                                          for i, (p, n) in enumerate(zip(prompts, new_tokens))))
            hits = engine.stats().prefix_cache_hits
            again = await collect(engine, repeat, params(8))
            return [o[0].token_ids for o in outs], again[0].token_ids, engine.stats().prefix_cache_hits - hits

        together, again, hits = asyncio.run(run())
        assert together == expected[:5]
        assert again == expected[5]
        assert hits >= 40
    finally:
        engine.shutdown()


# ---------------------------------------------------------------- GGUF, as llama.cpp's converter writes it

@pytest.fixture(scope="module")
def gguf_dirs(tmp_path_factory) -> dict[str, Path]:
    """Each family's tiny model (SmolLM2's tokenizer: the converter needs a real one) through
    llama.cpp's convert_hf_to_gguf.py at Q8_0, then dashchat's GGUF conversion."""
    from dashchat.models.gguf_convert import convert_gguf
    from dashchat.models.resolve import resolve_model

    tokenizer = resolve_model("smollm2-135m-instruct").path
    root = tmp_path_factory.mktemp("gguf")
    runs = []
    for family in ("gemma3", "phi3"):
        hf = root / f"{family}-hf"
        hf.mkdir()
        save_tiny_dense(family, hf, tokenizer)
        runs.append((hf, root / f"{family}.gguf", "q8_0"))
    convert_to_gguf(runs)
    out = {family: convert_gguf(root / f"{family}.gguf", root / "cache") for family in ("gemma3", "phi3")}
    return out


@pytest.mark.parametrize("family", ["gemma3", "phi3"])
def test_gguf_matches_transformers(family, gguf_dirs):
    """The GGUF's config and tensors read back: its dequantized weights give transformers' logits
    (Gemma's norms come back as w, not llama.cpp's 1 + w; Phi-3's LongRoPE from its factor
    tensors); the blocks path holds the same weights (Phi-3's fused tensors as q/k/v and
    gate/up parts) and stays close on its int8 activations."""
    from dashchat.engine.quantization.gguf import GGUFLinear
    from dashchat.engine.quantization.gguf_loading import gguf_source, load_gguf_model
    from dashchat.models.layers import materialize_rotary
    from dashchat.models.parallel import ShardPlan

    d = gguf_dirs[family]
    cfg = ModelConfig.from_dir(d)
    ours = _ours(d)  # writes the dequantized float32 weights transformers reads next
    ref = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    ids = IDS + [40_000, 45_000]
    with torch.inference_mode():
        expected = ref(torch.tensor([ids])).logits[0].float()
    torch.testing.assert_close(paged_logits(ours, ids, [25, 10, 1, 1, 1, 1, 1, 1, 1]), expected, atol=2e-4, rtol=1e-4)

    with torch.device("meta"):
        blocks = build_model(cfg)
    counts = load_gguf_model(blocks, gguf_source(d), cfg, ShardPlan(cfg, 0, 1))
    assert counts == {"gguf": 4 * cfg.num_layers + 1, "float": 0, "embedding": 1}
    materialize_rotary(blocks, "cpu")
    floats = dict(ours.named_modules())
    for name, layer in blocks.named_modules():
        if isinstance(layer, GGUFLinear):
            torch.testing.assert_close(layer.dequantize(), floats[name].weight, rtol=1e-6, atol=1e-6, msg=name)
    got = paged_logits(blocks.eval(), ids)
    assert (got - expected).abs().max() < 0.1 * expected.abs().max()
    assert (got.argmax(-1) == expected.argmax(-1)).float().mean() >= 0.9


def test_gguf_at_two_ranks_matches_one_rank(gguf_dirs, tmp_path):
    """Each rank holds its rows of the blocks (Phi-3's fused tensors cut into parts first) and its
    32-value groups of o_proj / down_proj: the integer products are the one-rank ones, but the float
    sums over ranks round differently and the next layer's int8 activations can carry that (as for
    Qwen: tests/distributed/test_tp_layers.py), so two ranks must be as close to the float model
    as one rank is, with the same tokens."""
    import torch.multiprocessing as mp

    from dashchat.distributed.launch import free_port
    from dashchat.engine.quantization.gguf_loading import gguf_source, load_gguf_model
    from dashchat.models.layers import materialize_rotary
    from dashchat.models.parallel import ShardPlan

    dirs = [str(gguf_dirs[f]) for f in ("gemma3", "phi3")]
    chunks = [len(IDS) - 3, 1, 1, 1]
    mp.start_processes(rank_paged_logits, args=(2, free_port("127.0.0.1"), dirs, IDS, chunks, str(tmp_path), True),
                       nprocs=2, start_method="spawn")
    for i, d in enumerate(dirs):
        cfg = ModelConfig.from_dir(d)
        with torch.device("meta"):
            model = build_model(cfg)
        load_gguf_model(model, gguf_source(d), cfg, ShardPlan(cfg, 0, 1))
        materialize_rotary(model, "cpu")
        one = paged_logits(model.eval(), IDS, chunks)
        two = torch.load(tmp_path / f"logits-{i}.pt")
        float32 = paged_logits(_ours(d), IDS, chunks)
        assert two.shape == one.shape
        assert (two.argmax(-1) == one.argmax(-1)).float().mean() >= 0.9, d
        assert (two - float32).abs().mean() <= 1.5 * (one - float32).abs().mean(), d
