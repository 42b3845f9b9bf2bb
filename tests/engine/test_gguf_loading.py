"""`--quantization gguf`: the model's linears run over the GGUF file's own blocks.

Each GGUF layer must hold exactly the weights the float path loads from the converted folder (the
names, the fused q/k/v and gate/up order, llama's q/k row permutation, tensor-parallel slices), the
engine must decode with them, and the server must pick this mode by default for GGUF models on CPU.
"""

from __future__ import annotations

import asyncio

import pytest
import torch
from torch import nn

from dashchat.engine.args import EngineArgs
from dashchat.engine.cpu.kernels import kernel_library
from dashchat.engine.native.llm_engine import AsyncLLMEngine
from dashchat.engine.quantization.gguf import GGUFLinear
from dashchat.engine.quantization.gguf_loading import gguf_source, load_gguf_linears
from dashchat.engine.types import SamplingParams
from dashchat.models.config import ModelConfig
from dashchat.models.parallel import ShardPlan, TensorParallel
from dashchat.models.registry import build_model
from dashchat.models.weights import iter_weight_slices
from engine_helpers import collect

pytestmark = pytest.mark.skipif(kernel_library() is None, reason="no C compiler: kernels unavailable")


@pytest.mark.parametrize("model,rank,size", [("smollm2-135m-instruct", 0, 1), ("smollm2-135m-instruct", 0, 3),
                                             ("smollm2-135m-instruct", 2, 3),
                                             ("qwen2.5-coder-0.5b-instruct", 1, 2)])
def test_layers_hold_the_float_weights(model: str, rank: int, size: int) -> None:
    """SmolLM2 (llama: permuted q/k rows; Q4_1, tied Q8_0 head) and the default Qwen (Q5_0/Q8_0
    q/k/v with biases, Q4_K/Q6_K down_proj whose 2432-wide rank slices cut through 256-value blocks)."""
    from dashchat.models.resolve import resolve_model

    smollm2_dir = str(resolve_model(model).path)
    cfg = ModelConfig.from_dir(smollm2_dir)
    tp = TensorParallel(rank, size)
    with torch.device("meta"):
        model = build_model(cfg, tp)
    model = model.to_empty(device="cpu").float()
    if cfg.tie_word_embeddings:  # as the model runner does
        model.lm_head.weight = model.embed_tokens.weight
    model.load_weights(iter_weight_slices(smollm2_dir))
    floats = {name: m.weight.detach().clone() for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    counts = load_gguf_linears(model, gguf_source(smollm2_dir), cfg, ShardPlan(cfg, rank, size))
    layers = {name: m for name, m in model.named_modules() if isinstance(m, GGUFLinear)}
    # layers x (qkv, o, gate_up, down) + the head (SmolLM2's is the tied Q8_0 embedding)
    assert counts == {"gguf": 4 * cfg.num_layers + 1, "float": 0} and set(layers) == set(floats)
    for name, layer in layers.items():
        torch.testing.assert_close(layer.dequantize(), floats[name], rtol=1e-6, atol=1e-6, msg=name)


def test_engine_decodes_with_gguf_layers(smollm2_dir: str) -> None:
    """The engine serves with GGUF layers; greedy tokens start as the float32 model's (a later
    near-tie may flip: the activations' int8 rounding differs, see the next test)."""
    outputs = {}
    for quantization in ("none", "gguf"):
        engine = AsyncLLMEngine.from_args(EngineArgs(model_dir=smollm2_dir, max_model_len=256,
                                                     quantization=quantization, kv_cache_memory_gb=0.05))
        try:
            if quantization == "gguf":
                assert sum(isinstance(m, GGUFLinear) for m in engine.runner.model.modules()) == 121
            prompts = [engine.tokenizer.encode(p) for p in ("The capital of France is", "def fibonacci(n):")]
            params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)

            async def run():
                return await asyncio.gather(*(collect(engine, p, params) for p in prompts))

            outputs[quantization] = [o[0].token_ids for o in asyncio.run(run())]
        finally:
            engine.shutdown()
    pairs = [(a, b) for x, y in zip(outputs["none"], outputs["gguf"]) for a, b in zip(x, y)]
    assert len(pairs) == 48
    assert all(x[:4] == y[:4] for x, y in zip(outputs["none"], outputs["gguf"]))


def test_next_token_agreement_with_float(smollm2_dir: str, monkeypatch) -> None:
    """Teacher-forced on a fixed text, the int8-activation kernels (every batch size, as decode
    steps run) pick float32's next token almost always and move its log-prob very little.
    bench/quant_accuracy.py measured 96.6% and a mean |log-prob diff| of 0.07 on 384 tokens."""
    from dashchat.engine.quantization import gguf as gguf_module
    from dashchat.engine.quantization.int8 import _causal_attention
    from dashchat.tokenizer import Tokenizer

    cfg = ModelConfig.from_dir(smollm2_dir)
    model = build_model(cfg)
    model.load_weights(iter_weight_slices(smollm2_dir))
    model.eval()
    text = ("The history of science covers the development of science from ancient times to the present. "
            "def add(a, b):\n    return a + b\n\nprint(add(2, 3))\n") * 3
    ids = torch.tensor(Tokenizer.from_dir(smollm2_dir).encode(text)[:128])

    @torch.inference_mode()
    def logprobs() -> torch.Tensor:
        return torch.log_softmax(model.compute_logits(model(ids, torch.arange(len(ids)), _causal_attention)), -1)

    ref = logprobs()
    load_gguf_linears(model, gguf_source(smollm2_dir), cfg, ShardPlan(cfg, 0, 1))
    monkeypatch.setattr(gguf_module, "PREFILL_ROWS", 1 << 30)
    got = logprobs()
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
    """Decode-sized batches run the int8 kernel, prefill-sized ones a GEMM over dequantized weights:
    both see the same int8-rounded activations, so a row's result is the same either way (up to float
    summation order). Otherwise a prefix-cache hit, which turns a long prefill into a short one, would
    change greedy answers."""
    from dashchat.models.resolve import resolve_model

    model_dir = str(resolve_model("smollm2-135m-instruct").path)
    cfg = ModelConfig.from_dir(model_dir)
    with torch.device("meta"):
        model = build_model(cfg)
    model = model.to_empty(device="cpu").float()
    if cfg.tie_word_embeddings:  # as the model runner does
        model.lm_head.weight = model.embed_tokens.weight
    model.load_weights(iter_weight_slices(model_dir))
    load_gguf_linears(model, gguf_source(model_dir), cfg, ShardPlan(cfg, 0, 1))
    layer = model.layers[0].mlp.down_proj
    x = torch.randn(40, layer.in_features, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        batched, alone = layer(x), torch.cat([layer(x[i : i + 1]) for i in range(len(x))])
    torch.testing.assert_close(alone, batched, rtol=1e-4, atol=1e-4)
