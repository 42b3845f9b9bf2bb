"""Code that runs inside tensor-parallel rank processes started by the tests (spawned, so it lives
in an importable module)."""

from __future__ import annotations

import torch


def rank_logits(rank: int, size: int, port: int, model_dirs: list[str], ids: list[int], out_dir: str) -> None:
    """Build each model's shard for this rank, run one causal forward; rank 0 saves the logits. Then
    the STOP handshake."""
    from dashchat.distributed.group import ParallelGroup
    from dashchat.engine.quantization.int8 import _causal_attention
    from dashchat.models.config import ModelConfig
    from dashchat.models.registry import build_model
    from dashchat.models.weights import iter_weight_slices

    torch.set_num_threads(1)
    group = ParallelGroup(rank, size, torch.device("cpu"), "127.0.0.1", port, loopback=True)
    try:
        group.start_serving(60)
        tokens = torch.tensor(ids)
        for i, model_dir in enumerate(model_dirs):
            model = build_model(ModelConfig.from_dir(model_dir), group.tensor_parallel())
            model.load_weights(iter_weight_slices(model_dir))
            if model.config.tie_word_embeddings:
                model.lm_head.weight = model.embed_tokens.weight
            with torch.inference_mode():
                logits = model.compute_logits(model(tokens, torch.arange(len(tokens)), _causal_attention))
            if rank == 0:
                torch.save(logits, f"{out_dir}/logits-{i}.pt")
        stop_handshake(group, rank, size, out_dir)
    finally:
        group.destroy()


def rank_gguf_logits(rank: int, size: int, port: int, model_dir: str, ids: list[int], out_dir: str) -> None:
    """Load this rank's shard of a GGUF model from the file's blocks, run one causal forward (the
    int8 kernels and, 40 tokens in, the prefill GEMM); rank 0 saves the logits."""
    from dashchat.distributed.group import ParallelGroup
    from dashchat.engine.quantization.gguf_loading import gguf_source, load_gguf_model
    from dashchat.engine.quantization.int8 import _causal_attention
    from dashchat.models.config import ModelConfig
    from dashchat.models.parallel import ShardPlan
    from dashchat.models.registry import build_model

    torch.set_num_threads(1)
    group = ParallelGroup(rank, size, torch.device("cpu"), "127.0.0.1", port)
    try:
        group.start_serving(60)
        cfg = ModelConfig.from_dir(model_dir)
        with torch.device("meta"):
            model = build_model(cfg, group.tensor_parallel())
        load_gguf_model(model, gguf_source(model_dir), cfg, ShardPlan(cfg, rank, size))
        rotary = model.rotary
        fresh = type(rotary)(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta, cfg.rope_scaling)
        rotary.cos, rotary.sin = fresh.cos, fresh.sin
        for n in (len(ids), 40):
            tokens = torch.tensor((ids * 3)[:n])
            with torch.inference_mode():
                logits = model.compute_logits(model(tokens, torch.arange(n), _causal_attention))
            if rank == 0:
                torch.save(logits, f"{out_dir}/gguf-logits-{n}.pt")
    finally:
        group.destroy()



def stop_handshake(group, rank: int, size: int, out_dir: str) -> None:
    """Rank 0 sends STOP as the engine does at shutdown and writes when that returned; the others
    (the last one slow to read it) receive it as a worker does and write when they had it."""
    import time

    from dashchat.engine.native.step_inputs import STOP, receive_step, send_command

    cpu = torch.device("cpu")
    if rank == 0:
        send_command(group, STOP, cpu)
        group.acknowledge_stop()
    else:
        if rank == size - 1:
            time.sleep(0.5)
        assert receive_step(group, cpu) == STOP
    stamp = time.time()
    if rank:
        group.acknowledge_stop()
    with open(f"{out_dir}/{'stopped' if rank == 0 else 'has-stop'}-{rank}", "w") as f:
        f.write(repr(stamp))
