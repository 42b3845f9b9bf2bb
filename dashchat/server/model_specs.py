"""What the model pool knows of a model before loading it: its context length, its architecture and
an estimate of the memory it will take (weights as the engine holds them, plus the KV cache budget)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("dashchat")

_WEIGHTS = ("*.safetensors",)
_DEFAULT_KV_GB = {"cpu": 2.0, "cuda": 8.0}  # as the native engine sizes it (model_runner._DEFAULT_KV_GB)


@dataclass
class ModelOutline:
    max_model_len: int | None
    architecture: str | None
    memory_bytes: int


def outline(eargs: Any) -> ModelOutline:
    """From the engine arguments (model folder, dtype, quantization, KV settings); cheap: reads
    config.json and file sizes only."""
    from dashchat.engine.native.llm_engine import default_max_model_len
    from dashchat.models.config import ModelConfig

    try:
        cfg = ModelConfig.from_dir(eargs.model_dir)
    except (OSError, ValueError, KeyError) as exc:  # the engine reports it properly when it loads
        log.warning("cannot read %s/config.json: %s", eargs.model_dir, exc)
        return ModelOutline(None, None, 0)
    max_len = default_max_model_len(eargs, cfg)
    return ModelOutline(max_len, cfg.architecture, _weight_bytes(eargs, cfg) + _kv_bytes(eargs, cfg, max_len))


def _weight_bytes(eargs: Any, cfg: Any) -> int:
    """Bytes of weights as served: the GGUF as shipped (quantization gguf), or the files' size scaled
    by how many bytes a weight takes served against stored (16-bit files served as float32: x2)."""
    from dashchat.engine.quantization.gguf_loading import gguf_source

    src = gguf_source(eargs.model_dir)
    if src is not None and eargs.quantization == "gguf":
        return src.stat().st_size
    files = [p for pattern in _WEIGHTS for p in Path(eargs.model_dir).glob(pattern)]
    size = sum(p.stat().st_size for p in files) if files else (src.stat().st_size if src is not None else 0)
    stored = 2.0 if files and (cfg.torch_dtype or "bfloat16") in ("bfloat16", "float16") else 4.0
    if src is not None and not files:
        stored = 1.0  # a quantized GGUF dequantized: roughly a byte a weight on disk
    served = {"int8": 1.0, "int4": 0.6}.get(eargs.quantization)
    if served is None:
        dtype = eargs.dtype if eargs.dtype != "auto" else ("float32" if eargs.device == "cpu" else "bfloat16")
        served = 4.0 if dtype == "float32" else 2.0
    return int(size * served / stored)


def _kv_bytes(eargs: Any, cfg: Any, max_len: int) -> int:
    if eargs.kv_cache_memory_gb is not None:
        return int(eargs.kv_cache_memory_gb * 2**30)
    dtype_bytes = 4 if (eargs.dtype in ("auto", "float32") and eargs.device == "cpu") or eargs.dtype == "float32" else 2
    per_token = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * dtype_bytes
    wanted = eargs.max_num_seqs * max_len * per_token
    return int(min(wanted, _DEFAULT_KV_GB.get(eargs.device, 2.0) * 2**30))
