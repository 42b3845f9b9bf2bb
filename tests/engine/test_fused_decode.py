"""The fused decode step (dashchat/engine/cpu/decode_step.c): every decoder layer of a decode step in
one C call must give the module path's logits bit for bit (same kernels, same order), on the real
GGUF models and on a tiny Qwen3 (per-head q/k norms) and Qwen2 (q/k/v bias) with random GGUF blocks
of every type; where it cannot run (float layers, tensor parallelism) the modules run instead."""

from __future__ import annotations

import pytest
import torch

from dashchat.engine.cpu.decode_step import FusedDecode
from dashchat.engine.cpu.kernels import kernel_library
from dashchat.engine.native.model_runner import ModelRunner
from dashchat.engine.quantization.gguf import BLOCK_TYPES, FLOAT16_TYPES, GGUFLinear, GGUFPart
from dashchat.models.config import ModelConfig
from engine.test_gguf_kernels import random_blocks
from tiny_models import save_tiny

pytestmark = pytest.mark.skipif(kernel_library() is None, reason="no C compiler: kernels unavailable")

BLOCK = 16


def decode_both_ways(runner: ModelRunner, batch: int, context: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of one decode step of `batch` sequences `context` tokens long (their earlier keys and
    values random), through the modules and through the fused step, from the same cache state."""
    gen = torch.Generator().manual_seed(seed)
    for k, v in runner.kv_cache:
        k.copy_(torch.randn(k.shape, generator=gen))
        v.copy_(torch.randn(v.shape, generator=gen))
    width = -(-context // BLOCK) + 1
    tables = torch.stack([torch.arange(i * width, (i + 1) * width) for i in range(batch)])
    lens = torch.tensor([context - i for i in range(batch)])  # uneven lengths
    positions = lens - 1
    slots = tables[torch.arange(batch), positions // BLOCK] * BLOCK + positions % BLOCK
    ids = torch.randint(0, runner.cfg.vocab_size, (batch,), generator=gen)
    fused = runner.fused_decode
    assert fused is not None
    with torch.inference_mode():
        runner.fused_decode = None
        reference = runner._decode_eager(ids, positions, slots, tables, lens)
        runner.fused_decode = fused
        return reference, runner._decode_eager(ids, positions, slots, tables, lens)


@pytest.mark.parametrize("model", ["smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct"])
def test_real_gguf_models(model: str) -> None:
    from dashchat.models.resolve import resolve_model

    model_dir = str(resolve_model(model).path)
    runner = ModelRunner(model_dir, ModelConfig.from_dir(model_dir), torch.device("cpu"), torch.float32, 64, BLOCK,
                         "gguf")
    for batch, context in ((1, 40), (5, 70), (11, 33)):  # tiles of 8, 4, 2 and 1 rows
        reference, fused = decode_both_ways(runner, batch, context, seed=batch)
        assert torch.equal(fused, reference), (model, batch)


def _with_random_gguf_layers(runner: ModelRunner, types: list[str]) -> None:
    """Swap every linear of the decoder layers for a GGUFLinear over random blocks (keeping biases)."""
    names = iter(types * 100)
    for layer in runner.model.layers:
        for parent, attr in ((layer.self_attn, "qkv_proj"), (layer.self_attn, "o_proj"), (layer.mlp, "gate_up_proj"),
                             (layer.mlp, "down_proj")):
            linear = getattr(parent, attr)
            out_features, in_features = linear.out_features, linear.in_features
            type_name = next(names)
            split = [out_features // 2, out_features - out_features // 2]  # two parts, as fused layers have
            parts = [GGUFPart(type_name, torch.from_numpy(random_blocks(type_name, rows, in_features, rows)), in_features)
                     for rows in split]
            bias = None if getattr(linear, "bias", None) is None else linear.bias.detach().clone()
            setattr(parent, attr, GGUFLinear(in_features, out_features, parts, bias))


@pytest.mark.parametrize("family", ["qwen3", "qwen2-tied"])
def test_tiny_models_with_every_block_type(family: str, tmp_path) -> None:
    save_tiny(family, tmp_path)
    cfg = ModelConfig.from_dir(tmp_path)
    runner = ModelRunner(str(tmp_path), cfg, torch.device("cpu"), torch.float32, 64, BLOCK, "none")
    assert runner.fused_decode is None  # float linears: the modules run
    # 32-value block types only: the tiny model's 64/128-wide inputs are not whole 256-value super-blocks;
    # integer-product ones (a 16-bit layer runs as a module: see test_not_built_for_a_float_layer)
    _with_random_gguf_layers(runner, sorted(t for t, (_, per_block, _) in BLOCK_TYPES.items()
                                            if per_block == 32 and t not in FLOAT16_TYPES))
    runner.fused_decode = FusedDecode.build(runner.model, runner.kv_cache, BLOCK, cfg.head_dim**-0.5)
    for batch, context in ((1, 20), (7, 50)):
        reference, fused = decode_both_ways(runner, batch, context, seed=batch)
        assert torch.equal(fused, reference), (family, batch)


def test_k_quant_layers(tmp_path) -> None:
    """K-quants and IQ4_XS need 256-wide inputs: a tiny Llama of hidden size 256."""
    import json

    save_tiny("mistral", tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    # rebuilt at 256 wide with transformers, random weights
    import transformers

    config.update(hidden_size=256, intermediate_size=512, head_dim=64)
    model = transformers.MistralForCausalLM(transformers.MistralConfig(**config)).eval()
    model.save_pretrained(tmp_path, safe_serialization=True)
    cfg = ModelConfig.from_dir(tmp_path)
    runner = ModelRunner(str(tmp_path), cfg, torch.device("cpu"), torch.float32, 64, BLOCK, "none")
    _with_random_gguf_layers(runner, ["Q4_K", "Q5_K", "Q6_K", "Q2_K", "Q3_K", "IQ4_XS"])
    runner.fused_decode = FusedDecode.build(runner.model, runner.kv_cache, BLOCK, cfg.head_dim**-0.5)
    reference, fused = decode_both_ways(runner, 9, 45, seed=3)
    assert torch.equal(fused, reference)


def test_not_built_for_a_float_layer(smollm2_dir: str) -> None:
    cfg = ModelConfig.from_dir(smollm2_dir)
    runner = ModelRunner(smollm2_dir, cfg, torch.device("cpu"), torch.float32, 32, BLOCK, "gguf")
    assert runner.fused_decode is not None
    layer = runner.model.layers[1].mlp
    down = layer.down_proj
    layer.down_proj = torch.nn.Linear(down.in_features, down.out_features, bias=False)
    assert FusedDecode.build(runner.model, runner.kv_cache, BLOCK, cfg.head_dim**-0.5) is None
    # nor for a 16-bit one (float products, not the integer kernels the step chains)
    data = random_blocks("BF16", down.out_features, down.in_features, 0)
    layer.down_proj = GGUFLinear(down.in_features, down.out_features, [GGUFPart("BF16", torch.from_numpy(data),
                                                                                down.in_features)])
    assert FusedDecode.build(runner.model, runner.kv_cache, BLOCK, cfg.head_dim**-0.5) is None
