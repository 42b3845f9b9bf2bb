"""The Llama family decoder (Llama 2/3.x, SmolLM2, Mistral), the base every family here shares."""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn

from .config import ModelConfig
from .layers import AttentionBackend, DecoderLayer, RMSNorm, RotaryEmbedding
from .parallel import SINGLE, ShardPlan, TensorParallel, VocabParallelEmbedding, read_slice

# HF checkpoint names -> (our fused parameter, shard index). Shards are laid out in this order.
FUSED_LINEARS = {
    "q_proj": ("qkv_proj", 0),
    "k_proj": ("qkv_proj", 1),
    "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}
# Our parameter -> (the slice kind a tensor-parallel rank holds, the axis it is cut along).
# qkv_proj's kind depends on the shard: q, then k and v.
SHARD_SPLIT = {
    "qkv_proj": ("q", 0),
    "gate_up_proj": ("mlp", 0),
    "o_proj": ("q", 1),
    "down_proj": ("mlp", 1),
    "embed_tokens": ("vocab", 0),
    "lm_head": ("vocab", 0),
}


def shard_split(module_path: str) -> tuple[str | None, int]:
    """(slice kind, axis) of the weight of the linear at `module_path` (e.g. layers.3.mlp.down_proj)
    that a rank holds: an expert's or the shared expert's MLP is cut like a dense one, along its own
    width; a router and anything not named in SHARD_SPLIT is replicated."""
    parts = module_path.split(".")
    kind, dim = SHARD_SPLIT.get(parts[-1], (None, 0))
    if kind == "mlp" and "experts" in parts:
        kind = "expert"
    elif kind == "mlp" and "shared_expert" in parts:
        kind = "shared"
    return kind, dim


class LlamaForCausalLM(nn.Module):
    layer_class: type[nn.Module] = DecoderLayer  # a family with another block shape names its own

    def __init__(self, cfg: ModelConfig, tp: TensorParallel = SINGLE) -> None:
        super().__init__()
        self.config = cfg
        self.tp = tp
        self.plan = plan = ShardPlan(cfg, tp.rank, tp.size)
        self.embed_tokens = VocabParallelEmbedding(plan.vocab_per_rank, cfg.hidden_size, tp, plan.vocab_start)
        self.rotary = RotaryEmbedding(cfg.rotary_dim, cfg.max_position_embeddings, cfg.rope_theta, cfg.rope_scaling)
        self.layers = nn.ModuleList(self.layer_class(cfg, i, tp) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, plan.vocab_per_rank, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attention: AttentionBackend) -> torch.Tensor:
        """Hidden states [N, hidden] for a flat batch of N tokens."""
        x = self.embed_tokens(input_ids)
        rope = self.rotary(positions, x.dtype)
        for layer in self.layers:
            x = layer(rope, x, attention)
        return self.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(hidden)
        if self.tp.size > 1:  # each rank scored its slice of the vocabulary (the last one padded)
            logits = self.tp.gather_vocab(logits)[:, : self.config.vocab_size]
        return logits.float()

    def _shard_sizes(self, fused: str, param: torch.Tensor) -> list[int]:
        plan, d = self.plan, self.config.head_dim
        if fused == "qkv_proj":
            return [plan.num_heads * d, plan.num_kv_heads * d, plan.num_kv_heads * d]
        return [param.shape[0] // 2] * 2  # gate and up: a dense MLP's, an expert's or the shared expert's

    def checkpoint_name(self, name: str) -> str:
        """Our module path for a checkpoint's weight name (a family with other names renames)."""
        return name

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, Any]]) -> None:
        """Copy checkpoint tensors into place. A weight is a tensor or a lazy safetensors slice;
        under tensor parallelism only this rank's rows or columns of it are read."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for hf_name, tensor in weights:
            name = self.checkpoint_name(hf_name.removeprefix("model."))
            if "rotary_emb" in name:
                continue
            if name == "lm_head.weight" and self.config.tie_word_embeddings:
                continue
            parts = name.split(".")
            target, shard = name, None
            if len(parts) >= 2 and parts[-2] in FUSED_LINEARS:
                fused, shard = FUSED_LINEARS[parts[-2]]
                target = ".".join(parts[:-2] + [fused, parts[-1]])
            if target not in params:
                raise KeyError(f"unexpected weight {hf_name!r} in checkpoint")
            param = params[target]
            kind, dim = shard_split(target.rpartition(".")[0])
            if kind == "q" and shard:
                kind = "kv"
            tensor = read_slice(tensor, kind, dim, self.plan)
            if shard is not None:
                sizes = self._shard_sizes(target.split(".")[-2], param)
                param.narrow(0, sum(sizes[:shard]), sizes[shard]).copy_(tensor)
            elif kind == "vocab":  # the last rank's slice may be short: its padding rows score nothing
                param[: len(tensor)].copy_(tensor)
                param[len(tensor) :].zero_()
            else:
                param.copy_(tensor)
            loaded.add(f"{target}#{shard}")
        missing = {n for n in params if not any(k.startswith(n + "#") for k in loaded)}
        if missing:
            raise ValueError(f"checkpoint lacks weights: {sorted(missing)[:5]}")
