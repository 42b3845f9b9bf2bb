"""Gemma 3 and Phi-3 / Phi-4-mini at two tensor-parallel ranks equal one rank (which equals
transformers: tests/engine/test_gemma3_phi3.py). Phi-3's fused q/k/v and gate/up tensors are cut
per rank; Gemma's extra norms and both RoPE tables are replicated."""

from __future__ import annotations

import torch
import torch.multiprocessing as mp

from dashchat.distributed.launch import free_port
from dashchat.models.config import ModelConfig
from dashchat.models.registry import build_model
from dashchat.models.weights import iter_weights
from tiny_dense import paged_logits, rank_paged_logits, save_tiny_dense

IDS = [(11 * i) % 300 + 5 for i in range(30)]
CHUNKS = [len(IDS) - 8, 5, 1, 1, 1]


def test_two_ranks_equal_one_rank(tmp_path):
    families = ["gemma3", "phi3", "phi3-window"]
    dirs = []
    for family in families:
        d = tmp_path / family
        d.mkdir()
        save_tiny_dense(family, d)
        dirs.append(str(d))
    mp.start_processes(rank_paged_logits, args=(2, free_port("127.0.0.1"), dirs, IDS, CHUNKS, str(tmp_path)), nprocs=2,
                       start_method="spawn")
    for i, family in enumerate(families):
        model = build_model(ModelConfig.from_dir(dirs[i]))
        model.load_weights(iter_weights(dirs[i]))
        want = paged_logits(model.eval(), IDS, CHUNKS)
        torch.testing.assert_close(torch.load(tmp_path / f"logits-{i}.pt"), want, atol=1e-5, rtol=1e-5, msg=family)
