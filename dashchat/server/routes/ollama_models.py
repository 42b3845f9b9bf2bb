"""What Ollama's model routes say about the served model: /api/tags, /api/show, /api/ps, /api/version.

Ollama describes a model by its files (size, digest, modification time), its GGUF metadata
(family, parameter count, quantization) and what it can do (`capabilities`). dashchat reads the
same facts from the engine's model folder and config once, on first use: the folder does not change
while it is served. The digest names the served files (their names, sizes and times), not their
bytes: hashing gigabytes on a listing request would stall it for seconds.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from dashchat import __version__
from dashchat.server.plumbing.errors import bad_request
from dashchat.server.routes.ollama_errors import ollama_model_not_found
from dashchat.server.state import ServerState

log = logging.getLogger("dashchat.server")

# The Ollama release whose API shapes these routes follow; clients that gate features on
# /api/version compare against Ollama's numbers, not dashchat's (which /version gives).
OLLAMA_API_VERSION = "0.12.0"
_WEIGHT_SUFFIXES = (".safetensors", ".gguf", ".bin")


def tagged(name: str) -> str:
    """Ollama lists every model as name:tag; a served name without a tag is its `latest`."""
    return name if ":" in name.rsplit("/", 1)[-1] else f"{name}:latest"


def served_name(state: ServerState, name: str | None) -> str:
    """The served model an Ollama request names: the served name, or it with `:latest`, else 404."""
    if not name:
        raise bad_request("model is required", "model")
    names = state.cfg.served_model_names
    if name in names:
        return name
    for served in names:
        if tagged(served) == name or tagged(name) == served:
            return served
    raise ollama_model_not_found(name)


@dataclass
class ModelFacts:
    size: int = 0  # bytes of weights on disk
    digest: str = ""
    modified_at: str = ""
    details: dict[str, Any] = field(default_factory=dict)
    model_info: dict[str, Any] = field(default_factory=dict)


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).isoformat().replace("+00:00", "Z")


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


def _weight_files(model_dir: Path) -> list[Path]:
    """The files the served weights are read from: a converted GGUF folder's source file, else the folder's."""
    from dashchat.engine.quantization.gguf_loading import gguf_source

    src = gguf_source(model_dir)
    if src is not None:
        return [src]
    return sorted(p for p in model_dir.iterdir() if p.is_file() and p.name.endswith(_WEIGHT_SUFFIXES))


def _gguf_file_type(path: Path) -> str | None:
    """The GGUF's own quantization name (Q4_K_M, Q8_0, F16, ...), as Ollama shows it."""
    from gguf import LlamaFileType

    from dashchat.models.gguf_convert import read_header_int

    try:
        value = read_header_int(path, "general.file_type")
        return None if value is None else LlamaFileType(value).name.removeprefix("MOSTLY_")
    except (OSError, ValueError) as exc:  # a listing must not fail on metadata it only shows
        log.debug("no file type in %s: %s", path, exc)
        return None


def _parameter_count(cfg: Any) -> int:
    """Parameters of a Llama/Qwen-style decoder, from its config (what its weights hold)."""
    h, hd = cfg.hidden_size, cfg.head_dim
    q, kv = cfg.num_heads * hd, cfg.num_kv_heads * hd
    layer = h * q + 2 * h * kv + q * h + 3 * h * cfg.intermediate_size + 2 * h
    if cfg.attention_bias:
        layer += q + 2 * kv
    if cfg.qk_norm:
        layer += 2 * hd
    embed = cfg.vocab_size * h * (1 if cfg.tie_word_embeddings else 2)
    return embed + cfg.num_layers * layer + h


def _human(n: int) -> str:
    return f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def _quantization(engine: Any, files: list[Path]) -> str:
    args = getattr(engine, "args", None)
    mode = getattr(args, "quantization", None)
    if mode == "gguf" and files:
        return _gguf_file_type(files[0]) or "unknown"
    if mode in ("int8", "int4"):
        return mode.upper()  # dashchat's own re-quantization of the weights
    dtype = str(getattr(args, "dtype", "") or "")
    return {"bfloat16": "BF16", "float16": "F16"}.get(dtype, "F32" if getattr(args, "device", "cpu") == "cpu" else "")


def read_model_facts(state: ServerState) -> ModelFacts:
    """Blocking file access: call it with asyncio.to_thread (OllamaModels reads it once)."""
    engine = state.engine
    facts = ModelFacts(modified_at=_iso(state.created))
    cfg = getattr(engine, "model_config", None)
    model_dir = getattr(getattr(engine, "args", None), "model_dir", None)
    files: list[Path] = []
    try:
        files = _weight_files(Path(model_dir)) if model_dir else []
    except OSError as exc:
        log.debug("cannot list the model folder: %s", exc)
    stats = [(p.name, p.stat()) for p in files if p.exists()]
    if stats:
        facts.size = sum(s.st_size for _, s in stats)
        facts.modified_at = _iso(max(s.st_mtime for _, s in stats))
    ident = "|".join(f"{n}:{s.st_size}:{s.st_mtime_ns}" for n, s in stats) or state.cfg.model_name
    facts.digest = hashlib.sha256(ident.encode()).hexdigest()
    family = getattr(cfg, "family", None) or "unknown"
    params = _parameter_count(cfg) if cfg is not None else 0
    facts.details = {
        "parent_model": "",
        "format": "gguf" if files and files[0].suffix == ".gguf" else "safetensors",
        "family": family,
        "families": [family],
        "parameter_size": _human(params) if params else "",
        "quantization_level": _quantization(engine, files),
    }
    info: dict[str, Any] = {"general.architecture": family, "general.basename": state.cfg.model_name,
                            "general.parameter_count": params,
                            # what this server serves (--max-model-len), which clients size prompts by
                            f"{family}.context_length": state.max_model_len}
    if cfg is not None:
        info.update({f"{family}.embedding_length": cfg.hidden_size, f"{family}.block_count": cfg.num_layers,
                     f"{family}.feed_forward_length": cfg.intermediate_size,
                     f"{family}.attention.head_count": cfg.num_heads,
                     f"{family}.attention.head_count_kv": cfg.num_kv_heads,
                     f"{family}.vocab_size": cfg.vocab_size})
    facts.model_info = info
    return facts


def capabilities(state: ServerState) -> list[str]:
    task = getattr(state.model, "task", "generate")
    if task != "generate":  # Ollama names embedding models so; it has no word for a reranker
        return ["embedding"] if task == "embed" else []
    # Every model takes tools: templates without them get dashchat's built-in tool prompt.
    caps = ["completion", "tools"]
    if state.reasoning is not None:
        caps.append("thinking")
    return caps


def tags_body(state: ServerState, facts: ModelFacts) -> dict[str, Any]:
    return {"models": [{"name": tagged(n), "model": tagged(n), "modified_at": facts.modified_at,
                        "size": facts.size, "digest": facts.digest, "details": facts.details}
                       for n in state.cfg.served_model_names]}


def show_body(state: ServerState, facts: ModelFacts, name: str) -> dict[str, Any]:
    return {"license": "", "modelfile": f"# Served by dashchat {__version__}\nFROM {name}\n",
            "parameters": "", "template": state.chat_template or "", "details": facts.details,
            "model_info": facts.model_info, "capabilities": capabilities(state),
            "modified_at": facts.modified_at}


def ps_body(state: ServerState, facts: ModelFacts) -> dict[str, Any]:
    """The model is loaded for as long as the server runs: it never expires (Ollama's keep_alive -1)."""
    on_gpu = str(getattr(getattr(state.engine, "args", None), "device", "cpu")).startswith("cuda")
    forever = (datetime.now(timezone.utc) + timedelta(days=365 * 200)).isoformat().replace("+00:00", "Z")
    return {"models": [{"name": tagged(n), "model": tagged(n), "size": facts.size, "digest": facts.digest,
                        "details": facts.details, "expires_at": forever,
                        "size_vram": facts.size if on_gpu else 0, "context_length": state.max_model_len}
                       for n in state.cfg.served_model_names]}


def version_body() -> dict[str, Any]:
    return {"version": OLLAMA_API_VERSION, "dashchat_version": __version__}
