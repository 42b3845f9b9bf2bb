"""Conversion to DashInfer's format, architecture checks and the device mapping."""

from __future__ import annotations

import json

import numpy as np
import pytest
from dashinfer_helpers import HAVE_DASHINFER, MAX_MODEL_LEN, SKIP_REASON

if not HAVE_DASHINFER:
    pytest.skip(SKIP_REASON, allow_module_level=True)

from dashchat.engine.args import EngineArgs
from dashchat.engine.dashinfer.convert import (
    convert,
    dashinfer_model_type,
    load_hf_config,
)
from dashchat.engine.dashinfer.engine import DashInferEngine, _device

LLAMA = {"architectures": ["LlamaForCausalLM"], "hidden_size": 576, "num_attention_heads": 9, "rope_theta": 1e5}


@pytest.mark.parametrize("cfg, want", [
    (LLAMA, "LLaMA_v2"),
    ({**LLAMA, "architectures": ["MistralForCausalLM"], "sliding_window": None}, "LLaMA_v2"),
    ({**LLAMA, "architectures": None, "model_type": "qwen2", "sliding_window": 4096, "use_sliding_window": False},
     "Qwen_v20"),
])
def test_supported_architectures(cfg, want):
    assert dashinfer_model_type(cfg) == want


@pytest.mark.parametrize("cfg, why", [
    ({**LLAMA, "architectures": ["Qwen3ForCausalLM"]}, "supported: LlamaForCausalLM"),
    ({**LLAMA, "architectures": ["GPT2LMHeadModel"]}, "Qwen2ForCausalLM"),
    ({**LLAMA, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope scaling"),
    ({**LLAMA, "head_dim": 128}, "head_dim"),
    ({**LLAMA, "attention_bias": True}, "biases"),
])
def test_unsupported_architectures_are_refused(cfg, why):
    with pytest.raises(ValueError, match=why):
        dashinfer_model_type(cfg)


def test_engine_refuses_an_unsupported_model_before_loading(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({**LLAMA, "architectures": ["Qwen3ForCausalLM"]}))
    with pytest.raises(ValueError, match="dashinfer engine does not support"):
        DashInferEngine.from_args(EngineArgs(model_dir=str(tmp_path)))


def test_device_mapping():
    assert _device(EngineArgs(model_dir="m")) == ("CPU:0", "float32")
    assert _device(EngineArgs(model_dir="m", device="cuda", device_ids=(0, 1))) == ("CUDA:0,1", "bfloat16")
    assert _device(EngineArgs(model_dir="m", device="cuda", dtype="float16")) == ("CUDA:0", "float16")
    with pytest.raises(ValueError, match="float32"):
        _device(EngineArgs(model_dir="m", dtype="bfloat16"))


def test_conversion_is_cached_and_carries_rope_theta(smollm2_dir, engine):
    model = convert(smollm2_dir)  # the engine fixture converted it already
    stamp = model.model_path.stat().st_mtime_ns
    assert convert(smollm2_dir) == model and model.model_path.stat().st_mtime_ns == stamp
    from dashinfer.allspark.model.allspark_pb2 import TransformerProto

    proto = TransformerProto()
    proto.ParseFromString(model.model_path.read_bytes())
    bases = [np.frombuffer(op.attr["rotary_base"], np.float32)[0]
             for g in proto.graphs.values() for op in g.ops if op.op_type.startswith("Rotary")]
    theta = load_hf_config(smollm2_dir)["rope_theta"]
    assert len(bases) == load_hf_config(smollm2_dir)["num_hidden_layers"] and set(bases) == {theta}


def test_engine_attributes(engine, smollm2_dir):
    assert engine.name == "dashinfer"
    assert engine.supports_logits_processors is False  # the server leaves optional grammar out
    assert engine.max_model_len == MAX_MODEL_LEN
    assert engine.vocab_size == load_hf_config(smollm2_dir)["vocab_size"]
    assert engine.tokenizer.encode("Hello")
