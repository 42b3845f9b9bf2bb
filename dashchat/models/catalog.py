"""Which models a server is asked to serve: a models folder's entries, a models file's list.

A models folder (`--models-dir`) serves each of its entries that is a model:
- a sub-folder with config.json and weights (*.safetensors, or a converted GGUF's source), or with
  one GGUF model (beside its projector, if any); served as the sub-folder's name;
- a `.gguf` file that holds a model, served as its name without `.gguf`. A split GGUF
  (`name-00001-of-00003.gguf`, ...) is one model, named `name`, opened at its first part.
Projectors (`mmproj*.gguf`, or any GGUF whose `general.architecture` is `clip`) and other
companion files are not models and are skipped.

A models file (`--models-config`, YAML or JSON) lists models with their own settings:

    models:
      - path: /models/qwen2.5-7b-instruct          # what --model-path takes
        served_model_name: [qwen, qwen2.5]         # optional; default: the path's last part
        keep_alive: 600                            # optional: seconds idle before unloading; -1: never
        memory_gb: 9                               # optional: overrides the estimate
        args: {quantization: int8, max_model_len: 8192, chat_template: ./qwen.jinja}
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dashchat.models.gguf_convert import SOURCE_FILE, read_header_str

_SPLIT = re.compile(r"^(?P<stem>.+)-(?P<part>\d{5})-of-(?P<count>\d{5})\.gguf$", re.IGNORECASE)
_MODEL_KEYS = {"path", "served_model_name", "keep_alive", "memory_gb", "args"}


class CatalogError(ValueError):
    """A models folder or file that cannot be served; the message says which entry and why."""


@dataclass
class ModelEntry:
    """One model as the command line, a models folder or a models file names it."""

    path: str | None  # what resolve_model takes (None: the embedded default)
    names: list[str] | None = None  # served names; None: the default
    args: dict[str, Any] = field(default_factory=dict)  # per-model flag values, by flag name
    keep_alive: float | None = None  # None: the server's
    memory_gb: float | None = None  # None: estimated
    from_dir: bool = False  # found in a models folder (one that cannot be served is skipped, not fatal)


def is_projector(path: Path) -> bool:
    """A multimodal projector (or another non-language GGUF), which is served beside a model, not as one."""
    if path.name.lower().startswith("mmproj"):
        return True
    try:
        arch = read_header_str(path, "general.architecture")
    except (OSError, ValueError) as exc:
        raise CatalogError(f"{path}: not a readable GGUF file ({exc})") from None
    return arch == "clip" or read_header_str(path, "general.type") in ("mmproj", "projector")


def _gguf_models(files: list[Path]) -> list[tuple[str, Path]]:
    """(name, file to open) for each model among GGUF files: split parts once, projectors not."""
    out = []
    for f in sorted(files):
        split = _SPLIT.match(f.name)
        if split is not None and int(split["part"]) != 1:
            continue
        if is_projector(f):
            continue
        out.append((split["stem"] if split else f.name[: -len(".gguf")], f))
    return out


def _is_gguf(p: Path) -> bool:
    return p.is_file() and p.name.lower().endswith(".gguf")


def scan_models_dir(folder: str | Path) -> list[ModelEntry]:
    d = Path(folder).expanduser()
    if not d.is_dir():
        raise CatalogError(f"--models-dir {folder}: not a folder")
    entries: list[ModelEntry] = []
    for name, f in _gguf_models([p for p in d.iterdir() if _is_gguf(p)]):
        entries.append(ModelEntry(str(f), [name]))
    for sub in sorted(p for p in d.iterdir() if p.is_dir() and not p.name.startswith(".")):
        has_config = (sub / "config.json").is_file()
        if has_config and (any(sub.glob("*.safetensors")) or (sub / SOURCE_FILE).is_file()):
            entries.append(ModelEntry(str(sub), [sub.name]))
            continue
        ggufs = _gguf_models([p for p in sub.iterdir() if _is_gguf(p)])
        if len(ggufs) == 1:
            entries.append(ModelEntry(str(ggufs[0][1]), [sub.name]))
    if not entries:
        raise CatalogError(f"--models-dir {folder}: no models in it (folders with config.json and weights, "
                           ".gguf files)")
    return entries


def read_models_file(path: str | Path) -> list[ModelEntry]:
    p = Path(path).expanduser()
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise CatalogError(f"--models-config {path}: {exc.strerror or exc}") from None
    import yaml  # a JSON file is YAML too

    try:
        data = json.loads(text) if p.suffix.lower() == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        raise CatalogError(f"--models-config {path}: not valid {p.suffix.lstrip('.') or 'YAML'}: {exc}") from None
    models = data.get("models") if isinstance(data, dict) else None
    if not isinstance(models, list) or not models:
        raise CatalogError(f"--models-config {path}: expected {{\"models\": [{{\"path\": ...}}, ...]}}")
    return [_entry(path, i, m, p.parent) for i, m in enumerate(models)]


def _entry(path: str | Path, i: int, m: Any, base: Path) -> ModelEntry:
    where = f"--models-config {path}: models[{i}]"
    if not isinstance(m, dict) or not isinstance(m.get("path"), str) or not m["path"].strip():
        raise CatalogError(f"{where}: needs a 'path' (a folder, a .gguf file, a hub id or an embedded name)")
    unknown = set(m) - _MODEL_KEYS
    if unknown:
        raise CatalogError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(_MODEL_KEYS))}")
    names = m.get("served_model_name")
    if isinstance(names, str):
        names = [names]
    if names is not None and (not isinstance(names, list) or not names
                              or not all(isinstance(n, str) and n.strip() for n in names)):
        raise CatalogError(f"{where}.served_model_name: a name or a list of names")
    args = m.get("args") or {}
    if not isinstance(args, dict):
        raise CatalogError(f"{where}.args: a mapping of flag names to values")
    # A relative path is the file's neighbour when it exists there (else: an embedded name or hub id).
    local = base / m["path"]
    model_path = str(local) if not Path(m["path"]).is_absolute() and local.exists() else m["path"]
    return ModelEntry(model_path, names, dict(args), _number(where, m, "keep_alive"), _number(where, m, "memory_gb"))


def _number(where: str, m: dict[str, Any], key: str) -> float | None:
    value = m.get(key)
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise CatalogError(f"{where}.{key}: a number")
    return None if value is None else float(value)
