"""Convert an HF-style model folder into DashInfer's format (.dimodel graph + .ditensors weights), once.

The result lands in `$DASHCHAT_CACHE/dashinfer/<name>-<key>/`, written into a temporary folder and
renamed, so readers see a whole model or none. The key covers the folder's identity (config and
weight files: path, size, mtime) and every option that changes the converted files.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# Bump when the converted files change for the same inputs: older conversions are then ignored.
FORMAT_VERSION = 1
MODEL_NAME = "model"  # file stem inside the converted folder

# HF architecture -> DashInfer model type. Others have no DashInfer graph that matches HF's math.
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "LLaMA_v2",
    "MistralForCausalLM": "LLaMA_v2",
    "Qwen2ForCausalLM": "Qwen_v20",
}
_MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
_ROTARY_OPS = ("Rotary", "RotaryMulQuery")


@dataclass(frozen=True)
class DashInferModel:
    """A converted model: what `AsModelConfig` needs to load it."""

    dir: Path
    model_type: str
    data_type: str

    @property
    def model_path(self) -> Path:
        return self.dir / f"{MODEL_NAME}.dimodel"

    @property
    def weights_path(self) -> Path:
        return self.dir / f"{MODEL_NAME}.ditensors"


def cache_root() -> Path:
    """$DASHCHAT_CACHE or ~/.cache/dashchat."""
    return Path(os.environ.get("DASHCHAT_CACHE") or Path.home() / ".cache" / "dashchat").expanduser()


def load_hf_config(model_dir: str | os.PathLike[str]) -> dict[str, Any]:
    with open(Path(model_dir) / "config.json", encoding="utf-8") as f:
        return json.load(f)


def dashinfer_model_type(cfg: dict[str, Any]) -> str:
    """The DashInfer model type for an HF config, or a ValueError saying what is supported and why not."""
    archs = cfg.get("architectures") or [_MODEL_TYPES.get(cfg.get("model_type", ""), cfg.get("model_type"))]
    arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
    if arch is None:
        raise ValueError(
            f"the dashinfer engine does not support architecture {archs!r}; supported: "
            + ", ".join(f"{a} (as {t})" for a, t in SUPPORTED_ARCHITECTURES.items())
        )
    heads, hidden = cfg["num_attention_heads"], cfg["hidden_size"]
    problems = []
    if cfg.get("head_dim") not in (None, hidden // heads) or hidden % heads:
        problems.append(f"head_dim {cfg.get('head_dim')} != hidden_size / num_attention_heads")
    scaling = cfg.get("rope_scaling") or (cfg.get("rope_parameters") or {})
    if scaling.get("rope_type", scaling.get("type", "default")) not in ("default", None):
        problems.append(f"rope scaling {scaling.get('rope_type', scaling.get('type'))!r}")
    if cfg.get("hidden_act", "silu") != "silu":
        problems.append(f"activation {cfg.get('hidden_act')!r}")
    if SUPPORTED_ARCHITECTURES[arch] == "LLaMA_v2" and (cfg.get("attention_bias") or cfg.get("mlp_bias")):
        problems.append("attention/MLP biases")
    if cfg.get("sliding_window") and cfg.get("use_sliding_window", arch == "MistralForCausalLM"):
        problems.append("sliding-window attention")
    if problems:
        raise ValueError(f"the dashinfer engine cannot run this {arch} model: {'; '.join(problems)} unsupported")
    return SUPPORTED_ARCHITECTURES[arch]


def rope_theta(cfg: dict[str, Any]) -> float:
    theta = cfg.get("rope_theta")
    if theta is None and isinstance(cfg.get("rope_parameters"), dict):  # transformers >= 5
        theta = cfg["rope_parameters"].get("rope_theta")
    return float(theta if theta is not None else 10000.0)


def convert(
    model_dir: str | os.PathLike[str], data_type: str = "float32", multinode: bool = False,
    root: Path | None = None,
) -> DashInferModel:
    """The converted model for `model_dir`, converting on the first call."""
    from ...models.gguf_convert import ensure_float_weights

    src = Path(model_dir).resolve()
    ensure_float_weights(src)  # a converted GGUF folder: its float weights, before they are keyed
    cfg = load_hf_config(src)
    model_type = dashinfer_model_type(cfg)
    out = _converted_dir(src, model_type, data_type, multinode, root)
    model = DashInferModel(out, model_type, data_type)
    if model.model_path.is_file() and model.weights_path.is_file():
        return model
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{out.name}-", dir=out.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache may be shared
    try:
        log.info("converting %s to DashInfer %s (%s) in %s", src, model_type, data_type, out)
        _serialize(src, cfg, model_type, data_type, multinode, tmp)
        try:
            os.rename(tmp, out)  # atomic: readers see a whole folder or none
        except OSError:
            if not model.model_path.is_file():  # only a concurrent converter winning is fine
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return model


def _converted_dir(src: Path, model_type: str, data_type: str, multinode: bool, root: Path | None) -> Path:
    files = sorted(p for p in src.iterdir() if p.name == "config.json" or p.suffix == ".safetensors")
    ident = [str(src), model_type, data_type, str(multinode), f"v{FORMAT_VERSION}", _dashinfer_version()]
    for p in files:
        st = p.stat()
        ident.append(f"{p.name}|{st.st_size}|{st.st_mtime_ns}")
    key = hashlib.sha256("\n".join(ident).encode()).hexdigest()[:16]
    return (root or cache_root()) / "dashinfer" / f"{src.name}-{key}"


def _dashinfer_version() -> str:
    """Part of the key: another DashInfer may serialize differently."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("dashinfer")
    except PackageNotFoundError:  # a source build without metadata
        return "unknown"


def _state_dict(src: Path, dtype: Any) -> dict[str, Any]:
    from safetensors.torch import load_file

    weights: dict[str, Any] = {}
    for p in sorted(src.glob("*.safetensors")):
        for name, t in load_file(str(p)).items():
            weights[name] = t.to(dtype)
    if not weights:
        raise ValueError(f"no *.safetensors weights in {src}")
    if "lm_head.weight" not in weights:  # tied embeddings: DashInfer's graph always has an lm_head
        embed = next(k for k in weights if k.endswith("embed_tokens.weight"))
        weights["lm_head.weight"] = weights[embed]
    return weights


def _serialize(src: Path, cfg: dict[str, Any], model_type: str, data_type: str, multinode: bool, out: Path) -> None:
    import torch
    from dashinfer import allspark

    theta = rope_theta(cfg)
    model_config = dict(cfg)
    # DashInfer's graphs default size_per_head to 128 and read the rope base from `rotary_base`.
    model_config["size_per_head"] = cfg["hidden_size"] // cfg["num_attention_heads"]
    model_config.setdefault("num_key_value_heads", cfg["num_attention_heads"])
    weights = _state_dict(src, getattr(torch, data_type))
    chatter = io.StringIO()
    with contextlib.redirect_stdout(chatter):  # its converter prints progress on stdout
        allspark.Engine().serialize_model_from_torch(
            model_name=MODEL_NAME, model_type=model_type, torch_model=weights, model_config=model_config,
            save_dir=str(out), multinode_mode=int(multinode), data_type=data_type,
            model_sequence_length=int(cfg.get("max_position_embeddings", 2048)), rotary_base=theta,
        )
    log.debug("%s", chatter.getvalue())
    _set_rope_base(out / f"{MODEL_NAME}.dimodel", theta)


def _set_rope_base(dimodel: Path, theta: float) -> None:
    """Write rope_theta into every rotary op: LLaMA_v2's graph builder drops it (so 10000 would be used)."""
    import numpy as np
    from dashinfer.allspark.model.allspark_pb2 import TransformerProto

    proto = TransformerProto()
    proto.ParseFromString(dimodel.read_bytes())
    base = np.float32(theta).tobytes()
    count = 0
    for graph in proto.graphs.values():
        for op in graph.ops:
            if op.op_type in _ROTARY_OPS:
                op.attr["rotary_base"] = base
                count += 1
    if count == 0:
        raise RuntimeError(f"no rotary op found in {dimodel}: cannot set rope_theta")
    dimodel.write_bytes(proto.SerializeToString())
