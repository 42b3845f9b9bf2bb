"""Whatever the user names -> one HF-style model folder (see docs/DESIGN.md, "Model folder").

None -> the default embedded model; an embedded name -> that model; a .gguf file -> its converted
folder; a folder -> itself (or its single .gguf, converted); `org/name` -> a hub download.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from dashchat.models.embedded import DEFAULT_MODEL, EMBEDDED_MODELS, EmbeddedModelError, embedded_gguf
from dashchat.models.gguf_convert import SOURCE_FILE, GGUFConvertError, convert_gguf
from dashchat.models.hub import HubError, download_model

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.\-]*/[\w.\-]+")


@dataclass
class ResolvedModel:
    path: Path  # the HF-style folder
    name: str  # default served name


class ModelResolveError(RuntimeError):
    """The model cannot be found or prepared; the message says why and what to do (no traceback needed)."""


def resolve_model(model_path: str | None, use_modelscope: bool = False) -> ResolvedModel:
    try:
        return _resolve(model_path, use_modelscope)
    except (EmbeddedModelError, GGUFConvertError, HubError) as e:
        raise ModelResolveError(str(e)) from None


def _resolve(model_path: str | None, use_modelscope: bool) -> ResolvedModel:
    spec = (model_path or "").strip()
    if not spec:
        return _embedded(DEFAULT_MODEL)
    if spec.lower() in EMBEDDED_MODELS:
        return _embedded(spec.lower())
    p = Path(spec).expanduser()
    if p.is_file():
        if not _is_gguf(p):
            raise ModelResolveError(f"{p} is not a GGUF file; pass a .gguf file or a Hugging Face model folder")
        return ResolvedModel(convert_gguf(p), _strip_gguf(p.name))
    if p.is_dir():
        return ResolvedModel(_folder(p), p.resolve().name)
    if _HUB_ID.fullmatch(spec) and not spec.startswith((".", "~")):
        return ResolvedModel(download_model(spec, use_modelscope=use_modelscope), spec.rsplit("/", 1)[1])
    raise ModelResolveError(
        f"model {spec!r} not found: not an embedded model ({', '.join(EMBEDDED_MODELS)}), "
        "not an existing .gguf file or model folder, and not a hub id like 'org/name'"
    )


def _embedded(name: str) -> ResolvedModel:
    return ResolvedModel(convert_gguf(embedded_gguf(name)), name)


def _folder(d: Path) -> Path:
    """A folder is a model when it has config.json and safetensors, or exactly one .gguf file, or
    is a converted GGUF folder (config.json and the GGUF it came from; its weights are read there)."""
    has_safetensors = any(d.glob("*.safetensors"))
    if (d / "config.json").is_file() and (has_safetensors or (d / SOURCE_FILE).is_file()):
        return d
    ggufs = sorted(f for f in d.iterdir() if f.is_file() and f.name.lower().endswith(".gguf"))
    if len(ggufs) == 1 and not has_safetensors:
        return convert_gguf(ggufs[0])
    if len(ggufs) > 1:
        names = ", ".join(f.name for f in ggufs)
        raise ModelResolveError(f"folder {d} holds several .gguf files ({names}); pass the one to serve")
    if (d / "config.json").is_file():
        if any(d.glob("*.bin")) or any(d.glob("*.pth")):
            raise ModelResolveError(f"folder {d} has only .bin/.pth weights; dashchat loads *.safetensors")
        raise ModelResolveError(f"folder {d} has config.json but no *.safetensors weights")
    raise ModelResolveError(f"folder {d} is not a model: no config.json + *.safetensors, and no .gguf file")


def _is_gguf(p: Path) -> bool:
    try:
        with open(p, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


def _strip_gguf(name: str) -> str:
    return name[: -len(".gguf")] if name.lower().endswith(".gguf") else name
