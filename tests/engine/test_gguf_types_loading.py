"""A GGUF file of the types beside the common 4-8 bit ones (Q2_K, Q3_K, IQ4_NL, IQ4_XS, F16, BF16,
and IQ2_XXS, which has no kernel) loads in `--quantization gguf` with every linear and the
embedding held compactly: each as the file ships it, the kernel-less type as bf16 rows (logged
once, with its cost), never as float32; a model that cannot fit the memory available is refused
before anything is copied.

The file is a tiny random qwen2 model written with the `gguf` package: random blocks are valid data
as long as their fp16 scales are finite (see test_gguf_kernels.random_blocks).
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from test_gguf_kernels import _FP16_FIELDS, random_blocks
from test_gguf_loading import float_model, gguf_model
from torch import nn

from dashchat.engine.args import EngineArgs
from dashchat.engine.cpu.kernels import kernel_library
from dashchat.engine.native.llm_engine import AsyncLLMEngine
from dashchat.engine.quantization import gguf_loading
from dashchat.engine.quantization.gguf import GGUFLinear
from dashchat.engine.quantization.gguf_embedding import GGUFEmbedding
from dashchat.engine.quantization.gguf_loading import gguf_source, load_gguf_linears
from dashchat.engine.quantization.int8 import _causal_attention
from dashchat.engine.types import SamplingParams
from dashchat.models.gguf_convert import convert_gguf
from dashchat.models.config import ModelConfig
from dashchat.models.parallel import ShardPlan, TensorParallel
from engine_helpers import collect
from test_gguf_convert import byte_level_vocab

pytestmark = pytest.mark.skipif(kernel_library() is None, reason="no C compiler: kernels unavailable")

Q = gguf.GGMLQuantizationType
HIDDEN, HEADS, KV_HEADS, HEAD_DIM, FFN, LAYERS = 256, 4, 2, 64, 512, 2
# per layer: q, k, v, o, gate, up, down (down's rows are 512 wide, so K-quant blocks of 256 fit all)
LAYER_TYPES = [("Q2_K", "Q3_K", "IQ4_NL", "IQ4_XS", "F16", "BF16", "Q3_K"),
               ("Q2_K", "Q4_K", "Q6_K", "IQ2_XXS", "IQ4_XS", "IQ4_NL", "Q5_K")]  # fmt: skip
EMBEDDING_TYPE, HEAD_TYPE = "Q3_K", "BF16"


def blocks(type_name: str, rows: int, cols: int, seed: int) -> np.ndarray:
    """Random blocks whose values are small enough (fp16 scales a tenth of random_blocks') that the
    random model's attention is not one-hot: its logits then move with the weights' rounding smoothly."""
    if type_name in ("F16", "BF16"):
        return random_blocks(type_name, rows, cols, seed)
    fields = {"IQ2_XXS": (0,)}.get(type_name) or _FP16_FIELDS[type_name]
    if type_name == "IQ2_XXS":  # no kernel, so not among random_blocks' types: an fp16 scale, then codes
        bs, ts = gguf.GGML_QUANT_SIZES[Q.IQ2_XXS]
        data = np.random.default_rng(seed).integers(0, 256, size=(rows, cols // bs * ts), dtype=np.uint8)
    else:
        data = random_blocks(type_name, rows, cols, seed)
    _, ts = gguf.GGML_QUANT_SIZES[Q[type_name]]
    view = data.reshape(rows, -1, ts)
    for off in fields:
        scale = np.random.default_rng(seed + off).standard_normal(view.shape[:2]) * 0.002
        view[:, :, off : off + 2] = scale.astype(np.float16).view(np.uint8).reshape(*view.shape[:2], 2)
    return data


def write_gguf(path: Path, tied_type: str | None = None) -> None:
    """tied_type: the embedding's type, shared by the head (no output.weight in the file)."""
    tokens, types, merges = byte_level_vocab()
    w = gguf.GGUFWriter(str(path), "qwen2")
    w.add_name("tiny-types")
    w.add_block_count(LAYERS)
    w.add_context_length(256)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_key_length(HEAD_DIM)
    w.add_value_length(HEAD_DIM)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_merges(merges)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_bos_token_id(tokens.index("<|endoftext|>"))
    w.add_eos_token_id(tokens.index("<|im_end|>"))
    seed = iter(range(1000))
    rng = np.random.default_rng(0)

    def weight(name: str, type_name: str, rows: int, cols: int) -> None:
        w.add_tensor(name, blocks(type_name, rows, cols, next(seed)), raw_dtype=Q[type_name])

    def floats(name: str, *shape: int, base: float = 0.0) -> None:
        w.add_tensor(name, (base + 0.1 * rng.standard_normal(shape)).astype(np.float32))

    weight("token_embd.weight", tied_type or EMBEDDING_TYPE, len(tokens), HIDDEN)
    q, kv = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
    for i, kinds in enumerate(LAYER_TYPES):
        p = f"blk.{i}."
        floats(p + "attn_norm.weight", HIDDEN, base=1.0)
        floats(p + "ffn_norm.weight", HIDDEN, base=1.0)
        for name, type_name, rows, cols in zip(("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up",
                                                "ffn_down"), kinds, (q, kv, kv, HIDDEN, FFN, FFN, HIDDEN),
                                               (HIDDEN, HIDDEN, HIDDEN, q, HIDDEN, HIDDEN, FFN)):
            weight(f"{p}{name}.weight", type_name, rows, cols)
        for name, n in (("attn_q", q), ("attn_k", kv), ("attn_v", kv)):
            floats(f"{p}{name}.bias", n)
    floats("output_norm.weight", HIDDEN, base=1.0)
    if tied_type is None:
        weight("output.weight", HEAD_TYPE, len(tokens), HIDDEN)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = tmp_path_factory.mktemp("types")
    write_gguf(root / "tiny-types.gguf")
    return str(convert_gguf(root / "tiny-types.gguf", cache_root=root / "cache"))


@pytest.mark.parametrize("rank,size", [(0, 1), (1, 2)])
def test_every_type_loads_compactly_and_computes_the_reference(model_dir: str, caplog, rank: int, size: int) -> None:
    """On one rank, and on a rank of two (o_proj/down_proj keep the blocks that cover their input
    slice: o_proj's 128 inputs a rank cut through 256-value IQ4_XS and IQ2_XXS blocks)."""
    tp = TensorParallel(rank, size)
    with caplog.at_level(logging.WARNING, logger=gguf_loading.__name__):
        ours, counts = gguf_model(model_dir, tp)
    assert counts == {"gguf": 4 * LAYERS + 1, "float": 0, "embedding": 1}
    # the kernel-less type: said once, with what it costs
    said = [r.getMessage() for r in caplog.records if "no kernel" in r.getMessage()]
    assert len(said) == 1 and "1 tensors of type IQ2_XXS" in said[0] and "held as bf16, 0.00 GB" in said[0], said
    ref = float_model(model_dir, tp)
    linears = {name: m for name, m in ref.named_modules() if isinstance(m, nn.Linear)}
    layers = {name: m for name, m in ours.named_modules() if isinstance(m, GGUFLinear)}
    assert set(layers) == set(linears)
    held = {p.type_name for layer in layers.values() for p in layer.parts}
    assert held == {"Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS", "F16", "BF16"}
    for name, layer in layers.items():
        want = linears[name].weight
        if name == "layers.1.self_attn.o_proj":  # IQ2_XXS: the reference rounded to bf16, 2 bytes a value
            want = want.bfloat16().float()
            assert layer.parts[0].type_name == "BF16" and layer.nbytes == 2 * HIDDEN * HEADS * HEAD_DIM
        torch.testing.assert_close(layer.dequantize(), want, rtol=1e-6, atol=1e-6, msg=name)
    embedding = ours.embed_tokens
    assert isinstance(embedding, GGUFEmbedding) and embedding.type_name == EMBEDDING_TYPE
    torch.testing.assert_close(embedding.rows(torch.arange(embedding.num_rows)),
                               ref.embed_tokens.weight[: embedding.num_rows], rtol=1e-6, atol=1e-6)
    # no float32 tensor of a linear's size
    smallest = min(m.weight.numel() for m in linears.values())
    assert all(t.numel() < smallest for n, t in [*ours.named_parameters(), *ours.named_buffers()]
               if t.is_floating_point() and not n.startswith("rotary."))
    if size > 1:
        return  # the logits need every rank
    # The logits: those of the float model with its linears swapped for the same GGUF layers (loading
    # straight from the file builds what swapping does), and near the float model's own (int8
    # activations through a random model, and one layer's weights rounded to bf16).
    ids = torch.tensor([5, 77, 200, 31, 9, 140, 66, 250, 3, 18, 101, 42])

    @torch.inference_mode()
    def logits(model: nn.Module) -> torch.Tensor:
        return model.compute_logits(model(ids, torch.arange(len(ids)), _causal_attention))

    got, want = logits(ours), logits(ref)
    assert ((got - want).norm() / want.norm()).item() < 0.1
    cfg = ModelConfig.from_dir(model_dir)
    load_gguf_linears(ref, gguf_source(model_dir), cfg, ShardPlan(cfg, 0, 1))
    torch.testing.assert_close(got, logits(ref), rtol=1e-4, atol=1e-4)


def test_a_model_that_cannot_fit_is_refused_with_the_numbers(model_dir: str, monkeypatch) -> None:
    monkeypatch.setattr(gguf_loading, "mem_available", lambda: 1_000_000)
    with pytest.raises(MemoryError, match=r"needs 0\.\d\d GB of memory \(.* held as bf16 .*\) but only 0\.00 GB is "
                                          r"available \(MemAvailable\)"):
        gguf_model(model_dir)


@pytest.mark.parametrize("type_name", ["Q6_K", "Q4_K", "Q8_0", "IQ4_XS", "Q2_K"])
def test_a_tied_table_is_interleaved_for_its_head(tmp_path: Path, type_name: str) -> None:
    """A tied embedding table of a type with an 8-row layout is interleaved once, for the head's
    products; the lookup still reads every row as gguf-py dequantizes it (the rows of whole groups
    and the few after them), and the logits are those of the float model with GGUF layers swapped
    in (its head a copy of its own)."""
    write_gguf(tmp_path / "tied.gguf", tied_type=type_name)
    model_dir = str(convert_gguf(tmp_path / "tied.gguf", cache_root=tmp_path / "cache"))
    ours, counts = gguf_model(model_dir)
    assert counts["embedding"] == 1
    embedding, head = ours.embed_tokens, ours.lm_head.parts[0]
    assert embedding.interleaved and head.interleaved and embedding.num_rows % 8  # a partial group at the end
    assert head.data.data_ptr() == embedding.blocks.data_ptr()  # still one copy
    ref = float_model(model_dir)
    torch.testing.assert_close(embedding.rows(torch.arange(embedding.num_rows)), ref.embed_tokens.weight,
                               rtol=1e-6, atol=1e-6)
    ids = torch.tensor([5, 77, 200, 31, 9, 140, 66, 250, 3, 18, 101, 42])

    @torch.inference_mode()
    def logits(model: nn.Module, n: int) -> torch.Tensor:
        return model.compute_logits(model(ids[:n], torch.arange(n), _causal_attention))

    cfg = ModelConfig.from_dir(model_dir)
    load_gguf_linears(ref, gguf_source(model_dir), cfg, ShardPlan(cfg, 0, 1))
    for n in (1, len(ids)):
        torch.testing.assert_close(logits(ours, n), logits(ref, n), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("type_name", ["F16", "BF16", "IQ4_NL", "IQ4_XS", "Q2_K"])
def test_embedding_rows_of_the_new_types(type_name: str) -> None:
    """An embedding table of these types dequantizes the rows it is asked for as gguf-py does."""
    vocab = 37
    data = random_blocks(type_name, vocab, HIDDEN, 4)
    embedding = GGUFEmbedding(type_name, torch.from_numpy(data), HIDDEN)
    ids = torch.tensor([0, vocab - 1, 5, 5, 20])
    want = np.asarray(gguf.quants.dequantize(data[ids.numpy()], Q[type_name]), dtype=np.float32)
    torch.testing.assert_close(embedding(ids), torch.from_numpy(want), rtol=0, atol=0)


def test_engine_serves_the_file(model_dir: str) -> None:
    """The engine decodes from it (16-bit layers take the module path, the rest the fused step): a
    prompt's greedy tokens are the same alone and beside another one."""
    engine = AsyncLLMEngine.from_args(EngineArgs(model_dir=model_dir, max_model_len=64, quantization="gguf",
                                                 kv_cache_memory_gb=0.01))
    try:
        assert any(isinstance(m, GGUFLinear) and m.parts[0].type_name == "F16" for m in engine.runner.model.modules())
        params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
        prompts = [[5, 77, 200, 31], [9, 140, 66, 250, 3, 18]]

        async def run(batch: list[list[int]]) -> list[list[int]]:
            return [o[0].token_ids for o in await asyncio.gather(*(collect(engine, p, params) for p in batch))]

        together = asyncio.run(run(prompts))
        alone = asyncio.run(run(prompts[:1]))
    finally:
        engine.shutdown()
    assert [len(t) for t in together] == [8, 8] and alone[0] == together[0]
