"""`--quantization gguf`: the model loads straight from the GGUF file's own blocks.

Each GGUF layer and the embedding must hold exactly the weights the float path loads (the names,
the fused q/k/v and gate/up order, llama's q/k row permutation, tensor-parallel slices); no float32
copy of a linear or of the embedding may exist, nor a float32 weights file; the engine must decode
with them, and the server must pick this mode by default for GGUF models on CPU.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize
from torch import nn

from dashchat.engine.args import EngineArgs
from dashchat.engine.cpu.kernels import kernel_library
from dashchat.engine.native.llm_engine import AsyncLLMEngine
from dashchat.engine.quantization.gguf import BLOCK_TYPES, GGUFLinear
from dashchat.engine.quantization.gguf_embedding import GGUFEmbedding
from dashchat.engine.quantization.gguf_loading import gguf_source, load_gguf_linears, load_gguf_model
from dashchat.engine.quantization.int8 import _causal_attention
from dashchat.engine.types import SamplingParams
from dashchat.models import gguf_convert
from dashchat.models.config import ModelConfig
from dashchat.models.gguf_convert import hf_float_tensors, open_gguf
from dashchat.models.parallel import ShardPlan, TensorParallel
from dashchat.models.registry import build_model
from dashchat.models.resolve import resolve_model
from engine_helpers import collect

pytestmark = pytest.mark.skipif(kernel_library() is None, reason="no C compiler: kernels unavailable")


def float_checkpoint(model_dir: str) -> list[tuple[str, torch.Tensor]]:
    """The float32 weights the float paths load (model.safetensors holds the same), from the GGUF."""
    reader = open_gguf(gguf_source(model_dir))
    config = json.loads((Path(model_dir) / "config.json").read_text())
    return [(name, torch.from_numpy(np.array(load()))) for name, _, load in
            hf_float_tensors({t.name: t for t in reader.tensors}, config)]


def float_model(model_dir: str, tp: TensorParallel = TensorParallel()) -> nn.Module:
    cfg = ModelConfig.from_dir(model_dir)
    with torch.device("meta"):
        model = build_model(cfg, tp)
    model = model.to_empty(device="cpu").float()
    if cfg.tie_word_embeddings:  # as the model runner does
        model.lm_head.weight = model.embed_tokens.weight
    model.load_weights(float_checkpoint(model_dir))
    return _fresh_rotary(model).eval()


def gguf_model(model_dir: str, tp: TensorParallel = TensorParallel()) -> tuple[nn.Module, dict[str, int]]:
    cfg = ModelConfig.from_dir(model_dir)
    with torch.device("meta"):
        model = build_model(cfg, tp)
    counts = load_gguf_model(model, gguf_source(model_dir), cfg, ShardPlan(cfg, tp.rank, tp.size))
    return _fresh_rotary(model).eval(), counts


def _fresh_rotary(model: nn.Module) -> nn.Module:
    cfg, rotary = model.config, model.rotary  # as the model runner does: tables built on the real device
    fresh = type(rotary)(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta, cfg.rope_scaling)
    rotary.cos, rotary.sin = fresh.cos, fresh.sin
    return model


def weightless_copy(model_dir: str, dest: Path) -> str:
    """The converted folder as this version writes it: config, tokenizer and source, no weights."""
    shutil.copytree(model_dir, dest, ignore=shutil.ignore_patterns("*.safetensors"))
    return str(dest)


@pytest.mark.parametrize("model,rank,size", [("smollm2-135m-instruct", 0, 1), ("smollm2-135m-instruct", 0, 3),
                                             ("smollm2-135m-instruct", 2, 3),
                                             ("qwen2.5-coder-0.5b-instruct", 1, 2)])
def test_layers_hold_the_float_weights(model: str, rank: int, size: int) -> None:
    """SmolLM2 (llama: permuted q/k rows; Q4_1, tied Q8_0 head and embedding) and the default Qwen
    (Q5_0/Q8_0 q/k/v with biases, Q4_K/Q6_K down_proj whose 2432-wide rank slices cut through
    256-value blocks, a Q5_0 embedding and a separate Q8_0 head). No float32 copy of any of them."""
    model_dir = str(resolve_model(model).path)
    cfg = ModelConfig.from_dir(model_dir)
    tp = TensorParallel(rank, size)
    ours, counts = gguf_model(model_dir, tp)
    ref = float_model(model_dir, tp)
    # layers x (qkv, o, gate_up, down) + the head
    assert counts == {"gguf": 4 * cfg.num_layers + 1, "float": 0, "embedding": 1}
    linears = {name: m for name, m in ref.named_modules() if isinstance(m, nn.Linear)}
    layers = {name: m for name, m in ours.named_modules() if isinstance(m, GGUFLinear)}
    assert set(layers) == set(linears)
    for name, layer in layers.items():
        torch.testing.assert_close(layer.dequantize(), linears[name].weight, rtol=1e-6, atol=1e-6, msg=name)
        if linears[name].bias is not None:
            torch.testing.assert_close(layer.bias, linears[name].bias, rtol=0, atol=0, msg=name)
    embedding = ours.embed_tokens
    assert isinstance(embedding, GGUFEmbedding) and embedding.vocab_start == ref.embed_tokens.vocab_start
    table = ref.embed_tokens.weight
    torch.testing.assert_close(embedding.rows(torch.arange(embedding.num_rows)), table[: embedding.num_rows],
                               rtol=1e-6, atol=1e-6)
    assert not table[embedding.num_rows :].any()  # the last rank's padding rows
    # norms and q/k norms: the same floats
    floats = dict(ref.named_parameters())
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p, floats[name], rtol=0, atol=0, msg=name)
    # Nothing of a linear's or the embedding's size is float: the largest float tensor outside the
    # rotary tables is a bias or a norm, and the blocks are the only large tensors.
    smallest_linear = min(m.weight.numel() for m in linears.values())
    float_tensors = [(n, t) for n, t in [*ours.named_parameters(), *ours.named_buffers()]
                     if t.is_floating_point() and not n.startswith("rotary.")]
    assert max(t.numel() for _, t in float_tensors) < smallest_linear
    float_bytes = sum(t.numel() * t.element_size() for _, t in float_tensors)
    block_bytes = sum(m.nbytes for m in layers.values()) + embedding.nbytes
    ref_bytes = sum(p.numel() * 4 for p in ref.parameters())
    assert float_bytes < 0.002 * ref_bytes and block_bytes < 0.35 * ref_bytes
    if cfg.tie_word_embeddings:  # one copy of the blocks for the embedding and the head
        head = ours.lm_head.parts[0].data
        assert head.data_ptr() == embedding.blocks.data_ptr() and head.shape == embedding.blocks.shape
    else:
        assert ours.lm_head.parts[0].data.data_ptr() != embedding.blocks.data_ptr()


@pytest.mark.parametrize("model", ["smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct"])
def test_embedding_rows_equal_the_reference_dequantization(model: str) -> None:
    """Rows in any order, repeated, at both ends of the vocabulary: gguf-py's dequantized rows."""
    model_dir = str(resolve_model(model).path)
    t = next(t for t in open_gguf(gguf_source(model_dir)).tensors if t.name == "token_embd.weight")
    vocab, hidden = int(t.shape[1]), int(t.shape[0])
    data = np.asarray(t.data).reshape(vocab, -1)
    embedding = GGUFEmbedding(t.tensor_type.name, torch.from_numpy(np.array(data)), hidden)
    ids = torch.tensor([0, vocab - 1, 17, 17, 5, 1000, vocab // 2, 3] + list(range(40, 140)))
    want = gguf_dequantize(data[ids.numpy()], GGMLQuantizationType[t.tensor_type.name])
    torch.testing.assert_close(embedding(ids), torch.from_numpy(np.asarray(want, dtype=np.float32)), rtol=0, atol=0)
    assert embedding(ids[:0]).shape == (0, hidden)
    with pytest.raises(IndexError):
        embedding(torch.tensor([vocab]))
    # compiled, the lookup is one custom op
    compiled = torch.compile(lambda x: embedding(x) * 2.0, fullgraph=True, dynamic=True)
    torch.testing.assert_close(compiled(ids), embedding(ids) * 2.0)


def test_logits_without_a_float_weights_file(smollm2_dir: str, tmp_path: Path, monkeypatch) -> None:
    """A folder converted with no weights file loads in gguf mode without writing one, and its logits
    are those of the float-loaded model with its linears swapped for GGUF ones (the way before)."""

    def no_float_weights(*args: object) -> None:
        raise AssertionError("gguf mode wrote float32 weights")

    model_dir = weightless_copy(smollm2_dir, tmp_path / "smol")
    with monkeypatch.context() as patch:
        patch.setattr(gguf_convert, "_write_safetensors", no_float_weights)
        ours, _ = gguf_model(model_dir)
    assert not list(Path(model_dir).glob("*.safetensors"))
    before = float_model(smollm2_dir)
    cfg = ModelConfig.from_dir(smollm2_dir)
    load_gguf_linears(before, gguf_source(smollm2_dir), cfg, ShardPlan(cfg, 0, 1))
    ids = torch.tensor([1, 504, 3458, 314, 5165, 28, 9, 77, 6446, 30, 2, 1, 49151, 0])
    with torch.inference_mode():
        for n in (len(ids), 40):  # the int8 kernels and the prefill GEMM
            x = ids.repeat(3)[:n]
            got = ours.compute_logits(ours(x, torch.arange(n), _causal_attention))
            want = before.compute_logits(before(x, torch.arange(n), _causal_attention))
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("without", ["Q4_1", "Q8_0"])
def test_types_without_kernel_are_held_as_bf16(smollm2_dir: str, monkeypatch, without: str) -> None:
    """SmolLM2's linears are Q4_1, its tied embedding and head Q8_0. Without a kernel for a type, its
    tensors are dequantized from the GGUF into bf16 rows (never float32: 2 bytes a value), the tied
    head shares the embedding's, and the logits are the float-loaded model's with the same layers
    swapped, up to the weights' bf16 rounding."""
    from dashchat.engine.quantization import gguf_loading

    monkeypatch.setattr(gguf_loading, "BLOCK_TYPES", {k: v for k, v in BLOCK_TYPES.items() if k != without})
    cfg = ModelConfig.from_dir(smollm2_dir)
    ours, counts = gguf_model(smollm2_dir)
    assert counts == {"gguf": 4 * cfg.num_layers + 1, "float": 0, "embedding": 1}
    layers = [m for m in ours.modules() if isinstance(m, GGUFLinear)]
    as_bf16 = [m for m in layers if m.parts[0].type_name == "BF16"]
    assert len(as_bf16) == (4 * cfg.num_layers if without == "Q4_1" else 1)
    assert all(m.nbytes == 2 * m.in_features * m.out_features for m in as_bf16)
    assert (ours.embed_tokens.type_name == "BF16") == (without == "Q8_0")
    assert ours.lm_head.parts[0].data.data_ptr() == ours.embed_tokens.blocks.data_ptr()
    before = float_model(smollm2_dir)
    load_gguf_linears(before, gguf_source(smollm2_dir), cfg, ShardPlan(cfg, 0, 1))
    if without == "Q8_0":  # the embedding's rows rounded as ours are
        before.embed_tokens.weight.data = before.embed_tokens.weight.bfloat16().float()
    ids = torch.tensor([1, 504, 3458, 314, 5165, 28, 9, 77, 6446, 30, 2, 1, 49151, 0])
    with torch.inference_mode():
        got = ours.compute_logits(ours(ids, torch.arange(len(ids)), _causal_attention))
        want = before.compute_logits(before(ids, torch.arange(len(ids)), _causal_attention))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_engine_decodes_with_gguf_layers(smollm2_dir: str, tmp_path: Path, monkeypatch) -> None:
    """The engine serves from the GGUF blocks (a folder without float weights, none written); greedy
    tokens start as the float32 model's (a later near-tie may flip: the activations' int8 rounding
    differs, see the next test)."""

    def no_float_weights(*args: object) -> None:
        raise AssertionError("gguf mode wrote float32 weights")

    dirs = {"none": smollm2_dir, "gguf": weightless_copy(smollm2_dir, tmp_path / "smol")}
    outputs = {}
    for quantization in ("none", "gguf"):
        if quantization == "gguf":
            monkeypatch.setattr(gguf_convert, "_write_safetensors", no_float_weights)
        engine = AsyncLLMEngine.from_args(EngineArgs(model_dir=dirs[quantization], max_model_len=256,
                                                     quantization=quantization, kv_cache_memory_gb=0.05))
        try:
            if quantization == "gguf":
                model = engine.runner.model
                assert sum(isinstance(m, GGUFLinear) for m in model.modules()) == 121
                assert isinstance(model.embed_tokens, GGUFEmbedding)
            prompts = [engine.tokenizer.encode(p) for p in ("The capital of France is", "def fibonacci(n):")]
            params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)

            async def run():
                return await asyncio.gather(*(collect(engine, p, params) for p in prompts))

            outputs[quantization] = [o[0].token_ids for o in asyncio.run(run())]
        finally:
            engine.shutdown()
    assert not list((tmp_path / "smol").glob("*.safetensors"))
    pairs = [(a, b) for x, y in zip(outputs["none"], outputs["gguf"]) for a, b in zip(x, y)]
    assert len(pairs) == 48
    assert all(x[:4] == y[:4] for x, y in zip(outputs["none"], outputs["gguf"]))


def test_next_token_agreement_with_float(smollm2_dir: str) -> None:
    """Teacher-forced on a fixed text, the model loaded from the blocks (int8-activation kernels)
    picks float32's next token almost always and moves its log-prob very little.
    bench/quant_accuracy.py measured 96.9% and a mean |log-prob diff| of 0.07 on 384 tokens."""
    from dashchat.tokenizer import Tokenizer

    text = ("The history of science covers the development of science from ancient times to the present. "
            "def add(a, b):\n    return a + b\n\nprint(add(2, 3))\n") * 3
    ids = torch.tensor(Tokenizer.from_dir(smollm2_dir).encode(text)[:128])

    @torch.inference_mode()
    def logprobs(model: nn.Module) -> torch.Tensor:
        return torch.log_softmax(model.compute_logits(model(ids, torch.arange(len(ids)), _causal_attention)), -1)

    ref = logprobs(float_model(smollm2_dir))
    got = logprobs(gguf_model(smollm2_dir)[0])
    agree = (ref.argmax(-1) == got.argmax(-1)).float().mean().item()
    target = ids[1:, None]
    drift = (ref[:-1].gather(1, target) - got[:-1].gather(1, target)).abs().mean().item()
    assert agree >= 0.9 and drift < 0.15, (agree, drift)


def test_server_defaults_to_gguf_for_gguf_models(smollm2_dir: str, tmp_path) -> None:
    from dashchat.openai_server import _engine_args, build_parser

    parser = build_parser()

    def resolved(model_dir: str, *flags: str) -> str:
        args = parser.parse_args(["--device", "cpu", *flags])
        args.device_ids = (0,)  # as main() sets it from --device-list
        return _engine_args(args, model_dir).quantization

    assert resolved(smollm2_dir) == "gguf"
    assert resolved(smollm2_dir, "--quantization", "none") == "none"
    assert resolved(smollm2_dir, "--quantization", "auto") == "gguf"
    (tmp_path / "config.json").write_text("{}")  # a float checkpoint folder: no GGUF source
    assert resolved(str(tmp_path)) == "none"
    assert resolved(str(tmp_path), "--quantization", "auto") == "int8"


def test_a_tokens_output_does_not_depend_on_its_batch(smollm2_dir: str) -> None:
    """Every batch size runs the same integer products (the activations rounded to int8 the same
    way), so a row's result is the same alone or in a batch up to float rounding (8-row tiles scale
    and sum them in another order than per-row ones). Otherwise a prefix-cache hit, which turns a
    long prefill into a short one, could change greedy answers."""
    layer = gguf_model(smollm2_dir)[0].layers[0].mlp.down_proj
    x = torch.randn(40, layer.in_features, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        batched, alone = layer(x), torch.cat([layer(x[i : i + 1]) for i in range(len(x))])
    torch.testing.assert_close(alone, batched, rtol=1e-5, atol=1e-5 * batched.abs().max().item())
