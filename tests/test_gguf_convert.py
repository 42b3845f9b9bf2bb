"""GGUF -> HF folder conversion: real embedded models, tiny synthetic GGUFs, transformers as reference.

The converted embedded folders live in the real cache ($DASHCHAT_CACHE or ~/.cache/dashchat), so
only the first run pays for the conversion.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from dashchat.models import gguf_convert
from dashchat.models.config import ModelConfig
from dashchat.models.embedded import embedded_gguf
from dashchat.models.gguf_convert import (GGUFConvertError, convert_gguf, dequantize, ensure_float_weights,
                                          hf_float_tensors, open_gguf, read_tensors, unpermute_qk)
from dashchat.models.resolve import resolve_model
from dashchat.models.weights import iter_weights, weight_files
from dashchat.tokenizer import Tokenizer
from dashchat.tokenizer import bytes_to_unicode

gguf = pytest.importorskip("gguf")
Q = gguf.GGMLQuantizationType


@pytest.fixture(scope="session")
def smol_dir() -> Path:
    return resolve_model("smollm2-135m-instruct").path


@pytest.fixture(scope="session")
def qwen_dir() -> Path:
    return resolve_model(None).path


# ---------------------------------------------------------------- tiny synthetic GGUFs


BPE_MERGES = ["Ġ t", "h e", "Ġt he", "Ġ w", "o r", "Ġw or", "l d", "Ġwor ld", "l l", "e ll", "h ell",
              "hell o", "Ġ h", "ell o", "Ġh ello", "i n", "Ġ in", "1 2", "Ċ Ċ", "Ġ Ġ"]  # fmt: skip
BPE_SPECIAL = [("<|endoftext|>", 3), ("<|im_start|>", 3), ("<|im_end|>", 3), ("<think>", 4), ("</think>", 4)]


def byte_level_vocab() -> tuple[list[str], list[int], list[str]]:
    bu = bytes_to_unicode()
    tokens = [bu[b] for b in range(256)] + ["".join(m.split(" ")) for m in BPE_MERGES]
    types = [1] * len(tokens)
    for t, ty in BPE_SPECIAL:
        tokens.append(t)
        types.append(ty)
    return tokens, types, BPE_MERGES


SPM_PIECES = ["▁t", "he", "▁the", "ll", "llo", "▁he", "▁hello", "or", "▁w", "▁wor", "ld", "▁world", "in",
              "▁in", "is", "▁is", "an", "▁a", "▁an", "▁H", "▁W", "ello", "▁Hello"]  # fmt: skip
SPM_CHARS = ["▁", "h", "e", "l", "o", "w", "r", "d", "t", "a", "n", "i", "s", "H", "W", "\n"]


def sentencepiece_vocab() -> tuple[list[str], list[int], list[float]]:
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [2, 3, 3] + [6] * 256
    scores = [0.0] * len(tokens)
    for i, p in enumerate(SPM_PIECES):
        tokens.append(p)
        types.append(1)
        scores.append(-float(i))
    for i, c in enumerate(SPM_CHARS):
        tokens.append(c)
        types.append(1)
        scores.append(-1000.0 - i)
    for t, ty in [("<|im_start|>", 3), ("<|im_end|>", 3), ("<think>", 4)]:
        tokens.append(t)
        types.append(ty)
        scores.append(0.0)
    return tokens, types, scores


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py's LlamaModel.permute (HF -> GGUF row order)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(
    path: Path,
    arch: str = "llama",
    tokenizer: str = "llama",
    pre: str = "default",
    tied: bool = False,
    layer_types: tuple[str, ...] = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "F16", "BF16"),
) -> dict[str, np.ndarray]:
    """A tiny random model as llama.cpp would export it; returns its weights in HF convention."""
    rng = np.random.default_rng(0)
    # transformers' GGUF loader assumes qwen3's default head_dim (128) whatever the file says.
    hidden, n_head, n_kv, head_dim, ff, n_layers = 64, 4, 2, 128 if arch == "qwen3" else 16, 128, 2
    if tokenizer == "llama":
        tokens, types, scores = sentencepiece_vocab()
        merges: list[str] = []
    else:
        tokens, types, merges = byte_level_vocab()
        scores = []
    vocab = len(tokens)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny")
    w.add_block_count(n_layers)
    w.add_context_length(256)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_vocab_size(vocab)
    if arch == "llama":
        w.add_rope_dimension_count(head_dim)
    else:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    w.add_tokenizer_model(tokenizer)
    if tokenizer == "gpt2":
        w.add_tokenizer_pre(pre)
        w.add_token_merges(merges)
    else:
        w.add_token_scores(scores)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_bos_token_id(tokens.index("<s>") if "<s>" in tokens else tokens.index("<|endoftext|>"))
    w.add_eos_token_id(tokens.index("<|im_end|>"))
    w.add_add_bos_token(tokenizer == "llama")
    w.add_chat_template("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}")

    hf: dict[str, np.ndarray] = {}
    qtypes = iter(layer_types * 100)

    def add(gguf_name: str, hf_name: str, arr: np.ndarray, qtype: str = "F32", n_perm: int = 0) -> None:
        stored = llama_cpp_permute(arr, n_perm) if n_perm else arr
        if qtype == "F32":
            w.add_tensor(gguf_name, stored)
            back = stored
        elif qtype == "F16":
            w.add_tensor(gguf_name, stored.astype(np.float16))
            back = stored.astype(np.float16).astype(np.float32)
        else:
            data = gguf.quants.quantize(stored, Q[qtype])
            w.add_tensor(gguf_name, data, raw_dtype=Q[qtype])
            back = gguf.quants.dequantize(data, Q[qtype]).reshape(arr.shape)
        # The HF-convention weight the file stands for (quantization error included).
        hf[hf_name] = llama_cpp_unpermute_ref(back, n_perm) if n_perm else back

    def rnd(*shape: int) -> np.ndarray:
        return rng.standard_normal(shape).astype(np.float32) * 0.2

    add("token_embd.weight", "model.embed_tokens.weight", rnd(vocab, hidden), "F16")
    for i in range(n_layers):
        p, q = f"blk.{i}.", f"model.layers.{i}."
        perm = arch == "llama"
        add(p + "attn_norm.weight", q + "input_layernorm.weight", 1 + rnd(hidden))
        add(p + "ffn_norm.weight", q + "post_attention_layernorm.weight", 1 + rnd(hidden))
        add(p + "attn_q.weight", q + "self_attn.q_proj.weight", rnd(n_head * head_dim, hidden), next(qtypes),
            n_head if perm else 0)  # fmt: skip
        add(p + "attn_k.weight", q + "self_attn.k_proj.weight", rnd(n_kv * head_dim, hidden), next(qtypes),
            n_kv if perm else 0)  # fmt: skip
        add(p + "attn_v.weight", q + "self_attn.v_proj.weight", rnd(n_kv * head_dim, hidden), next(qtypes))
        add(p + "attn_output.weight", q + "self_attn.o_proj.weight", rnd(hidden, n_head * head_dim), next(qtypes))
        if arch == "qwen3":
            add(p + "attn_q_norm.weight", q + "self_attn.q_norm.weight", 1 + rnd(head_dim))
            add(p + "attn_k_norm.weight", q + "self_attn.k_norm.weight", 1 + rnd(head_dim))
        if arch == "qwen2":
            add(p + "attn_q.bias", q + "self_attn.q_proj.bias", rnd(n_head * head_dim))
            add(p + "attn_k.bias", q + "self_attn.k_proj.bias", rnd(n_kv * head_dim))
            add(p + "attn_v.bias", q + "self_attn.v_proj.bias", rnd(n_kv * head_dim))
        add(p + "ffn_gate.weight", q + "mlp.gate_proj.weight", rnd(ff, hidden), next(qtypes))
        add(p + "ffn_up.weight", q + "mlp.up_proj.weight", rnd(ff, hidden), next(qtypes))
        add(p + "ffn_down.weight", q + "mlp.down_proj.weight", rnd(hidden, ff), next(qtypes))
    add("output_norm.weight", "model.norm.weight", 1 + rnd(hidden))
    if not tied:
        add("output.weight", "lm_head.weight", rnd(vocab, hidden), "Q8_0")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return hf


def llama_cpp_unpermute_ref(w: np.ndarray, n_head: int) -> np.ndarray:
    """Independent inverse of llama_cpp_permute, by index bookkeeping rather than reshapes."""
    rows = w.shape[0]
    d = rows // n_head // 2
    out = np.empty_like(w)
    for h in range(n_head):
        for half in range(2):
            for i in range(d):
                out[h * 2 * d + half * d + i] = w[h * 2 * d + i * 2 + half]
    return out


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("DASHCHAT_CACHE", str(root))
    return root


def _load_hf(folder: Path) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in iter_weights(folder)}


# ---------------------------------------------------------------- unit checks


def test_unpermute_inverts_llama_cpp_permute() -> None:
    w = np.arange(8 * 2 * 6, dtype=np.float32).reshape(8 * 2, 6)
    for n_head in (1, 2, 4):
        assert np.array_equal(unpermute_qk(llama_cpp_permute(w, n_head), n_head), w)
        assert np.array_equal(llama_cpp_unpermute_ref(llama_cpp_permute(w, n_head), n_head), w)


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q6_K", "F16", "BF16"])
def test_dequantize_matches_gguf_reference(qtype: str) -> None:
    """Our fast kernels are bit-identical to gguf's numpy ones on random block data."""
    rng = np.random.default_rng(1)
    bs, ts = gguf.GGML_QUANT_SIZES[Q[qtype]]
    rows, cols = 64, 512
    raw = rng.integers(0, 256, (rows, cols // bs * ts), dtype=np.uint8)
    if qtype in ("F16", "BF16"):
        raw = rng.standard_normal((rows, cols)).astype(np.float32)
        raw = gguf.quants.quantize(raw, Q[qtype])
    elif qtype in ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"):
        blocks = raw.reshape(rows, -1, ts)  # finite f16 scales (random bytes may be inf/nan)
        blocks[..., 0:2] = rng.standard_normal(blocks.shape[:2] + (1,)).astype(np.float16).view(np.uint8)
        if qtype in ("Q4_1", "Q5_1"):
            blocks[..., 2:4] = rng.standard_normal(blocks.shape[:2] + (1,)).astype(np.float16).view(np.uint8)
    with np.errstate(invalid="ignore", over="ignore"):  # random K-quant scales may be inf/nan
        ours = dequantize(raw, Q[qtype])
        ref = gguf.quants.dequantize(raw, Q[qtype])
    assert ours.shape == (rows, cols) and ours.dtype == np.float32
    np.testing.assert_array_equal(ours, ref)


def test_weights_iterates_shards_and_skips_consolidated(tmp_path: Path) -> None:
    a, b = {"x": torch.ones(2)}, {"y": torch.zeros(3)}
    save_file(a, str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file(b, str(tmp_path / "model-00002-of-00002.safetensors"))
    save_file({"other.name": torch.ones(1)}, str(tmp_path / "consolidated.safetensors"))
    assert {k for k, _ in iter_weights(tmp_path)} == {"x", "y"}
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"x": "model-00001-of-00002.safetensors", "y": "model-00002-of-00002.safetensors"}})
    )
    assert [f.name for f in weight_files(tmp_path)] == ["model-00001-of-00002.safetensors",
                                                       "model-00002-of-00002.safetensors"]  # fmt: skip
    assert dict(iter_weights(tmp_path))["y"].shape == (3,)
    with pytest.raises(FileNotFoundError):
        weight_files(tmp_path / "nope")


# ---------------------------------------------------------------- tiny models


@pytest.mark.parametrize(
    ("arch", "tokenizer", "pre", "tied"),
    [("llama", "llama", "default", False), ("qwen2", "gpt2", "qwen2", True), ("qwen3", "gpt2", "qwen2", False)],
)
def test_tiny_conversion_weights_and_config(cache: Path, tmp_path: Path, arch: str, tokenizer: str, pre: str,
                                            tied: bool) -> None:  # fmt: skip
    src = tmp_path / f"tiny-{arch}.gguf"
    want = write_tiny_gguf(src, arch, tokenizer, pre, tied)
    out = convert_gguf(src)
    assert out.parent == cache / "gguf" and out.name.startswith(f"tiny-{arch}-")
    assert not list(out.glob("*.safetensors"))  # float weights only on demand
    got = _load_hf(out)  # the demand: written now, once
    assert [p.name for p in out.iterdir() if p.name.startswith(".tmp-")] == []
    assert set(got) == set(want)
    for name, arr in want.items():  # llama q/k un-permuted back to HF order; the rest untouched
        np.testing.assert_array_equal(got[name], arr, err_msg=name)
    cfg = json.loads((out / "config.json").read_text())
    mc = ModelConfig.from_dict(cfg)
    head_dim = 128 if arch == "qwen3" else 16
    assert (mc.family, mc.num_heads, mc.num_kv_heads, mc.head_dim, mc.num_layers) == (arch, 4, 2, head_dim, 2)
    assert mc.tie_word_embeddings is tied and ("lm_head.weight" in got) is not tied
    assert mc.attention_bias is (arch == "qwen2") and mc.qk_norm is (arch == "qwen3")
    assert cfg["torch_dtype"] == "float32" and cfg["max_position_embeddings"] == 256
    tok_cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert tok_cfg["eos_token"] == "<|im_end|>" and "chat_template" in tok_cfg
    tok = Tokenizer.from_dir(out)
    assert tok.vocab_size == cfg["vocab_size"] and tok.token_to_id("<|im_end|>") in tok.eos_token_ids


@pytest.mark.parametrize(("arch", "tokenizer", "pre"), [("llama", "llama", "default"), ("qwen3", "gpt2", "qwen2")])
def test_tiny_logits_match_transformers_gguf(cache: Path, tmp_path: Path, arch: str, tokenizer: str, pre: str) -> None:
    transformers = pytest.importorskip("transformers")
    src = tmp_path / "tiny.gguf"
    write_tiny_gguf(src, arch, tokenizer, pre)
    out = convert_gguf(src)
    ensure_float_weights(out)
    ours = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=src.name, dtype=torch.float32)
    ids = torch.tensor([[1, 5, 9, 200, 17, 3, 260, 261, 40]])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, ref(ids).logits, rtol=1e-4, atol=1e-4)


def test_tiny_tokenizers_match_transformers_gguf(cache: Path, tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    texts = ["hello world", "Hello World", " the is an in", "hello\nworld\n\n", "你好 😀", "  two  spaces ",
             "<|im_start|>user\nhello<|im_end|>\n", "<think>the world</think>", "12 + 1234", ""]  # fmt: skip
    for arch, kind, pre in [("llama", "llama", "default"), ("qwen3", "gpt2", "qwen2"),
                            ("llama", "gpt2", "llama-bpe"), ("llama", "gpt2", "default")]:  # fmt: skip
        d = tmp_path / f"{arch}-{kind}-{pre}"
        d.mkdir()
        write_tiny_gguf(d / "m.gguf", arch, kind, pre)
        ours = Tokenizer.from_dir(convert_gguf(d / "m.gguf"))
        ref = transformers.AutoTokenizer.from_pretrained(d, gguf_file="m.gguf")
        if pre == "llama-bpe":  # Llama 3's tokenizer.json and llama.cpp set it; transformers' GGUF path does not
            ref.backend_tokenizer.model.ignore_merges = True
        for text in texts:
            assert ours.encode(text) == ref.encode(text, add_special_tokens=False), (pre, text)
            ids = ours.encode(text)
            assert ours.decode(ids, skip_special_tokens=False) == ref.decode(ids, skip_special_tokens=False)
        if kind == "llama":  # sentencepiece files add BOS by default
            assert ours.encode("hello", add_special_tokens=True) == ref.encode("hello")


def test_smollm_pretokenizer_splits_digits(cache: Path, tmp_path: Path) -> None:
    """smollm splits every digit (as its tokenizer.json and llama.cpp do), even where merges exist."""
    write_tiny_gguf(tmp_path / "s.gguf", "llama", "gpt2", "smollm")
    tok = Tokenizer.from_dir(convert_gguf(tmp_path / "s.gguf"))
    assert [tok.id_to_token(i) for i in tok.encode("12 world")] == ["1", "2", "Ġworld"]
    write_tiny_gguf(tmp_path / "g.gguf", "llama", "gpt2", "gpt-2")
    tok = Tokenizer.from_dir(convert_gguf(tmp_path / "g.gguf"))
    assert [tok.id_to_token(i) for i in tok.encode("12 world")] == ["12", "Ġworld"]


# ---------------------------------------------------------------- errors, cache, atomicity


def _minimal_gguf(path: Path, arch: str, qtype: str = "F32") -> None:
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    if qtype == "F32":
        w.add_tensor("token_embd.weight", np.zeros((4, 32), dtype=np.float32))
    else:
        bs, ts = gguf.GGML_QUANT_SIZES[Q[qtype]]
        w.add_tensor("token_embd.weight", np.zeros((4, 256 // bs * ts), dtype=np.uint8), raw_dtype=Q[qtype])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _leftovers(cache: Path) -> list[str]:
    return sorted(p.name for p in (cache / "gguf").iterdir()) if (cache / "gguf").exists() else []


def test_unsupported_architecture_is_a_clear_error(cache: Path, tmp_path: Path) -> None:
    _minimal_gguf(tmp_path / "phi.gguf", "phi2")
    with pytest.raises(GGUFConvertError,
                       match=r"unsupported GGUF architecture 'phi2'.*supported: llama, qwen2, qwen3, qwen2moe, qwen3moe, gemma3, phi3"):
        convert_gguf(tmp_path / "phi.gguf")
    assert _leftovers(cache) == []


def test_unsupported_quant_type_is_a_clear_error(cache: Path, tmp_path: Path) -> None:
    _minimal_gguf(tmp_path / "iq.gguf", "llama", "Q8_1")  # llama.cpp's activation type, never in a model file
    with pytest.raises(GGUFConvertError, match=r"unsupported GGUF tensor type\(s\) Q8_1.*supported: F32, F16"):
        convert_gguf(tmp_path / "iq.gguf")
    assert _leftovers(cache) == []


def test_not_a_gguf_and_missing_file(cache: Path, tmp_path: Path) -> None:
    (tmp_path / "bad.gguf").write_bytes(b"not a gguf at all")
    with pytest.raises(GGUFConvertError, match="cannot read GGUF"):
        convert_gguf(tmp_path / "bad.gguf")
    with pytest.raises(GGUFConvertError, match="not found"):
        convert_gguf(tmp_path / "missing.gguf")


def test_crash_mid_conversion_leaves_no_folder(cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "t.gguf"
    write_tiny_gguf(src, "qwen3", "gpt2", "qwen2")

    def boom(*a: object, **k: object) -> None:
        raise KeyboardInterrupt  # like a Ctrl-C halfway through the conversion

    monkeypatch.setattr(gguf_convert, "build_tokenizer_files", boom)
    with pytest.raises(KeyboardInterrupt):
        convert_gguf(src)
    assert _leftovers(cache) == []  # neither the target nor the temp folder
    monkeypatch.undo()
    monkeypatch.setenv("DASHCHAT_CACHE", str(cache))
    out = convert_gguf(src)
    assert (out / "config.json").is_file() and not (out / "model.safetensors").exists()


def test_crash_mid_float_weights_leaves_no_file(cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The float32 weights written on demand land whole or not at all, and a later demand writes them."""
    src = tmp_path / "t.gguf"
    want = write_tiny_gguf(src, "qwen3", "gpt2", "qwen2")
    out = convert_gguf(src)
    real = gguf_convert._load
    calls = []

    def interrupted(*a: object) -> np.ndarray:
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # a Ctrl-C after two tensors are written
        return real(*a)

    monkeypatch.setattr(gguf_convert, "_load", interrupted)
    with pytest.raises(KeyboardInterrupt):
        weight_files(out)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "gguf_source.json",
                                                    "tokenizer.json", "tokenizer_config.json"]  # fmt: skip
    monkeypatch.undo()
    assert [f.name for f in weight_files(out)] == ["model.safetensors"]
    got = _load_hf(out)
    for name, arr in want.items():
        np.testing.assert_array_equal(got[name], arr, err_msg=name)


def test_folder_with_float_weights_is_left_alone(cache: Path, tmp_path: Path) -> None:
    """A folder converted before v2 already has its model.safetensors: nothing is rewritten."""
    src = tmp_path / "t.gguf"
    write_tiny_gguf(src, "qwen3", "gpt2", "qwen2")
    out = convert_gguf(src)
    save_file({"model.embed_tokens.weight": torch.ones(2, 2)}, str(out / "model.safetensors"))
    before = (out / "model.safetensors").stat().st_mtime_ns
    ensure_float_weights(out)
    assert [f.name for f in weight_files(out)] == ["model.safetensors"]
    assert (out / "model.safetensors").stat().st_mtime_ns == before


def test_cache_hit_converts_nothing_and_is_keyed_on_file_identity(cache: Path, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "t.gguf"
    write_tiny_gguf(src, "qwen3", "gpt2", "qwen2")
    first = convert_gguf(src)
    with monkeypatch.context() as patch:
        patch.setattr(gguf_convert, "_convert_into", lambda *a: pytest.fail("a cache hit converted again"))
        assert convert_gguf(src) == first
    os.utime(src, ns=(time.time_ns(), time.time_ns() + 10**9))  # the file changed: a new folder
    assert convert_gguf(src) != first
    assert len(_leftovers(cache)) == 2


def _same_tensors(path: Path, full_data: bool) -> None:
    ours, ref = read_tensors(path), open_gguf(path).tensors
    assert [t.name for t in ours] == [t.name for t in ref]
    for a, b in zip(ours, ref):
        assert (a.tensor_type, a.n_elements, a.n_bytes, a.data_offset) == (b.tensor_type, b.n_elements, b.n_bytes,
                                                                           b.data_offset), a.name  # fmt: skip
        assert a.shape.tolist() == b.shape.tolist() and a.data.shape == b.data.shape and a.data.dtype == b.data.dtype
        np.testing.assert_array_equal(a.data if full_data else a.data[:2], b.data if full_data else b.data[:2])


@pytest.mark.parametrize(("arch", "tokenizer", "pre"), [("llama", "llama", "default"), ("qwen2", "gpt2", "qwen2")])
def test_tensor_reader_matches_gguf_reader(tmp_path: Path, arch: str, tokenizer: str, pre: str) -> None:
    """The loader's header-skipping reader sees the tensors GGUFReader sees (past string arrays,
    merges and every scalar key type the writer emits)."""
    write_tiny_gguf(tmp_path / "t.gguf", arch, tokenizer, pre)
    _same_tensors(tmp_path / "t.gguf", full_data=True)


# ---------------------------------------------------------------- the embedded models


@pytest.mark.parametrize("model", ["smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct"])
def test_tensor_reader_on_embedded_models(model: str) -> None:
    _same_tensors(embedded_gguf(model), full_data=False)


def test_smollm_folder_layout(smol_dir: Path) -> None:
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json", "gguf_source.json"):
        assert (smol_dir / f).is_file(), f
    mc = ModelConfig.from_dir(smol_dir)
    assert (mc.architecture, mc.family, mc.num_layers, mc.hidden_size) == ("LlamaForCausalLM", "llama", 30, 576)
    assert (mc.num_heads, mc.num_kv_heads, mc.head_dim, mc.vocab_size) == (9, 3, 64, 49152)
    assert mc.tie_word_embeddings and mc.rope_theta == 100000.0 and mc.rms_norm_eps == 1e-5
    names = {k for k, _ in iter_weights(smol_dir)}
    assert "lm_head.weight" not in names and "model.embed_tokens.weight" in names
    assert "model.layers.29.self_attn.q_proj.weight" in names and len(names) == 2 + 30 * 9
    gen = json.loads((smol_dir / "generation_config.json").read_text())
    assert 2 in gen["eos_token_id"]


def test_smollm_logits_match_transformers_gguf(smol_dir: Path) -> None:
    """The strongest check: transformers on our folder == transformers on the GGUF itself."""
    transformers = pytest.importorskip("transformers")
    src = embedded_gguf("smollm2-135m-instruct")
    ensure_float_weights(smol_dir)
    ours = transformers.AutoModelForCausalLM.from_pretrained(smol_dir, dtype=torch.float32)
    ref = transformers.AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
    tok = Tokenizer.from_dir(smol_dir)
    ids = torch.tensor(
        [tok.encode("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")]
    )
    with torch.no_grad():
        a, b = ours(ids).logits, ref(ids).logits
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert tok.decode([int(a[0, -1].argmax())]).strip() == "The"


def test_qwen_folder_matches_gguf_reference_dequant(qwen_dir: Path) -> None:
    mc = ModelConfig.from_dir(qwen_dir)
    assert (mc.architecture, mc.num_layers, mc.hidden_size, mc.num_heads, mc.num_kv_heads) == (
        "Qwen2ForCausalLM", 24, 896, 14, 2)  # fmt: skip
    assert mc.attention_bias and mc.rope_theta == 1e6 and mc.vocab_size == 151936
    assert not mc.tie_word_embeddings  # this GGUF carries its own output.weight
    reader = open_gguf(embedded_gguf())
    by_name = {t.name: t for t in reader.tensors}
    seen = set()
    config = json.loads((qwen_dir / "config.json").read_text())
    floats = {name: (shape, load) for name, shape, load in hf_float_tensors(by_name, config)}
    assert len(floats) == len(by_name)  # what the float paths load (and write into model.safetensors)
    for gname, hname in [("blk.0.ffn_down.weight", "model.layers.0.mlp.down_proj.weight"),
                         ("blk.2.ffn_down.weight", "model.layers.2.mlp.down_proj.weight"),
                         ("blk.0.attn_q.weight", "model.layers.0.self_attn.q_proj.weight"),
                         ("blk.0.ffn_up.weight", "model.layers.0.mlp.up_proj.weight"),
                         ("blk.0.attn_q.bias", "model.layers.0.self_attn.q_proj.bias"),
                         ("blk.0.attn_v.weight", "model.layers.0.self_attn.v_proj.weight")]:  # fmt: skip
        t = by_name[gname]
        seen.add(t.tensor_type.name)
        ref = gguf.quants.dequantize(t.data, t.tensor_type).reshape(tuple(reversed(t.shape.tolist())))
        shape, load = floats[hname]
        assert shape == ref.shape
        np.testing.assert_array_equal(load(), ref, err_msg=gname)
    assert {"Q5_0", "Q8_0", "Q6_K", "Q4_K", "F32"} <= seen
