"""Loading a GGUF model for `--quantization gguf`: its weights straight from the file's blocks.

`load_gguf_model` fills a model built on the meta device: each linear becomes a `GGUFLinear` over
the file's own blocks and the token embedding a `GGUFEmbedding` (tied embeddings share one copy of
the blocks with the head); no float32 copy of either is ever made. Only the small float tensors
(norms, biases) and the per-tensor fallbacks (a type the kernels lack, or a tensor-parallel input
slice not on 32-value groups) are dequantized, from the GGUF directly. A rank reads its slices as
the float path does (models/parallel.py's ShardPlan).

`load_gguf_linears` swaps the linears of a model whose float weights are already loaded (the
accuracy bench and tests compare the two).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ...models.config import ModelConfig
from ...models.gguf_convert import (SOURCE_FILE, expert_tensor, hf_expert_name, hf_float_tensors, hf_tensor_name,
                                    read_tensors, unpermute_qk)
from ...models.llama import FUSED_LINEARS, SHARD_SPLIT, shard_split
from ...models.parallel import ShardPlan, VocabParallelEmbedding
from .gguf import BLOCK_TYPES, GGUFLinear, GGUFPart
from .gguf_embedding import GGUFEmbedding
from .int8 import float_bias

log = logging.getLogger(__name__)


def gguf_source(model_dir: str | Path) -> Path | None:
    """The GGUF file a converted model folder came from, or None (not a GGUF model)."""
    marker = Path(model_dir) / SOURCE_FILE
    try:
        src = Path(json.loads(marker.read_text(encoding="utf-8"))["source"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return src if src.is_file() else None


EMBEDDING_SOURCE = "token_embd.weight"


def _rank_blocks(data: np.ndarray, type_name: str, kind: str | None, dim: int, plan: ShardPlan,
                 shape: tuple[int, int]) -> tuple[np.ndarray, int, int, int] | None:
    """This rank's raw blocks of a GGUF weight `data` of `type_name` (a view of the file): (blocks, input width, width
    of the values the blocks hold per row, first input among them), or None when its input slice is
    not on 32-value groups (a float shard then)."""
    rows, cols = shape
    data = np.asarray(data).reshape(rows, -1)
    if kind is None or plan.size == 1:
        return data, cols, cols, 0
    start, length = plan.rows(kind)
    if dim == 0:
        return data[start : start + length], cols, cols, 0
    if start % 32 or length % 32:
        return None
    # only the blocks that cover this rank's inputs; a K-quant super-block of 256 values may straddle
    # two ranks, and then both keep it and the kernel reads only this rank's 32-value groups of it
    _, per_block, block_bytes = BLOCK_TYPES[type_name]
    first, end = start // per_block, -(-(start + length) // per_block)
    blocks = data[:, first * block_bytes : end * block_bytes]
    return blocks, length, (end - first) * per_block, start - first * per_block


class _Blocks:
    """One source tensor's part of a linear on this rank: its blocks (a view of the mapped file until
    `tensor()` copies them out) and where the kernel reads its inputs."""

    def __init__(self, type_name: str, view: np.ndarray, width: int, k_full: int, k0: int, source: str,
                 copy: Any = None) -> None:
        self.type_name, self.view, self.width, self.k_full, self.k0 = type_name, view, width, k_full, k0
        self.source = source  # the GGUF tensor name
        self.copy = copy  # () -> the blocks in memory, where they are part of a bigger copy (an expert's)

    def part(self, shared: torch.Tensor | None = None) -> GGUFPart:
        if shared is None:
            shared = self.copy() if self.copy is not None else torch.from_numpy(np.array(self.view, order="C"))
        return GGUFPart(self.type_name, shared, self.width, self.k_full, self.k0)


class _ExpertCopy:
    """This rank's rows of a 3-D expert tensor, copied out of the file once on first use: expert e's
    rows are a contiguous run of it, so its GGUFLinear reads the same kernel at an offset pointer."""

    def __init__(self, view: np.ndarray) -> None:
        self.view, self.tensor = view, None

    def expert(self, e: int) -> torch.Tensor:
        if self.tensor is None:
            self.tensor = torch.from_numpy(np.array(self.view, order="C"))
        return self.tensor[e]


def _expert_linear_blocks(t: Any, layer: int, projection: str, cfg: ModelConfig, plan: ShardPlan
                          ) -> Iterator[tuple[str, int, _Blocks | None, str]]:  # fmt: skip
    """(module path, part index, blocks or None, HF name) for each expert's projection in a 3-D expert
    tensor (ggml shape [in, out, experts]: numpy [experts, out, row bytes])."""
    experts, rows, cols = (int(d) for d in reversed(t.shape.tolist()))
    module, index = FUSED_LINEARS.get(projection, (projection, 0))
    kind, dim = shard_split(f"layers.{layer}.mlp.experts.0.{module}")
    type_name = t.tensor_type.name
    data = np.asarray(t.data).reshape(experts, rows, -1)
    sliced = copy = None
    if type_name in BLOCK_TYPES and dim == 1:  # every expert's rows, this rank's blocks of each
        sliced = _rank_blocks(data.reshape(experts * rows, -1), type_name, kind, dim, plan, (experts * rows, cols))
        if sliced is not None:
            copy = _ExpertCopy(sliced[0].reshape(experts, rows, -1))
    elif type_name in BLOCK_TYPES:  # this rank's rows of every expert
        sliced = _rank_blocks(data[0], type_name, kind, dim, plan, (rows, cols))
        start, length = plan.rows(kind) if kind is not None and plan.size > 1 else (0, rows)
        copy = _ExpertCopy(data[:, start : start + length])
    if type_name not in BLOCK_TYPES:
        log.info("GGUF %s: type %s has no kernel; kept as float", t.name, type_name)
    elif sliced is None:
        log.info("GGUF %s: this rank's input slice is not on 32-value groups; kept as float", t.name)
    for e in range(experts):
        entry = None
        if sliced is not None:
            _, width, k_full, k0 = sliced
            entry = _Blocks(type_name, None, width, k_full, k0, t.name, lambda e=e: copy.expert(e))
        yield (f"layers.{layer}.mlp.experts.{e}.{module}", index, entry,
               hf_expert_name(layer, e, projection, cfg.family))


def _linear_blocks(tensors: dict[str, Any], cfg: ModelConfig, plan: ShardPlan
                   ) -> dict[str, tuple[dict[int, _Blocks | None], list[str]]]:  # fmt: skip
    """Module path -> ({part index: its blocks, or None where it must stay float}, HF weight names)."""
    llama = cfg.family in ("llama", "mixtral")
    found: dict[str, tuple[dict[int, _Blocks | None], list[str]]] = {}
    head_source = "output.weight" if "output.weight" in tensors else EMBEDDING_SOURCE
    for name, t in tensors.items():
        expert = expert_tensor(name)
        if expert is not None:
            for path, index, entry, hf in _expert_linear_blocks(t, *expert, cfg, plan):
                parts_of, names = found.setdefault(path, ({}, []))
                parts_of[index] = entry
                names.append(hf)
            continue
        hf = "lm_head.weight" if name == head_source else hf_tensor_name(name)
        if hf is None or not hf.endswith(".weight") or name == EMBEDDING_SOURCE and hf != "lm_head.weight":
            continue
        parts = hf.removeprefix("model.").split(".")
        proj = parts[-2]
        module, index = FUSED_LINEARS.get(proj, (proj, 0))
        if module not in SHARD_SPLIT or module == "embed_tokens":
            continue  # norms (the embedding was passed over above, or renamed as the tied head)
        path = ".".join(parts[:-2] + [module])
        kind, dim = shard_split(path)
        if kind == "q" and index:
            kind = "kv"
        type_name = t.tensor_type.name
        shape = (int(t.shape[1]), int(t.shape[0])) if len(t.shape) == 2 else None
        entry = None
        if type_name in BLOCK_TYPES and shape is not None:
            sliced = _rank_blocks(t.data, type_name, kind, dim, plan, shape)
            if sliced is not None:
                view, width, k_full, k0 = sliced
                if llama and proj in ("q_proj", "k_proj"):
                    n_head = cfg.num_heads if proj == "q_proj" else cfg.num_kv_heads
                    # the permutation is within heads: whole rows move, so it applies to blocks too
                    # (on a rank's slice of whole heads as well as on the full tensor)
                    view = unpermute_qk(view, n_head * view.shape[0] // shape[0])
                entry = _Blocks(type_name, view, width, k_full, k0, name)
            else:
                log.info("GGUF %s: this rank's input slice is not on 32-value groups; kept as float", name)
        else:
            log.info("GGUF %s: type %s has no kernel; kept as float", name, type_name)
        parts_of, names = found.setdefault(path, ({}, []))
        parts_of[index] = entry
        names.append(hf)
    return found


def _usable(linear: nn.Module, parts: dict[int, _Blocks | None]) -> list[_Blocks] | None:
    entries = [parts.get(i) for i in range(max(parts) + 1)]
    if any(e is None or e.width != linear.in_features for e in entries):
        return None
    return entries  # type: ignore[return-value]


def _replace(model: nn.Module, path: str, layer: nn.Module) -> None:
    parent_path, _, attr = path.rpartition(".")
    setattr(model.get_submodule(parent_path) if parent_path else model, attr, layer)


def load_gguf_linears(model: nn.Module, gguf_path: str | Path, cfg: ModelConfig, plan: ShardPlan) -> dict[str, int]:
    """Swap the linears of a model whose float weights are loaded for GGUFLinear layers over the
    file's own blocks. Layers whose tensors are float (F32/F16/BF16) or of a type the kernels lack,
    or whose tensor-parallel input slice is not on 32-value groups, keep their float weights (logged).
    Returns a count of layers per outcome, for the log and tests."""
    found = _linear_blocks({t.name: t for t in read_tensors(gguf_path)}, cfg, plan)
    counts = {"gguf": 0, "float": 0}
    modules = dict(model.named_modules())
    for path, (parts, _) in sorted(found.items()):
        linear = modules.get(path)
        if not isinstance(linear, nn.Linear):
            continue
        entries = _usable(linear, parts)
        if entries is None:
            counts["float"] += 1
            continue
        layer = GGUFLinear(linear.in_features, linear.out_features, [e.part() for e in entries], float_bias(linear))
        _replace(model, path, layer)
        counts["gguf"] += 1
    if counts["float"]:
        log.info("GGUF: %d linear layers kept as float (unsupported type or slice)", counts["float"])
    return counts


def load_gguf_model(model: nn.Module, gguf_path: str | Path, cfg: ModelConfig, plan: ShardPlan,
                    device: torch.device | str = "cpu") -> dict[str, int]:
    """Load a model built on the meta device from the GGUF file: linears and the embedding over the
    file's blocks, everything else (and the float fallbacks) dequantized from it. Returns counts:
    `gguf` / `float` linear layers, `embedding` 1 when the embedding reads blocks (0: float)."""
    tensors = {t.name: t for t in read_tensors(gguf_path)}
    tied = cfg.tie_word_embeddings
    embedding = _gguf_embedding(model, tensors, plan)
    if embedding is not None:
        _replace(model, "embed_tokens", embedding)
    counts = {"gguf": 0, "float": 0, "embedding": int(embedding is not None)}
    as_blocks: set[str] = {"model.embed_tokens.weight"} if embedding is not None else set()
    for path, (parts, names) in sorted(_linear_blocks(tensors, cfg, plan).items()):
        linear = model.get_submodule(path)
        entries = _usable(linear, parts)
        if tied and path == "lm_head" and embedding is None:
            entries = None  # the head is the float embedding table itself
        if entries is None:
            counts["float"] += 1
            continue
        shared = embedding.blocks if tied and path == "lm_head" else None  # one copy for both
        bias = None if linear.bias is None else torch.zeros(linear.out_features)  # filled below, in place
        _replace(model, path, GGUFLinear(linear.in_features, linear.out_features,
                                         [e.part(shared) for e in entries], bias))
        as_blocks.update(names)
        counts["gguf"] += 1
    _materialize(model, torch.device(device))
    if tied and embedding is None:
        model.lm_head.weight = model.embed_tokens.weight
    model.load_weights(_float_tensors(tensors, cfg, skip=as_blocks))
    if counts["float"] or not counts["embedding"]:
        log.info("GGUF: %d linear layers%s kept as float (unsupported type or slice)", counts["float"],
                 "" if counts["embedding"] else " and the embedding")
    return counts


def _gguf_embedding(model: nn.Module, tensors: dict[str, Any], plan: ShardPlan) -> GGUFEmbedding | None:
    """This rank's vocabulary rows of the token embedding as blocks, or None (a type without kernel)."""
    t = tensors[EMBEDDING_SOURCE]
    current = model.embed_tokens
    type_name = t.tensor_type.name
    if type_name not in BLOCK_TYPES or not isinstance(current, VocabParallelEmbedding):
        log.info("GGUF %s: type %s has no kernel; kept as float", EMBEDDING_SOURCE, type_name)
        return None
    vocab, hidden = int(t.shape[1]), int(t.shape[0])
    if hidden % BLOCK_TYPES[type_name][1]:
        return None
    start, length = plan.rows("vocab")
    view = np.asarray(t.data).reshape(vocab, -1)[start : start + length]
    return GGUFEmbedding(type_name, torch.from_numpy(np.array(view, order="C")), hidden, current.tp,
                         current.vocab_start)


def _materialize(model: nn.Module, device: torch.device) -> None:
    """Give every tensor still on the meta device real (uninitialized) memory; the weights loaded
    next fill it. Unlike `to_empty`, this leaves the blocks already in place alone."""
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is not None and p.is_meta:
                module._parameters[name] = nn.Parameter(torch.empty_like(p, device=device),
                                                        requires_grad=p.requires_grad)
        for name, b in list(module._buffers.items()):
            if b is not None and b.is_meta:
                module._buffers[name] = torch.empty_like(b, device=device)


def _float_tensors(tensors: dict[str, Any], cfg: ModelConfig, skip: set[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, float32 tensor) for every weight not held as blocks, dequantized one at a time."""
    config = {"model_type": cfg.family, "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads}
    for hf, _, load in hf_float_tensors(tensors, config):
        if hf not in skip:
            w = load()  # F32 tensors come as read-only views of the mapped file
            yield hf, torch.from_numpy(w if w.flags.writeable else w.copy())
