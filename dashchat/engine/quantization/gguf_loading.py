"""Loading a GGUF model for `--quantization gguf`: its weights straight from the file's blocks.

`load_gguf_model` fills a model built on the meta device: each linear becomes a `GGUFLinear` over
the file's own blocks and the token embedding a `GGUFEmbedding` (tied embeddings share one copy of
the blocks with the head); no float32 copy of either is ever made. A tensor of a type the kernels
lack (IQ2_XXS, IQ3_S, TQ2_0, ...) is dequantized and held as bf16 rows, which the 16-bit kernels
multiply: never as float32, and what that costs is logged once at start. Only the small float
tensors (norms, biases), F32 weights and a tensor-parallel input slice not on 32-value groups are
float32. Before anything is copied out of the file, the bytes the weights (and the KV cache) will
hold are checked against the memory the system has available: a model that cannot fit is refused,
with the numbers. A rank reads its slices as the float path does (models/parallel.py's ShardPlan).

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
from ...models.gguf_convert import (
    SOURCE_FILE,
    SUPPORTED_QUANT_TYPES,
    expert_tensor,
    hf_expert_name,
    hf_float_tensors,
    hf_tensor_name,
    read_tensors,
    unpermute_qk,
)
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


def _rank_blocks(t: Any, kind: str | None, dim: int, plan: ShardPlan, shape: tuple[int, int]
                 ) -> tuple[np.ndarray, int, int, int] | None:
    """This rank's raw blocks of GGUF tensor `t` (a view of the file): (blocks, input width, width of
    the values the blocks hold per row, first input among them), or None when its input slice is not
    on 32-value groups (a float shard then)."""
    rows, cols = shape
    data = np.asarray(t.data).view(np.uint8).reshape(rows, -1)  # F16 tensors come as float16 arrays
    if kind is None or plan.size == 1:
        return data, cols, cols, 0
    start, length = plan.rows(kind)
    if dim == 0:
        return data[start : start + length], cols, cols, 0
    if start % 32 or length % 32:
        return None
    # only the blocks that cover this rank's inputs; a K-quant super-block of 256 values may straddle
    # two ranks, and then both keep it and the kernel reads only this rank's 32-value groups of it
    from gguf import GGML_QUANT_SIZES

    per_block, block_bytes = GGML_QUANT_SIZES[t.tensor_type]  # the file's blocks (of a type with kernel or not)
    first, end = start // per_block, -(-(start + length) // per_block)
    blocks = data[:, first * block_bytes : end * block_bytes]
    return blocks, length, (end - first) * per_block, start - first * per_block


# What a type without a kernel is held as: its values rounded to bf16, which the 16-bit kernels read.
FALLBACK_TYPE = "BF16"


def held_as(type_name: str) -> str | None:
    """The type a weight tensor of `type_name` is held as: its own (a kernel reads it), bf16 (a type
    the kernels lack), or None (float32: F32 weights)."""
    if type_name in BLOCK_TYPES:
        return type_name
    return FALLBACK_TYPE if type_name in SUPPORTED_QUANT_TYPES and type_name != "F32" else None


class _Blocks:
    """One source tensor's rows on this rank as the kernels will hold them: its blocks (a view of the
    mapped file until `data()` copies them out), or for a type without kernel (`file_type`) those
    blocks dequantized to bf16 rows by `data()`; and where the kernel reads its inputs."""

    def __init__(self, type_name: str, view: np.ndarray, width: int, k_full: int, k0: int, source: str,
                 copy: Any = None) -> None:
        self.file_type, self.type_name = type_name, held_as(type_name) or type_name
        self.view, self.width, self.k_full, self.k0 = view, width, k_full, k0
        self.source = source  # the GGUF tensor name
        self.copy = copy  # () -> the rows in memory, where they are part of a bigger copy (an expert's)

    @property
    def nbytes(self) -> int:
        """Bytes the rows will hold in memory."""
        return self.view.nbytes if self.type_name == self.file_type else self.view.shape[0] * self.k_full * 2

    def data(self) -> torch.Tensor:
        if self.copy is not None:
            return self.copy()
        if self.type_name == self.file_type:
            return torch.from_numpy(np.array(self.view, order="C"))
        return _bf16_rows(self.view, self.file_type, self.k_full)

    def part(self, shared: GGUFEmbedding | None = None) -> GGUFPart:
        # rows interleaved for the decode kernels (the embedding table a tied head shares is already
        # laid out as its GGUFEmbedding made it), except an expert whose rows are not whole groups
        # of 8: the MoE kernel hands its products chunks of an expert's rows starting on multiples of
        # 16, so each expert's groups stay whole (and within that expert's rows of the copy)
        if shared is not None:
            return GGUFPart(self.type_name, shared.blocks, self.width, self.k_full, self.k0,
                            interleaved=shared.interleaved)
        interleave = self.copy is None or self.view.shape[0] % 8 == 0
        return GGUFPart(self.type_name, self.data(), self.width, self.k_full, self.k0, interleave=interleave)


def _bf16_rows(view: np.ndarray, type_name: str, width: int, chunk_values: int = 1 << 22) -> torch.Tensor:
    """Rows of raw blocks of `type_name` as bf16 bytes [rows, 2 * width], dequantized a few rows at a
    time (the float32 temporaries stay small)."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize as gguf_dequantize

    qtype = GGMLQuantizationType[type_name]
    out = torch.empty(view.shape[0], width, dtype=torch.bfloat16)
    step = max(1, chunk_values // width)
    for r in range(0, view.shape[0], step):
        rows = np.asarray(gguf_dequantize(view[r : r + step], qtype), dtype=np.float32).reshape(-1, width)
        out[r : r + step] = torch.from_numpy(rows)
    return out.view(torch.uint8)


class _ExpertCopy:
    """This rank's rows of a 3-D expert tensor [experts, rows, bytes], copied out of the file once on
    first use (as bf16 rows for a type without kernel): expert e's rows are a contiguous run of it,
    so its GGUFLinear runs the same kernels at an offset pointer."""

    def __init__(self, view: np.ndarray, file_type: str, k_full: int) -> None:
        self.view, self.file_type, self.k_full, self.tensor = view, file_type, k_full, None

    def expert(self, e: int) -> torch.Tensor:
        if self.tensor is None:
            experts, rows = self.view.shape[:2]
            if held_as(self.file_type) == self.file_type:
                self.tensor = torch.from_numpy(np.array(self.view, order="C"))
            else:
                flat = self.view.reshape(experts * rows, -1)
                self.tensor = _bf16_rows(flat, self.file_type, self.k_full).view(experts, rows, -1)
        return self.tensor[e]


class _Experts:
    """Some rows of a 3-D expert tensor standing in for a 2-D one (what `_rank_blocks` reads)."""

    def __init__(self, t: Any, data: np.ndarray, cols: int) -> None:
        self.tensor_type, self.data = t.tensor_type, data
        self.shape = np.array([cols, data.shape[0]])


def _expert_linear_blocks(t: Any, layer: int, projection: str, cfg: ModelConfig, plan: ShardPlan
                          ) -> Iterator[tuple[str, int, _Blocks | None, str]]:  # fmt: skip
    """(module path, part index, blocks or None, HF name) for each expert's projection in a 3-D expert
    tensor (ggml shape [in, out, experts]: numpy [experts, out, row bytes])."""
    experts, rows, cols = (int(d) for d in reversed(t.shape.tolist()))
    module, index = FUSED_LINEARS.get(projection, (projection, 0))
    kind, dim = shard_split(f"layers.{layer}.mlp.experts.0.{module}")
    type_name = t.tensor_type.name
    data = np.asarray(t.data).view(np.uint8).reshape(experts, rows, -1)
    sliced = view = None
    if held_as(type_name) is None:
        log.info("GGUF %s: type %s is kept as float", t.name, type_name)
    elif dim == 1:  # every expert's rows, this rank's blocks of each
        flat = _Experts(t, data.reshape(experts * rows, -1), cols)
        sliced = _rank_blocks(flat, kind, dim, plan, (experts * rows, cols))
        view = None if sliced is None else sliced[0].reshape(experts, rows, -1)
    else:  # this rank's rows of every expert
        sliced = _rank_blocks(_Experts(t, data[0], cols), kind, dim, plan, (rows, cols))
        start, length = plan.rows(kind) if kind is not None and plan.size > 1 else (0, rows)
        view = data[:, start : start + length]
    if held_as(type_name) is not None and sliced is None:
        log.info("GGUF %s: this rank's input slice is not on 32-value groups; kept as float", t.name)
    copy = None if sliced is None else _ExpertCopy(view, type_name, sliced[2])
    for e in range(experts):
        entry = None
        if sliced is not None:
            _, width, k_full, k0 = sliced
            entry = _Blocks(type_name, view[e], width, k_full, k0, t.name, lambda e=e: copy.expert(e))
        yield (f"layers.{layer}.mlp.experts.{e}.{module}", index, entry,
               hf_expert_name(layer, e, projection, cfg.family))


def _linear_blocks(tensors: dict[str, Any], cfg: ModelConfig, plan: ShardPlan
                   ) -> dict[str, tuple[dict[int, _Blocks | None], list[str]]]:  # fmt: skip
    """Module path -> ({part index: its blocks, or None where it must stay float}, HF weight names)."""
    llama = cfg.family in ("llama", "mixtral")
    found: dict[str, tuple[dict[int, _Blocks | None], list[str]]] = {}
    head_source = "output.weight" if "output.weight" in tensors else EMBEDDING_SOURCE
    for name, whole in tensors.items():
        expert = expert_tensor(name)
        if expert is not None:
            for path, index, entry, hf in _expert_linear_blocks(whole, *expert, cfg, plan):
                parts_of, names = found.setdefault(path, ({}, []))
                parts_of[index] = entry
                names.append(hf)
            continue
        hf_whole = "lm_head.weight" if name == head_source else hf_tensor_name(name, cfg.family)
        if hf_whole is None or not hf_whole.endswith(".weight"):
            continue
        if name == EMBEDDING_SOURCE and hf_whole != "lm_head.weight":
            continue
        for hf, t in _unfused(hf_whole, whole, cfg):
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
            if held_as(type_name) is not None and shape is not None:
                sliced = _rank_blocks(t, kind, dim, plan, shape)
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
                log.info("GGUF %s: type %s is kept as float", name, type_name)
            parts_of, names = found.setdefault(path, ({}, []))
            parts_of[index] = entry
            names.append(hf_whole)  # the float loader skips the checkpoint's (fused) tensor
    return found


class _Rows:
    """Some rows of a GGUF tensor (a view), standing in for the tensor: one part of a fused one."""

    def __init__(self, t: Any, start: int, rows: int) -> None:
        self.tensor_type = t.tensor_type
        self.data = np.asarray(t.data).reshape(int(t.shape[1]), -1)[start : start + rows]
        self.shape = np.array([int(t.shape[0]), rows])


def _unfused(hf: str, t: Any, cfg: ModelConfig) -> list[tuple[str, Any]]:
    """A fused q/k/v or gate/up tensor (Phi-3 ships them so) as its parts under their HF names, each
    a view of its rows: rows are whole blocks, so each part shards per rank like a separate tensor."""
    prefix, _, proj = hf.removesuffix(".weight").rpartition(".")
    q, kv, inter = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.intermediate_size
    parts = {"qkv_proj": (("q_proj", 0, q), ("k_proj", q, kv), ("v_proj", q + kv, kv)),
             "gate_up_proj": (("gate_proj", 0, inter), ("up_proj", inter, inter))}.get(proj)  # fmt: skip
    if parts is None:
        return [(hf, t)]
    return [(f"{prefix}.{part}.weight", _Rows(t, start, rows)) for part, start, rows in parts]


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
    file's own blocks (bf16 rows for a type the kernels lack). Layers whose tensors are F32, or whose
    tensor-parallel input slice is not on 32-value groups, keep their float weights (logged).
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
        log.info("GGUF: %d linear layers kept as float (F32 weights or slice)", counts["float"])
    return counts


def load_gguf_model(model: nn.Module, gguf_path: str | Path, cfg: ModelConfig, plan: ShardPlan,
                    device: torch.device | str = "cpu", other_bytes: int = 0) -> dict[str, int]:
    """Load a model built on the meta device from the GGUF file: linears and the embedding over the
    file's blocks (bf16 rows for types without kernel), everything else (and the float fallbacks)
    dequantized from it. First checks that the weights, plus `other_bytes` the caller allocates next
    (the KV cache), fit the memory available (MemoryError, with the numbers, if not). Returns counts:
    `gguf` / `float` linear layers, `embedding` 1 when the embedding reads blocks (0: float)."""
    tensors = {t.name: t for t in read_tensors(gguf_path)}
    tied = cfg.tie_word_embeddings
    embedding_rows = _embedding_blocks(model, tensors, plan)
    found = _linear_blocks(tensors, cfg, plan)
    check_memory(held_bytes(tensors, found, embedding_rows, plan, cfg.family), other_bytes)
    embedding = None
    if embedding_rows is not None:
        current = model.embed_tokens
        # a tied head's products read the table every step: interleaved for them like any linear
        embedding = GGUFEmbedding(embedding_rows.type_name, embedding_rows.data(), embedding_rows.width, current.tp,
                                  current.vocab_start, interleave=tied)
        _replace(model, "embed_tokens", embedding)
    counts = {"gguf": 0, "float": 0, "embedding": int(embedding is not None)}
    as_blocks: set[str] = {"model.embed_tokens.weight"} if embedding is not None else set()
    for path, (parts, names) in sorted(found.items()):
        linear = model.get_submodule(path)
        entries = _usable(linear, parts)
        if tied and path == "lm_head" and embedding is None:
            entries = None  # the head is the float embedding table itself
        if entries is None:
            counts["float"] += 1
            continue
        shared = embedding if tied and path == "lm_head" else None  # one copy for both
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
        log.info("GGUF: %d linear layers%s kept as float (F32 weights or slice)", counts["float"],
                 "" if counts["embedding"] else " and the embedding")
    return counts


def _embedding_blocks(model: nn.Module, tensors: dict[str, Any], plan: ShardPlan) -> _Blocks | None:
    """This rank's vocabulary rows of the token embedding as blocks (or bf16 rows), None for float."""
    t = tensors[EMBEDDING_SOURCE]
    type_name = t.tensor_type.name
    if held_as(type_name) is None or not isinstance(model.embed_tokens, VocabParallelEmbedding):
        log.info("GGUF %s: type %s is kept as float", EMBEDDING_SOURCE, type_name)
        return None
    vocab, hidden = int(t.shape[1]), int(t.shape[0])
    if hidden % BLOCK_TYPES[held_as(type_name)][1]:
        return None
    start, length = plan.rows("vocab")
    view = np.asarray(t.data).view(np.uint8).reshape(vocab, -1)[start : start + length]
    return _Blocks(type_name, view, hidden, hidden, 0, EMBEDDING_SOURCE)


def held_bytes(tensors: dict[str, Any], found: dict[str, tuple[dict[int, _Blocks | None], list[str]]],
               embedding: _Blocks | None, plan: ShardPlan, family: str) -> dict[str, int]:
    """Bytes this rank's weights will hold in memory: as shipped (blocks), as bf16 (types without
    kernel; their cost is logged here, once), as float32 (norms, biases, F32 weights). Under tensor
    parallelism a float tensor's share is counted as a 1/size of it (near enough for a check)."""
    entries: dict[str, list[_Blocks]] = {}  # source tensor -> its parts (one per expert of a 3-D tensor)
    for parts, _ in found.values():
        for e in parts.values():
            if e is not None:
                entries.setdefault(e.source, []).append(e)
    if embedding is not None:
        entries[EMBEDDING_SOURCE] = [embedding]  # a tied head shares its rows
    held = {"shipped": 0, "bf16": 0, "float32": 0}
    fallbacks: dict[str, list[int]] = {}  # file type -> [tensors, bytes in the file, bytes as bf16]
    for name, t in tensors.items():
        if hf_tensor_name(name, family) is None and expert_tensor(name) is None:
            continue
        if name not in entries:
            share = plan.size if len(t.shape) >= 2 else 1
            held["float32"] += 4 * int(t.n_elements) // share
        for e in entries.get(name, []):
            if e.type_name == e.file_type:
                held["shipped"] += e.nbytes
            else:
                held["bf16"] += e.nbytes
                counts = fallbacks.setdefault(e.file_type, [0, 0, 0])
                counts[0] += 1
                counts[1] += e.view.nbytes
                counts[2] += e.nbytes
    for type_name, (n, file_bytes, bf16_bytes) in sorted(fallbacks.items()):
        log.warning("GGUF: %d tensors of type %s (%s in the file) have no kernel: held as bf16, %s", n, type_name,
                    _gb(file_bytes), _gb(bf16_bytes))
    return held


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB"


def mem_available() -> int | None:
    """The memory the system can give without swapping (/proc/meminfo's MemAvailable), or None."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def check_memory(held: dict[str, int], other_bytes: int = 0) -> None:
    """Refuse, before anything is allocated, a model whose weights and KV cache exceed MemAvailable."""
    need, available = sum(held.values()) + other_bytes, mem_available()
    if available is None or need <= available:
        return
    raise MemoryError(
        f"the model needs {_gb(need)} of memory ({_gb(held['shipped'])} of weights as shipped, "
        f"{_gb(held['bf16'])} held as bf16 for types without kernel, {_gb(held['float32'])} float32, "
        f"{_gb(other_bytes)} of KV cache) but only {_gb(available)} is available (MemAvailable)"
    )


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
