"""What Ollama's model routes say about the served models: /api/tags, /api/show, /api/ps, /api/version.

Ollama describes a model by its files (size, digest, modification time), its GGUF metadata
(family, parameter count, quantization) and what it can do (`capabilities`). dashchat reads the
same facts from each model's folder and config once, on first use, loaded or not: the folder does
not change while it is served. The digest names the served files (their names, sizes and times), not their
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
    names = state.pool.names
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
    template: str = ""
    thinking: bool = False
    task: str = "generate"  # what it is served for (models/pooling.py)


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


def _quantization(args: Any, files: list[Path]) -> str:
    mode = getattr(args, "quantization", None)
    if mode == "gguf" and files:
        return _gguf_file_type(files[0]) or "unknown"
    if mode in ("int8", "int4"):
        return mode.upper()  # dashchat's own re-quantization of the weights
    dtype = str(getattr(args, "dtype", "") or "")
    return {"bfloat16": "BF16", "float16": "F16"}.get(dtype, "F32" if getattr(args, "device", "cpu") == "cpu" else "")


def read_model_facts(state: ServerState, name: str) -> ModelFacts:
    """Blocking file access: call it with asyncio.to_thread (the routes read it once per model).
    A loaded model's facts come from its engine, an unloaded one's from its folder."""
    entry = state.pool.entry(name)
    served = entry.served
    engine = served.engine if served is not None else None
    args = getattr(engine, "args", None) or entry.spec.engine_args
    facts = ModelFacts(modified_at=_iso(state.created))
    model_dir = getattr(args, "model_dir", None) or entry.spec.path or None
    cfg = getattr(engine, "model_config", None) if served is not None else _model_config(model_dir)
    if served is not None:
        facts.template, thinking = served.chat_template or "", served.reasoning is not None
    else:
        facts.template, thinking = _template_and_thinking(entry.spec.cfg, model_dir)
    facts.thinking = thinking
    if served is not None:
        facts.task = getattr(served, "task", "generate")
    else:
        from dashchat.models.pooling import serving

        facts.task = serving(entry.spec.cfg.task, model_dir, getattr(cfg, "architecture", None))[0]
    max_model_len = served.max_model_len if served is not None else entry.spec.max_model_len
    files: list[Path] = []
    try:
        files = _weight_files(Path(model_dir)) if model_dir else []
    except OSError as exc:
        log.debug("cannot list the model folder: %s", exc)
    stats = [(p.name, p.stat()) for p in files if p.exists()]
    if stats:
        facts.size = sum(s.st_size for _, s in stats)
        facts.modified_at = _iso(max(s.st_mtime for _, s in stats))
    ident = "|".join(f"{n}:{s.st_size}:{s.st_mtime_ns}" for n, s in stats) or name
    facts.digest = hashlib.sha256(ident.encode()).hexdigest()
    family = getattr(cfg, "family", None) or "unknown"
    params = _parameter_count(cfg) if cfg is not None else 0
    facts.details = {
        "parent_model": "",
        "format": "gguf" if files and files[0].suffix == ".gguf" else "safetensors",
        "family": family,
        "families": [family],
        "parameter_size": _human(params) if params else "",
        "quantization_level": _quantization(args, files),
    }
    info: dict[str, Any] = {"general.architecture": family, "general.basename": entry.name,
                            "general.parameter_count": params,
                            # what this server serves (--max-model-len), which clients size prompts by
                            f"{family}.context_length": max_model_len}
    if cfg is not None:
        info.update({f"{family}.embedding_length": cfg.hidden_size, f"{family}.block_count": cfg.num_layers,
                     f"{family}.feed_forward_length": cfg.intermediate_size,
                     f"{family}.attention.head_count": cfg.num_heads,
                     f"{family}.attention.head_count_kv": cfg.num_kv_heads,
                     f"{family}.vocab_size": cfg.vocab_size})
    facts.model_info = info
    return facts


def _model_config(model_dir: str | None) -> Any:
    from dashchat.models.config import ModelConfig

    try:
        return ModelConfig.from_dir(model_dir) if model_dir else None
    except (OSError, ValueError, KeyError) as exc:  # a listing must not fail on facts it only shows
        log.debug("no model config in %s: %s", model_dir, exc)
        return None


def _template_and_thinking(cfg: Any, model_dir: str | None) -> tuple[str, bool]:
    """An unloaded model's chat template and whether it thinks, as loading it would find them."""
    from dashchat.server.text.reasoning import choose_format
    from dashchat.tokenizer import Tokenizer

    template = cfg.chat_template
    if template is None and model_dir:
        try:
            template = Tokenizer.from_dir(model_dir).chat_template
        except (OSError, ValueError) as exc:
            log.debug("no tokenizer in %s: %s", model_dir, exc)
    return template or "", choose_format(cfg.reasoning_parser, template) is not None


def capabilities(facts: ModelFacts) -> list[str]:
    if facts.task != "generate":  # Ollama names embedding models so; it has no word for a reranker
        return ["embedding"] if facts.task == "embed" else []
    # Every model takes tools: templates without them get dashchat's built-in tool prompt.
    caps = ["completion", "tools"]
    if facts.thinking:
        caps.append("thinking")
    return caps


def tags_body(state: ServerState, facts: dict[str, ModelFacts]) -> dict[str, Any]:
    return {"models": [{"name": tagged(n), "model": tagged(n), "modified_at": f.modified_at,
                        "size": f.size, "digest": f.digest, "details": f.details}
                       for e in state.pool.entries for f in [facts[e.name]] for n in e.spec.names]}


def show_body(facts: ModelFacts, name: str) -> dict[str, Any]:
    return {"license": "", "modelfile": f"# Served by dashchat {__version__}\nFROM {name}\n",
            "parameters": "", "template": facts.template, "details": facts.details,
            "model_info": facts.model_info, "capabilities": capabilities(facts),
            "modified_at": facts.modified_at}


def _iso_in(seconds: float) -> str:
    return (datetime.now(timezone.utc) + timedelta(seconds=seconds)).isoformat().replace("+00:00", "Z")


def ps_body(state: ServerState, facts: dict[str, ModelFacts]) -> dict[str, Any]:
    """The loaded models, with when each will unload: a model in use or kept forever (keep_alive
    negative) shows a time far ahead, as Ollama does for keep_alive -1."""
    out = []
    for entry in state.pool.loaded():
        served, f = entry.served, facts[entry.name]
        on_gpu = str(getattr(getattr(served.engine, "args", None), "device", "cpu")).startswith("cuda")
        if entry.expires_at is not None:
            expires = _iso(entry.expires_at)
        elif entry.refs and entry.keep_alive >= 0:
            expires = _iso_in(entry.keep_alive)  # counted from the end of the requests running now
        else:
            expires = _iso_in(365 * 200 * 86400.0)
        size = entry.spec.memory_bytes or f.size
        out += [{"name": tagged(n), "model": tagged(n), "size": size, "digest": f.digest, "details": f.details,
                 "expires_at": expires, "size_vram": size if on_gpu else 0, "context_length": served.max_model_len}
                for n in entry.spec.names]
    return {"models": out}


def version_body() -> dict[str, Any]:
    return {"version": OLLAMA_API_VERSION, "dashchat_version": __version__}
