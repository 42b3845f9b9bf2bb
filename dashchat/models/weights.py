"""Iterate over a model folder's safetensors weights (sharded or not), memory-mapped."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open


def weight_files(model_dir: str | os.PathLike[str]) -> list[Path]:
    """The folder's *.safetensors files: the shards its index names, else every file. A folder
    converted from a GGUF gets its float32 weights file here, on first use."""
    from .gguf_convert import ensure_float_weights

    d = Path(model_dir)
    ensure_float_weights(d)
    index = d / "model.safetensors.index.json"
    if index.is_file():
        with open(index, encoding="utf-8") as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        return [d / s for s in shards]
    files = sorted(d.glob("*.safetensors"))
    # Mistral-style repos ship consolidated.safetensors (other tensor names) beside the HF shards.
    hf = [f for f in files if not f.name.startswith("consolidated")]
    files = hf or files
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {d}")
    return files


def iter_weights(model_dir: str | os.PathLike[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every weight; tensors come from an mmap, so this stays cheap."""
    for path in weight_files(model_dir):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def iter_weight_slices(model_dir: str | os.PathLike[str]) -> Iterator[tuple[str, object]]:
    """(name, lazy slice) for every weight: indexing the slice reads only those rows or columns
    from the file, so a tensor-parallel rank reads only its own part of each weight."""
    for path in weight_files(model_dir):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                yield name, f.get_slice(name)
