"""Tensor-parallel layers: every family's logits at 2 (and 4) ranks equal one rank's.

Ranks are processes on this CPU talking over gloo on 127.0.0.1, as on a real multi-device host
(where NCCL takes gloo's place).
"""

from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp

from dashchat.distributed.launch import free_port
from dashchat.engine.quantization.int8 import _causal_attention
from dashchat.models.config import ModelConfig
from dashchat.models.parallel import ShardPlan, check_tensor_parallel, valid_sizes
from dashchat.models.registry import build_model
from dashchat.models.weights import iter_weights
from tiny_models import FAMILIES, save_tiny
from tp_ranks import rank_logits

IDS = [5, 17, 42, 99, 7, 3, 250, 11, 64, 128, 200, 31, 8, 9, 10, 12, 13, 300, 319, 0]


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory) -> dict[str, str]:
    dirs = {}
    for family in sorted(FAMILIES):
        d = tmp_path_factory.mktemp(family)
        save_tiny(family, d)
        dirs[family] = str(d)
    return dirs


def one_rank_logits(model_dir: str) -> torch.Tensor:
    model = build_model(ModelConfig.from_dir(model_dir))
    if model.config.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.load_weights(iter_weights(model_dir))
    with torch.inference_mode():
        return model.compute_logits(model(torch.tensor(IDS), torch.arange(len(IDS)), _causal_attention))


@pytest.mark.parametrize("size", [2, 4])
def test_logits_at_several_ranks_equal_one_rank(size, tiny_dirs, tmp_path):
    families = sorted(tiny_dirs)
    dirs = [tiny_dirs[f] for f in families]
    mp.start_processes(rank_logits, args=(size, free_port("127.0.0.1"), dirs, IDS, str(tmp_path)), nprocs=size,
                       start_method="spawn")
    for i, family in enumerate(families):
        got = torch.load(tmp_path / f"logits-{i}.pt")
        torch.testing.assert_close(got, one_rank_logits(dirs[i]), atol=1e-5, rtol=1e-5, msg=family)


def test_kv_heads_split_or_replicated():
    cfg = ModelConfig.from_dict({"architectures": ["LlamaForCausalLM"], "vocab_size": 101, "hidden_size": 64,
                                 "intermediate_size": 128, "num_hidden_layers": 1, "num_attention_heads": 8,
                                 "num_key_value_heads": 2})
    # 2 KV heads over 4 ranks: ranks 0-1 hold KV head 0, ranks 2-3 KV head 1 (their query heads' group)
    assert [ShardPlan(cfg, r, 4).kv_head_start() for r in range(4)] == [0, 0, 1, 1]
    assert [ShardPlan(cfg, r, 2).rows("kv") for r in range(2)] == [(0, 8), (8, 8)]
    # 101 tokens over 2 ranks: 51 rows each, the last rank's final row is padding
    assert [ShardPlan(cfg, r, 2).rows("vocab") for r in range(2)] == [(0, 51), (51, 50)]


def test_a_size_that_does_not_divide_is_refused_with_the_sizes_that_work(tmp_path):
    from dashchat.models.resolve import resolve_model

    cfg = ModelConfig.from_dir(resolve_model("smollm2-135m-instruct").path)  # 9 heads, 3 KV heads
    with pytest.raises(ValueError) as err:
        check_tensor_parallel(cfg, 2)
    message = str(err.value)
    assert "9 attention heads" in message and "sizes that work for it: 1, 3" in message
    assert valid_sizes(cfg, 9) == [1, 3]  # 9 does not divide its MLP width, 1536
    check_tensor_parallel(cfg, 3)
