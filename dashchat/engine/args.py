"""Engine construction options (mirrored by the CLI flags).

These defaults are what `python -m dashchat.openai_server` passes when no flag is given;
tests/test_defaults_consistency.py holds the CLI, this class, `--help` and the README's flag
table to each other, so none of them can drift.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class EngineArgs:
    model_dir: str
    device: str = "cpu"  # "cpu" | "cuda"
    device_ids: tuple[int, ...] = (0,)
    dtype: str = "auto"  # auto = float32 on CPU, bfloat16 on CUDA
    max_model_len: int | None = None  # default: the model's context, capped (llm_engine._MAX_DEFAULT_LEN)
    max_num_seqs: int = 32  # running sequences at once
    max_num_batched_tokens: int | None = None  # token budget per step (chunked prefill); default by device
    # (llm_engine._DEFAULT_STEP_TOKENS)
    kv_cache_memory_gb: float | None = None  # default: enough for max_num_seqs * max_model_len, capped
    block_size: int = 16
    enable_prefix_caching: bool = True
    num_threads: int | None = None  # CPU threads; default: physical cores
    max_queue: int = 256  # waiting requests beyond which generate() raises EngineOverloaded
    quantization: str = "none"  # "none" | "gguf" (a GGUF model's own blocks) | "int8" | "int4" (the CLI resolves "auto")
    compile: bool = False  # torch.compile the decode step (slower start, faster tokens)
    enforce_eager: bool = False  # CUDA: run decode steps eagerly instead of replaying CUDA graphs
    seed: int = 0
    # Speculative decoding, vLLM's JSON (engine/native/speculative.py): None for none.
    speculative_config: str | None = None
    # Tensor parallelism (dashchat/distributed/): one model over several devices and nodes.
    tensor_parallel_size: int | None = None  # default: nnodes x len(device_ids) (WORLD_SIZE under torchrun)
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int | None = None  # default on one node: a free port
    distributed_timeout_s: float = 60.0  # a collective hung this long while serving means a rank is gone
    distributed_load_timeout_s: float = 1800.0  # the ranks' wait for each other to join and load
    allow_wildcard_master_addr: bool = False  # several nodes: let node 0's rendezvous listen on 0.0.0.0 / ::
