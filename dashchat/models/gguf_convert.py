"""Convert a GGUF file into the HF-style model folder every other layer reads.

The folder (config.json, tokenizer.json, tokenizer_config.json, generation_config.json and
gguf_source.json, naming the GGUF file) lands in the cache once, atomically, keyed by the file's
identity; later calls return it without opening the GGUF. It holds no weights: `--quantization gguf`
reads them from the GGUF file itself. Paths that need float weights (`--quantization none/int8/int4`,
CUDA, DashInfer, transformers in tests) get a float32 model.safetensors written into the folder on
first use (`ensure_float_weights`, called by `weights.weight_files`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shutil
import struct
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from ..paths import cache_dir
from ..tokenizer import bytes_to_unicode

log = logging.getLogger(__name__)

# Bump when the folder's layout or contents change: folders of older versions are then ignored.
# v2: no float32 model.safetensors at conversion (written on demand). A v1 folder still works when
# named directly (its weights file is used as it is), but the cache key of v2 keeps a dashchat that
# expects the weights in every converted folder away from v2's weightless ones.
FORMAT_VERSION = 2

SUPPORTED_GGUF_ARCHITECTURES = {
    "llama": ("LlamaForCausalLM", "llama"),
    "qwen2": ("Qwen2ForCausalLM", "qwen2"),
    "qwen3": ("Qwen3ForCausalLM", "qwen3"),
    "qwen2moe": ("Qwen2MoeForCausalLM", "qwen2_moe"),
    "qwen3moe": ("Qwen3MoeForCausalLM", "qwen3_moe"),
    "gemma3": ("Gemma3ForCausalLM", "gemma3_text"),
    "phi3": ("Phi3ForCausalLM", "phi3"),
}
_MIXTRAL = ("MixtralForCausalLM", "mixtral")  # GGUF "llama" with expert tensors
SUPPORTED_QUANT_TYPES = (
    "F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1",
    "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS",
    "IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "TQ1_0", "TQ2_0",
)  # fmt: skip


class GGUFConvertError(ValueError):
    """The GGUF file cannot be turned into a model folder (unsupported or malformed)."""


def convert_gguf(gguf_path: str | os.PathLike[str], cache_root: Path | None = None) -> Path:
    """The HF-style folder for `gguf_path`, converting it on the first call."""
    src = Path(gguf_path).resolve()
    if not src.is_file():
        raise GGUFConvertError(f"GGUF file not found: {src}")
    out = converted_dir(src, cache_root)
    if (out / "config.json").is_file():
        _note_source(out, src)
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale_temps(out.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{out.name}-", dir=out.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache may be shared
    log.info("converting %s to %s (once; later starts reuse it)", src.name, out)
    t0 = time.perf_counter()
    try:
        _convert_into(src, tmp)
        try:
            os.rename(tmp, out)  # atomic: readers see a whole folder or none
        except OSError:
            if not (out / "config.json").is_file():  # only a concurrent converter winning is fine
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("converted %s in %.1fs", src.name, time.perf_counter() - t0)
    _note_source(out, src)
    return out


SOURCE_FILE = "gguf_source.json"


def _note_source(out: Path, src: Path) -> None:
    """Record which GGUF file the folder came from: `--quantization gguf` reads its blocks from there.
    (Written beside the conversion, not part of it, so folders converted before this existed get it
    too; the folder's key already pins the file's identity.)"""
    marker = out / SOURCE_FILE
    text = json.dumps({"source": str(src)})
    try:
        if marker.is_file() and marker.read_text(encoding="utf-8") == text:
            return
        fd, tmp = tempfile.mkstemp(prefix=".tmp-source-", dir=out)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, marker)
    except OSError as e:  # a read-only cache: the model still serves, dequantized
        log.warning("cannot record the GGUF source of %s: %s", out, e)


def sweep_stale_temps(parent: Path, max_age_s: float = 6 * 3600) -> None:
    """Remove temp files/folders a killed process left behind (old enough not to be in use)."""
    now = time.time()
    for p in parent.glob(".tmp-*"):
        try:
            if now - p.stat().st_mtime > max_age_s:
                shutil.rmtree(p) if p.is_dir() else p.unlink()
        except OSError:
            pass


def converted_dir(src: Path, cache_root: Path | None = None) -> Path:
    """Where `src` converts to: its identity (path, size, mtime) plus the format version."""
    st = src.stat()
    ident = f"{src}|{st.st_size}|{st.st_mtime_ns}|v{FORMAT_VERSION}"
    key = hashlib.sha256(ident.encode()).hexdigest()[:16]
    stem = src.name[: -len(".gguf")] if src.name.lower().endswith(".gguf") else src.name
    return (cache_root or cache_dir()) / "gguf" / f"{stem}-{key}"


def open_gguf(path: str | os.PathLike[str]) -> Any:
    """gguf's GGUFReader, 3-4x faster on big vocabularies.

    Its header parser slices an np.memmap once per token and merge (300k+ times for Qwen), and every
    memmap slice runs Python-level __array_finalize__; slicing a plain ndarray view of the same
    mapping does not.
    """
    from gguf import GGUFReader

    class _Reader(GGUFReader):
        def _get(self, offset: int, dtype: Any, count: int = 1, override_order: Any = None) -> np.ndarray:
            plain = self.__dict__.get("_plain")
            if plain is None:
                plain = self._plain = self.data.view(np.ndarray)
            count = int(count)
            arr = plain[offset : offset + np.dtype(dtype).itemsize * count].view(dtype=dtype)[:count]
            return arr.view(arr.dtype.newbyteorder(self.byte_order if override_order is None else override_order))

    return _Reader(path)


_SCALAR_BYTES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # GGUFValueType -> bytes
_STRING, _ARRAY, _UINT32 = 8, 9, 4
_PLAIN_DTYPES = {"F16": np.float16, "F32": np.float32, "F64": np.float64, "I8": np.int8, "I16": np.int16,
                 "I32": np.int32, "I64": np.int64}  # fmt: skip


def read_tensors(path: str | os.PathLike[str]) -> list[Any]:
    """The tensors of a GGUF file as gguf's reader gives them (name, tensor_type, shape, data mapped
    from the file), without decoding the header's key/values: loading needs no tokenizer, and
    GGUFReader spends 2 s on Qwen's 300k vocabulary strings that this steps over in 0.1 s. Falls back
    to GGUFReader for a file it does not expect (big-endian, another version)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    from gguf.gguf_reader import ReaderTensor
    from gguf.quants import quant_shape_to_byte_shape

    buf = np.memmap(path, dtype=np.uint8, mode="r").view(np.ndarray)
    magic, version, n_tensors, n_kv = struct.unpack_from("<4sIQQ", buf, 0)
    if magic != b"GGUF" or version not in (2, 3):
        return list(open_gguf(path).tensors)

    off, alignment = 24, 32
    for _ in range(n_kv):
        key, off = _string(buf, off)
        (vtype,) = struct.unpack_from("<I", buf, off)
        if key == "general.alignment" and vtype == _UINT32:
            (alignment,) = struct.unpack_from("<I", buf, off + 4)
        off = _skip_value(buf, off + 4, vtype, path)
    infos = []
    for _ in range(n_tensors):
        name, off = _string(buf, off)
        (n_dims,) = struct.unpack_from("<I", buf, off)
        dims = np.array(struct.unpack_from(f"<{n_dims}Q", buf, off + 4), dtype=np.uint64)
        off += 4 + 8 * n_dims
        raw_type, offset = struct.unpack_from("<IQ", buf, off)
        off += 12
        infos.append((name, dims, GGMLQuantizationType(raw_type), offset))
    start = off + (-off % alignment)
    tensors = []
    for name, dims, qtype, offset in infos:
        n_elems = int(np.prod(dims))
        block_size, type_size = GGML_QUANT_SIZES[qtype]
        n_bytes = n_elems * type_size // block_size
        shape = tuple(reversed(dims.tolist()))
        begin = start + offset
        if qtype.name in _PLAIN_DTYPES:
            data = buf[begin : begin + n_bytes].view(_PLAIN_DTYPES[qtype.name]).reshape(shape)
        else:
            data = buf[begin : begin + n_bytes].reshape(quant_shape_to_byte_shape(shape, qtype))
        tensors.append(ReaderTensor(name=name, tensor_type=qtype, shape=dims, n_elements=n_elems, n_bytes=n_bytes,
                                    data_offset=begin, data=data, field=None))
    return tensors


_INT_FORMATS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 10: "<Q", 11: "<q"}  # GGUFValueType -> struct


def _read_header_value(path: str | os.PathLike[str], key: str, read) -> Any:
    """`read(buf, offset, value_type)` of the key's value, stepping over the other key/values
    undecoded as read_tensors does; None when the file is no GGUF or has no such key."""
    buf = np.memmap(path, dtype=np.uint8, mode="r").view(np.ndarray)
    magic, version, _, n_kv = struct.unpack_from("<4sIQQ", buf, 0)
    if magic != b"GGUF" or version not in (2, 3):
        return None
    off = 24
    for _ in range(n_kv):
        name, off = _string(buf, off)
        (vtype,) = struct.unpack_from("<I", buf, off)
        if name == key:  # keys are unique
            return read(buf, off + 4, vtype)
        off = _skip_value(buf, off + 4, vtype, path)
    return None


def read_header_int(path: str | os.PathLike[str], key: str) -> int | None:
    """One integer of a GGUF header's key/values (e.g. general.file_type); None when it has none."""
    return _read_header_value(path, key, lambda buf, off, vtype: int(struct.unpack_from(_INT_FORMATS[vtype], buf, off)[0])
                              if vtype in _INT_FORMATS else None)


def read_header_str(path: str | os.PathLike[str], key: str) -> str | None:
    """One string of a GGUF header's key/values (e.g. general.architecture); None when it has none."""
    return _read_header_value(path, key, lambda buf, off, vtype: _string(buf, off)[0] if vtype == _STRING else None)


def _string(buf: np.ndarray, off: int) -> tuple[str, int]:
    (n,) = struct.unpack_from("<Q", buf, off)
    return bytes(buf[off + 8 : off + 8 + n]).decode("utf-8"), off + 8 + n


def _skip_value(buf: np.ndarray, off: int, vtype: int, path: Any) -> int:
    """Offset past a header value of type `vtype` at `off`."""
    if vtype in _SCALAR_BYTES:
        return off + _SCALAR_BYTES[vtype]
    if vtype == _STRING:
        return off + 8 + struct.unpack_from("<Q", buf, off)[0]
    if vtype != _ARRAY:
        raise GGUFConvertError(f"{path}: unknown GGUF value type {vtype}")
    itype, count = struct.unpack_from("<IQ", buf, off)
    off += 12
    if itype in _SCALAR_BYTES:
        return off + count * _SCALAR_BYTES[itype]
    for _ in range(count):
        off = _skip_value(buf, off, itype, path)
    return off


def _convert_into(src: Path, out: Path) -> None:
    try:
        reader = open_gguf(src)
    except Exception as e:  # truncated, or not a GGUF at all
        raise GGUFConvertError(f"cannot read GGUF file {src}: {e}") from None
    meta = read_metadata(reader)
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_GGUF_ARCHITECTURES:
        raise GGUFConvertError(
            f"unsupported GGUF architecture {arch!r} in {src.name}; "
            f"supported: {', '.join(SUPPORTED_GGUF_ARCHITECTURES)}"
        )
    tensors = {t.name: t for t in reader.tensors}
    bad = sorted({t.tensor_type.name for t in reader.tensors} - set(SUPPORTED_QUANT_TYPES))
    if bad:
        raise GGUFConvertError(
            f"unsupported GGUF tensor type(s) {', '.join(bad)} in {src.name}; "
            f"supported: {', '.join(SUPPORTED_QUANT_TYPES)}"
        )
    config = build_config(meta, tensors)
    files: dict[str, Any] = {"config.json": config, **build_tokenizer_files(meta, config)}
    for name, obj in files.items():
        text = obj if isinstance(obj, str) else json.dumps(obj, indent=2, ensure_ascii=False)
        (out / name).write_text(text, encoding="utf-8")


# ---------------------------------------------------------------- metadata -> config.json


def read_metadata(reader: Any) -> dict[str, Any]:
    """All key/values of the GGUF header as Python values (float32s rounded to their short form)."""
    from gguf import GGUFValueType

    meta: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        value = field.contents()
        if field.types and field.types[0] == GGUFValueType.FLOAT32:
            value = float(str(np.float32(value)))  # 9.99999974e-07 -> 1e-06, as the HF config had it
        meta[key] = value
    return meta


_EOG_TEXTS = {  # llama.cpp also ends generation on these, whatever the file's eos id says
    "<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>",
    "<|end_of_text|>", "<EOT>", "<|return|>", "<|call|>",
}  # fmt: skip


def build_config(meta: dict[str, Any], tensors: dict[str, Any]) -> dict[str, Any]:
    """A standard HF config.json (loadable by transformers and ModelConfig) from GGUF metadata."""
    arch = meta["general.architecture"]
    hf_arch, model_type = SUPPORTED_GGUF_ARCHITECTURES[arch]
    if arch == "llama" and f"{arch}.expert_count" in meta:
        hf_arch, model_type = _MIXTRAL

    def get(key: str, default: Any = None) -> Any:
        return meta.get(f"{arch}.{key}", default)

    def need(key: str) -> Any:
        if f"{arch}.{key}" not in meta:
            raise GGUFConvertError(f"GGUF metadata lacks {arch}.{key}")
        return meta[f"{arch}.{key}"]

    hidden = need("embedding_length")
    n_heads = need("attention.head_count")
    n_kv = get("attention.head_count_kv", n_heads)
    if isinstance(n_kv, list):  # per-layer counts (hybrid models): not a plain transformer
        raise GGUFConvertError(f"per-layer head counts are not supported ({arch})")
    head_dim = get("attention.key_length") or (get("rope.dimension_count") if arch == "llama" else None)
    head_dim = head_dim or hidden // n_heads
    rope_theta = get("rope.freq_base", 10000.0)
    embd = tensors.get("token_embd.weight")
    if embd is None:
        raise GGUFConvertError("GGUF file has no token_embd.weight tensor")
    vocab_size = int(embd.shape[-1])
    tied = "output.weight" not in tensors
    bos = meta.get("tokenizer.ggml.bos_token_id")
    eos = meta.get("tokenizer.ggml.eos_token_id")
    cfg: dict[str, Any] = {
        "architectures": [hf_arch],
        "model_type": model_type,
        "hidden_size": hidden,
        "intermediate_size": need("feed_forward_length"),
        "num_hidden_layers": need("block_count"),
        "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": get("attention.layer_norm_rms_epsilon", 1e-6),
        "rope_theta": rope_theta,
        "rope_scaling": _rope_scaling(meta, arch, tensors, rope_theta, head_dim),
        "max_position_embeddings": get("context_length", 4096),
        "vocab_size": vocab_size,
        "tie_word_embeddings": tied,
        "torch_dtype": "float32",
        "bos_token_id": bos,
        "eos_token_id": eos,
    }
    if arch == "llama":
        cfg["attention_bias"] = "blk.0.attn_q.bias" in tensors
        cfg["mlp_bias"] = False
    elif arch in ("qwen2", "qwen2moe"):
        cfg["use_sliding_window"] = False
    elif arch in ("qwen3", "qwen3moe"):
        cfg["attention_bias"] = "blk.0.attn_q.bias" in tensors
        cfg["use_sliding_window"] = False
    elif arch == "gemma3":
        cfg.update(_gemma3_config(get, cfg))
    elif arch == "phi3":
        cfg.update(_phi3_config(get, cfg, tensors))
    if model_type in ("qwen2_moe", "qwen3_moe", "mixtral"):
        cfg.update(_moe_config(meta, arch, model_type, tensors, cfg["num_hidden_layers"]))
    if meta.get("tokenizer.ggml.padding_token_id") is not None:
        cfg["pad_token_id"] = meta["tokenizer.ggml.padding_token_id"]
    return cfg


def _moe_config(meta: dict[str, Any], arch: str, model_type: str, tensors: dict[str, Any], layers: int
                ) -> dict[str, Any]:  # fmt: skip
    """The mixture-of-experts fields of config.json, named as transformers' config for the family has them."""
    experts, used = meta.get(f"{arch}.expert_count"), meta.get(f"{arch}.expert_used_count")
    if not experts or not used:
        raise GGUFConvertError(f"GGUF metadata lacks {arch}.expert_count / {arch}.expert_used_count")
    # llama.cpp renormalises the chosen experts' weights for Qwen3-MoE and Mixtral, not Qwen2-MoE
    norm = meta.get(f"{arch}.expert_weights_norm", model_type != "qwen2_moe")
    if model_type == "mixtral":
        return {"num_local_experts": experts, "num_experts_per_tok": used}
    cfg = {"num_experts": experts, "num_experts_per_tok": used, "norm_topk_prob": bool(norm),
           "moe_intermediate_size": meta.get(f"{arch}.expert_feed_forward_length"), "decoder_sparse_step": 1,
           "mlp_only_layers": [i for i in range(layers) if f"blk.{i}.ffn_gate_inp.weight" not in tensors]}
    if model_type == "qwen2_moe":
        cfg["shared_expert_intermediate_size"] = meta.get(f"{arch}.expert_shared_feed_forward_length", 0)
    return cfg


def _gemma3_config(get: Any, cfg: dict[str, Any]) -> dict[str, Any]:
    """What a Gemma 3 GGUF implies beyond the common keys. llama.cpp fixes the layer pattern (five
    sliding layers in six) and the attention scale (1/sqrt(head_dim), 27B: 1/sqrt(hidden/heads),
    which is the checkpoints' query_pre_attn_scalar), so they are not in the file."""
    scalar = cfg["hidden_size"] // cfg["num_attention_heads"] if cfg["num_hidden_layers"] == 62 else cfg["head_dim"]
    return {
        "hidden_act": "gelu_pytorch_tanh", "hidden_activation": "gelu_pytorch_tanh",
        "sliding_window": get("attention.sliding_window"), "sliding_window_pattern": 6,
        "rope_local_base_freq": get("rope.freq_base_swa", 10000.0), "query_pre_attn_scalar": scalar,
        "final_logit_softcapping": get("final_logit_softcapping"),
    }  # fmt: skip


def _phi3_config(get: Any, cfg: dict[str, Any], tensors: dict[str, Any]) -> dict[str, Any]:
    """Phi-3's partial rotary, sliding window (0: none, Phi-4) and LongRoPE (its factors are two
    small tensors in the file; its attention factor follows from the context lengths)."""
    from gguf.quants import dequantize as gguf_dequantize

    out: dict[str, Any] = {
        "partial_rotary_factor": get("rope.dimension_count", cfg["head_dim"]) / cfg["head_dim"],
        "sliding_window": get("attention.sliding_window") or None,
        "original_max_position_embeddings": get("rope.scaling.original_context_length", cfg["max_position_embeddings"]),
    }
    if "rope_factors_long.weight" in tensors:
        def factors(name: str) -> list[float]:
            t = tensors[name]
            return [float(x) for x in np.asarray(gguf_dequantize(t.data, t.tensor_type)).reshape(-1)]

        out["rope_scaling"] = {"rope_type": "longrope", "long_factor": factors("rope_factors_long.weight"),
                               "short_factor": factors("rope_factors_short.weight")}
    return out


def _rope_scaling(meta: dict[str, Any], arch: str, tensors: dict[str, Any], theta: float, head_dim: int
                  ) -> dict[str, Any] | None:  # fmt: skip
    kind = meta.get(f"{arch}.rope.scaling.type")
    factor = meta.get(f"{arch}.rope.scaling.factor")
    if "rope_freqs.weight" in tensors:  # llama 3.1+: per-frequency factors baked into a tensor
        return _llama3_rope_scaling(tensors["rope_freqs.weight"], theta, head_dim, meta, arch)
    if kind in (None, "none") or not factor:
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": factor}
    if kind == "yarn":
        orig = meta.get(f"{arch}.rope.scaling.original_context_length")
        return {"rope_type": "yarn", "factor": factor, "original_max_position_embeddings": orig}
    raise GGUFConvertError(f"unsupported rope scaling type {kind!r}; supported: linear, yarn, llama3")


def _llama3_rope_scaling(t: Any, theta: float, head_dim: int, meta: dict[str, Any], arch: str) -> dict[str, Any]:
    """Recover llama3 rope_scaling from llama.cpp's rope_freqs tensor (and check it reproduces it)."""
    from gguf.quants import dequantize

    got = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float64).reshape(-1)
    factor = float(got.max())
    orig = int(meta.get(f"{arch}.rope.scaling.original_context_length") or 8192)
    params = {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": orig}  # fmt: skip
    want = []
    for i in range(0, head_dim, 2):  # the formula llama.cpp's converter used to write the tensor
        wavelen = 2 * math.pi * theta ** (i / head_dim)
        if wavelen < orig / 4.0:
            want.append(1.0)
        elif wavelen > orig / 1.0:
            want.append(factor)
        else:
            smooth = (orig / wavelen - 1.0) / (4.0 - 1.0)
            want.append(1 / ((1 - smooth) / factor + smooth))
    if len(want) != got.size or not np.allclose(got, want, rtol=1e-3):
        raise GGUFConvertError("unsupported rope_freqs tensor (not llama3 scaling with standard parameters)")
    return params


# ---------------------------------------------------------------- tensors -> float32 (model.safetensors on demand)

_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.bias": "self_attn.o_proj.bias",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "ffn_gate_inp.weight": "mlp.gate.weight",  # a mixture of experts' router
    "ffn_gate_inp_shexp.weight": "mlp.shared_expert_gate.weight",
    "ffn_gate_shexp.weight": "mlp.shared_expert.gate_proj.weight",
    "ffn_up_shexp.weight": "mlp.shared_expert.up_proj.weight",
    "ffn_down_shexp.weight": "mlp.shared_expert.down_proj.weight",
}
# 3-D tensors holding every expert's projection of a layer, expert e's rows after expert e - 1's
_EXPERT_PROJECTIONS = {"ffn_gate_exps.weight": "gate_proj", "ffn_up_exps.weight": "up_proj",
                       "ffn_down_exps.weight": "down_proj"}  # fmt: skip
_MIXTRAL_NAMES = {"mlp": "block_sparse_moe", "gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
# Where a family's GGUF names mean other HF tensors than Llama's
_ARCH_LAYER_NAMES = {
    "gemma3": {
        "ffn_norm.weight": "pre_feedforward_layernorm.weight",
        "post_attention_norm.weight": "post_attention_layernorm.weight",
        "post_ffw_norm.weight": "post_feedforward_layernorm.weight",
    },
    "phi3": {"attn_qkv.weight": "self_attn.qkv_proj.weight", "ffn_up.weight": "mlp.gate_up_proj.weight"},
}
_GGUF_ARCH = {"gemma3": "gemma3", "gemma3_text": "gemma3", "phi3": "phi3"}  # config model_type / family -> arch
# folded into config.json's rope_scaling
_SKIPPED = {"rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight"}
_BLK = re.compile(r"blk\.(\d+)\.(.+)")


def hf_tensor_name(gguf_name: str, arch: str | None = None) -> str | None:
    """HF name for a GGUF tensor name (of GGUF architecture `arch`, where a family names its
    tensors its own way); None for tensors that have no HF counterpart we keep."""
    if gguf_name in _SKIPPED:
        return None
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _BLK.fullmatch(gguf_name)
    names = {**_LAYER_NAMES, **_ARCH_LAYER_NAMES.get(arch or "", {})}
    if m and m.group(2) in names:
        return f"model.layers.{m.group(1)}.{names[m.group(2)]}"
    if m and m.group(2) in _EXPERT_PROJECTIONS:
        return None  # one tensor for all experts: see expert_tensor
    raise GGUFConvertError(f"unexpected GGUF tensor {gguf_name!r} (not a {arch or 'llama/qwen2/qwen3'} weight)")


def expert_tensor(gguf_name: str) -> tuple[int, str] | None:
    """(layer, projection) of a 3-D expert tensor (e.g. blk.3.ffn_up_exps.weight -> (3, "up_proj")), else None."""
    m = _BLK.fullmatch(gguf_name)
    if m and m.group(2) in _EXPERT_PROJECTIONS:
        return int(m.group(1)), _EXPERT_PROJECTIONS[m.group(2)]
    return None


def hf_expert_name(layer: int, expert: int, projection: str, model_type: str) -> str:
    """The HF checkpoint name of one expert's projection (Mixtral names its own way)."""
    if model_type == "mixtral":
        return f"model.layers.{layer}.block_sparse_moe.experts.{expert}.{_MIXTRAL_NAMES[projection]}.weight"
    return f"model.layers.{layer}.mlp.experts.{expert}.{projection}.weight"


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (interleaved RoPE pairs -> HF rotate_half halves)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_float_tensors(tensors: dict[str, Any], config: dict[str, Any]
                     ) -> Iterator[tuple[str, tuple[int, ...], Any]]:  # fmt: skip
    """(hf name, shape, thunk giving the float32 array) per GGUF tensor, as the HF checkpoint has it
    (llama's q/k rows unpermuted): shapes up front, data one tensor at a time. `config`: config.json's
    fields (model_type and the head counts)."""
    model_type = config["model_type"]
    llama = model_type in ("llama", "mixtral")  # llama.cpp permuted their q/k rows
    arch = _GGUF_ARCH.get(model_type)
    for name, t in tensors.items():
        expert = expert_tensor(name)
        if expert is not None:
            yield from _expert_float_tensors(t, *expert, model_type)
            continue
        hf = hf_tensor_name(name, arch)
        if hf is None:
            continue
        if model_type == "mixtral" and ".mlp.gate." in hf:
            hf = hf.replace(".mlp.", ".block_sparse_moe.")
        if arch == "gemma3" and hf.endswith("norm.weight"):  # llama.cpp stores Gemma's (1 + w); HF has w
            yield hf, tuple(int(d) for d in t.shape.tolist()), (lambda t=t: _load(t, (-1,), None) - np.float32(1.0))
            continue
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        n_head = None
        if llama and name.endswith("attn_q.weight"):
            n_head = config["num_attention_heads"]
        elif llama and name.endswith("attn_k.weight"):
            n_head = config["num_key_value_heads"]
        yield hf, shape, (lambda t=t, shape=shape, n_head=n_head: _load(t, shape, n_head))


def _expert_float_tensors(t: Any, layer: int, projection: str, model_type: str
                          ) -> Iterator[tuple[str, tuple[int, ...], Any]]:  # fmt: skip
    """One (name, shape, thunk) per expert of a 3-D expert tensor; each thunk dequantizes one expert."""
    experts, rows, cols = (int(d) for d in reversed(t.shape.tolist()))
    for e in range(experts):
        yield (hf_expert_name(layer, e, projection, model_type), (rows, cols),
               lambda e=e: np.ascontiguousarray(dequantize(t.data[e], t.tensor_type).reshape(rows, cols),
                                                dtype=np.float32))


def _load(t: Any, shape: tuple[int, ...], n_head: int | None) -> np.ndarray:
    w = dequantize(t.data, t.tensor_type).reshape(shape)
    if n_head is not None:
        w = unpermute_qk(w, n_head)
    return np.ascontiguousarray(w, dtype=np.float32)


FLOAT_WEIGHTS = "model.safetensors"


def ensure_float_weights(model_dir: str | os.PathLike[str]) -> None:
    """Give a converted GGUF folder its float32 weights file, dequantizing the GGUF once (atomically:
    a reader sees the whole file or none). A folder that has safetensors already (any folder not
    converted from a GGUF, or one converted by dashchat before v2) is left as it is."""
    d = Path(model_dir)
    if not (d / SOURCE_FILE).is_file() or any(d.glob("*.safetensors")):
        return
    try:
        src = Path(json.loads((d / SOURCE_FILE).read_text(encoding="utf-8"))["source"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise GGUFConvertError(f"cannot read {d / SOURCE_FILE}: {e}") from None
    if not src.is_file():
        raise GGUFConvertError(f"{d} was converted from {src}, which is gone: name the GGUF file again")
    config = json.loads((d / "config.json").read_text(encoding="utf-8"))
    log.info("writing float32 weights of %s into %s (once; later starts reuse them)", src.name, d)
    t0 = time.perf_counter()
    sweep_stale_temps(d)
    try:
        fd, tmp = tempfile.mkstemp(prefix=".tmp-weights-", dir=d)  # no .safetensors suffix: never globbed
    except OSError as e:
        raise GGUFConvertError(f"cannot write float weights into {d} ({e}); use --quantization gguf") from None
    os.close(fd)
    try:
        _write_safetensors(Path(tmp), hf_float_tensors({t.name: t for t in read_tensors(src)}, config))
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the cache may be shared
        os.replace(tmp, d / FLOAT_WEIGHTS)  # a concurrent writer's identical file may win: fine
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    log.info("wrote float32 weights of %s in %.1fs", src.name, time.perf_counter() - t0)


# bytes per 32-value block, has a min (`m`), has a 5th bit plane (`qh`)
_SIMPLE_BLOCKS = {"Q4_0": (18, False, False), "Q4_1": (20, True, False), "Q5_0": (22, False, True),
                  "Q5_1": (24, True, True)}  # fmt: skip


def dequantize(data: np.ndarray, qtype: Any) -> np.ndarray:
    """float32 values of one GGUF tensor's raw data: gguf's numpy kernels, with faster versions of
    the 32-value block formats (bit-identical; gguf's build several full-size temporaries)."""
    from gguf.quants import dequantize as gguf_dequantize

    name = qtype.name
    if name == "Q8_0":
        blocks = np.ascontiguousarray(data).reshape(-1, 34)
        d = blocks[:, :2].copy().view(np.float16).astype(np.float32)
        out = np.multiply(blocks[:, 2:].view(np.int8), d, dtype=np.float32)
    elif name in _SIMPLE_BLOCKS:
        out = _dequantize_simple(np.ascontiguousarray(data), *_SIMPLE_BLOCKS[name])
    else:
        return gguf_dequantize(data, qtype)
    return out.reshape(*data.shape[:-1], -1)


def _dequantize_simple(data: np.ndarray, nb: int, has_min: bool, has_high: bool, chunk: int = 1 << 16
                       ) -> np.ndarray:  # fmt: skip
    blocks = data.reshape(-1, nb)
    out = np.empty((blocks.shape[0], 32), dtype=np.float32)
    for s in range(0, blocks.shape[0], chunk):  # chunks keep temporaries small and in cache
        b = blocks[s : s + chunk]
        d = b[:, 0:2].copy().view(np.float16).astype(np.float32)
        qs = b[:, nb - 16 :]
        q = np.empty((b.shape[0], 32), dtype=np.uint8)
        np.bitwise_and(qs, 0x0F, out=q[:, :16])  # low nibbles are values 0..15, high ones 16..31
        np.right_shift(qs, 4, out=q[:, 16:])
        if has_high:
            hb = 4 if has_min else 2
            q |= np.unpackbits(b[:, hb : hb + 4], axis=1, bitorder="little") << 4  # bit i -> value i
        o = out[s : s + chunk]
        if has_min:
            np.multiply(q, d, out=o)
            o += b[:, 2:4].copy().view(np.float16).astype(np.float32)
        else:
            np.subtract(q, 16 if has_high else 8, out=o, dtype=np.float32, casting="unsafe")
            o *= d
    return out


def _write_safetensors(path: Path, tensors: Iterator[tuple[str, tuple[int, ...], Any]]) -> None:
    """Stream float32 tensors into one safetensors file: header first, then one tensor at a time.

    safetensors.save_file wants every tensor in memory at once; this keeps one.
    """
    entries = list(tensors)
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape, _ in entries:
        nbytes = 4 * math.prod(shape)
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # data starts 8-byte aligned
    with open(path, "wb") as f, ThreadPoolExecutor(1) as pool:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        # Dequantize the next tensor while this one is written (numpy drops the GIL).
        pending = pool.submit(entries[0][2]) if entries else None
        for i, (name, shape, _) in enumerate(entries):
            arr = pending.result()
            pending = pool.submit(entries[i + 1][2]) if i + 1 < len(entries) else None
            if arr.shape != shape:
                raise GGUFConvertError(f"tensor {name}: shape {arr.shape} != expected {shape}")
            f.write(memoryview(arr).cast("B"))
            del arr
        f.flush()
        os.fsync(f.fileno())


# ---------------------------------------------------------------- vocab -> tokenizer files

# Pre-tokenizer split regexes, as in the models' own tokenizer.json (and llama.cpp's llama-vocab.cpp).
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
# tokenizer.ggml.pre -> (normalizer, pre-tokenizer recipe, BPE ignore_merges)
_PRE_TOKENIZERS: dict[str, tuple[str | None, str, bool]] = {
    "qwen2": ("NFC", "split:qwen2", False),
    "deepseek-r1-qwen": ("NFC", "split:qwen2", False),
    "llama-bpe": (None, "split:llama3", True),
    "llama3": (None, "split:llama3", True),
    "llama-v3": (None, "split:llama3", True),
    "smollm": (None, "digits+gpt2", False),
    "starcoder": (None, "digits+gpt2", False),
    "refact": (None, "digits+gpt2", False),
    "codeshell": (None, "digits+gpt2", False),
    "gpt-2": (None, "gpt2", False),
    "gpt2": (None, "gpt2", False),
    "default": (None, "gpt2", False),
}
_SPLITS = {"qwen2": _QWEN2_SPLIT, "llama3": _LLAMA3_SPLIT}

# llama.cpp token types
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6


def build_tokenizer_files(meta: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    """tokenizer.json (as a str), tokenizer_config.json and generation_config.json contents."""
    kind = meta.get("tokenizer.ggml.model")
    tokens: list[str] = meta.get("tokenizer.ggml.tokens") or []
    if not tokens:
        raise GGUFConvertError("GGUF file has no tokenizer vocabulary (tokenizer.ggml.tokens)")
    types: list[int] = meta.get("tokenizer.ggml.token_type") or [_NORMAL] * len(tokens)

    def tok(key: str) -> str | None:
        i = meta.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[i] if isinstance(i, int) and 0 <= i < len(tokens) else None

    if kind == "gpt2":
        add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False))
        backend = _byte_level_tokenizer(meta, tokens, types)
    elif kind == "llama":
        # llama.cpp adds BOS to a sentencepiece vocabulary unless the file says otherwise.
        add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", True))
        backend = _sentencepiece_tokenizer(meta, tokens, types, tok("unknown"))
    else:
        raise GGUFConvertError(
            f"unsupported GGUF tokenizer model {kind!r}; supported: gpt2 (byte-level BPE), llama (sentencepiece BPE)"
        )
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False))
    _set_post_processor(backend, add_bos and tok("bos"), add_eos and tok("eos"), byte_level=kind == "gpt2")

    eos_ids = [meta[k] for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
                                 "tokenizer.ggml.eom_token_id") if isinstance(meta.get(k), int)]  # fmt: skip
    eos_ids += [i for i, (t, ty) in enumerate(zip(tokens, types)) if ty == _CONTROL and t in _EOG_TEXTS]
    eos_ids = list(dict.fromkeys(eos_ids))
    tok_cfg: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": tok("bos"),
        "eos_token": tok("eos"),
        "unk_token": tok("unknown"),
        "pad_token": tok("padding"),
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "clean_up_tokenization_spaces": False,
        "model_max_length": config["max_position_embeddings"],
    }
    if isinstance(meta.get("tokenizer.chat_template"), str):
        tok_cfg["chat_template"] = meta["tokenizer.chat_template"]
    gen_cfg: dict[str, Any] = {"bos_token_id": config.get("bos_token_id"), "eos_token_id": eos_ids}
    if config.get("pad_token_id") is not None:
        gen_cfg["pad_token_id"] = config["pad_token_id"]
    return {
        "tokenizer.json": backend.to_str(pretty=False),
        "tokenizer_config.json": tok_cfg,
        "generation_config.json": gen_cfg,
    }


def _byte_level_tokenizer(meta: dict[str, Any], tokens: list[str], types: list[int]) -> Any:
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE

    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in _PRE_TOKENIZERS:
        raise GGUFConvertError(f"unsupported GGUF pre-tokenizer {pre!r}; supported: {', '.join(_PRE_TOKENIZERS)}")
    norm, recipe, ignore_merges = _PRE_TOKENIZERS[pre]
    alphabet = set(bytes_to_unicode().values())
    spell = bytes_to_unicode()
    vocab: dict[str, int] = {}
    for i, (t, ty) in enumerate(zip(tokens, types)):
        if ty not in (_CONTROL, _USER_DEFINED) and not set(t) <= alphabet:
            t = "".join(spell[b] for b in t.encode("utf-8"))  # a raw-text token: spell it byte-level
        vocab.setdefault(t, i)
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges") or []]
    backend = Tokenizer(BPE(vocab, merges, ignore_merges=ignore_merges))
    if norm == "NFC":
        backend.normalizer = normalizers.NFC()
    if recipe.startswith("split:"):
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_SPLITS[recipe[6:]]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])  # fmt: skip
    elif recipe == "digits+gpt2":
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ])  # fmt: skip
    else:
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    _add_special_tokens(backend, tokens, types)
    return backend


def _sentencepiece_tokenizer(meta: dict[str, Any], tokens: list[str], types: list[int], unk: str | None) -> Any:
    """Sentencepiece BPE as transformers' LlamaTokenizer builds it: byte fallback, merges from scores."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import BPE

    vocab = {t: i for i, t in reversed(list(enumerate(tokens)))}  # first id wins on duplicates
    if meta.get("tokenizer.ggml.merges"):
        merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    else:
        merges = _merges_from_scores(tokens, meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens), vocab)
    backend = Tokenizer(BPE(vocab, merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
    prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="\u2581", prepend_scheme="first" if prefix else "never", split=False
    )
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    backend.decoder = decoders.Sequence(steps)
    _add_special_tokens(backend, tokens, types)
    return backend


def _merges_from_scores(tokens: list[str], scores: list[float], vocab: dict[str, int]) -> list[tuple[str, str]]:
    """BPE merges implied by a sentencepiece vocabulary: every split of a piece into two pieces,
    best-scored result first (the same order as transformers' generate_merges)."""
    found: list[tuple[str, str, float]] = []
    for piece, score in dict(zip(tokens, scores)).items():
        local = [
            (piece[:k], piece[k:], score) for k in range(1, len(piece)) if piece[:k] in vocab and piece[k:] in vocab
        ]
        local.sort(key=lambda x: (vocab[x[0]], vocab[x[1]]))
        found.extend(local)
    found.sort(key=lambda x: (x[2], len(x[0]), len(x[1])), reverse=True)
    return [(a, b) for a, b, _ in found]


def _add_special_tokens(backend: Any, tokens: list[str], types: list[int]) -> None:
    """Control tokens (and unknown) as special added tokens, user-defined ones as plain added tokens:
    both then match whole in text instead of being cut into pieces."""
    from tokenizers import AddedToken

    special = [
        AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty in (_CONTROL, _UNKNOWN)
    ]
    user = [AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types) if ty == _USER_DEFINED]
    backend.add_special_tokens(special)
    backend.add_tokens(user)


def _set_post_processor(backend: Any, bos: str | None | bool, eos: str | None | bool, byte_level: bool) -> None:
    from tokenizers import processors

    if bos or eos:
        single = " ".join(([str(bos)] if bos else []) + ["$A"] + ([str(eos)] if eos else []))
        pair = " ".join(([str(bos)] if bos else []) + ["$A"] + ([str(eos)] if eos else [])
                        + ([f"{bos}:1"] if bos else []) + ["$B:1"] + ([f"{eos}:1"] if eos else []))  # fmt: skip
        specials = [(str(t), backend.token_to_id(str(t))) for t in (bos, eos) if t]
        backend.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)
    elif byte_level:
        backend.post_processor = processors.ByteLevel(trim_offsets=False)


