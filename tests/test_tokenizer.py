"""dashchat.tokenizer.Tokenizer on the embedded models' converted folders, against transformers'
own GGUF tokenizer loading, plus the folder-parsing rules (templates, eos ids, raw token bytes)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from dashchat.models.embedded import embedded_gguf
from dashchat.models.gguf_convert import build_tokenizer_files
from dashchat.models.resolve import resolve_model
from dashchat.tokenizer import Tokenizer

TEXTS = [
    "Hello world!",
    "  leading spaces and trailing   ",
    "12345 + 678 = 99999; 3.14159 and 1,000,000",
    "你好，世界！今天天气怎么样？",
    "emoji 😀🎉👍🏽 family 👨\u200d👩\u200d👧",
    "def foo(x):\n    return x**2  # square\n\n\tprint(foo(3))\r\n",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
    "I'm sure they'll say WE'RE fine, don't you think?",
    "Ünïcödé café naïve résumé — “quotes” …",
    "русский текст, العربية, हिन्दी, 日本語のテキスト, 한국어",
    "\n\n\n   \t\t  \n",
    "<|endoftext|>x<|im_end|><|im_end|>",
    "",
    "mixed中文and English123abc",
    "```python\nimport numpy as np\narr = np.zeros((3, 4), dtype=np.float32)\n```",
]


@pytest.fixture(scope="module")
def folders() -> dict[str, Path]:
    return {
        "smollm2-135m-instruct": resolve_model("smollm2-135m-instruct").path,
        "qwen2.5-coder-0.5b-instruct": resolve_model(None).path,
    }


@pytest.mark.parametrize("name", ["smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct"])
def test_ids_match_transformers_gguf_tokenizer(folders: dict[str, Path], name: str) -> None:
    transformers = pytest.importorskip("transformers")
    src = embedded_gguf(name)
    ref = transformers.AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    ours = Tokenizer.from_dir(folders[name])
    assert ours.vocab_size == len(ref)
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == ref.encode(text, add_special_tokens=False), text
        assert ours.decode(ids, skip_special_tokens=False) == ref.decode(ids, skip_special_tokens=False)
        assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True)
        assert b"".join(ours.token_bytes(i) for i in ids) == text.encode("utf-8"), text


def test_qwen_specials_eos_and_template(folders: dict[str, Path]) -> None:
    tok = Tokenizer.from_dir(folders["qwen2.5-coder-0.5b-instruct"])
    assert tok.encode("<|im_start|>") == [151644]
    assert tok.encode("<tool_call>") == [151657]  # user-defined: whole, but not special
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_ids == {151645, 151643}
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    ids = tok.encode("<tool_call>hi<|im_end|>")
    assert tok.decode(ids) == "<tool_call>hi"  # specials dropped, added non-special kept
    assert tok.decode(ids, skip_special_tokens=False) == "<tool_call>hi<|im_end|>"
    assert 151645 in tok.special_token_ids and 151657 not in tok.special_token_ids
    assert tok.encode("hi", add_special_tokens=True) == tok.encode("hi")  # Qwen adds no BOS


def test_smollm_specials_and_eos(folders: dict[str, Path]) -> None:
    tok = Tokenizer.from_dir(folders["smollm2-135m-instruct"])
    assert tok.encode("<|im_start|>user") == [1, 4093]
    assert tok.eos_token == "<|im_end|>" and {2, 0} <= tok.eos_token_ids
    assert tok.id_to_token(1) == "<|im_start|>" and tok.token_to_id("<|im_end|>") == 2


def test_token_bytes_byte_level(folders: dict[str, Path]) -> None:
    tok = Tokenizer.from_dir(folders["qwen2.5-coder-0.5b-instruct"])
    world = tok.encode(" world")
    assert len(world) == 1 and tok.token_bytes(world[0]) == b" world"
    assert tok.token_bytes(tok.encode("\n")[0]) == b"\n"
    # A rare CJK character spans several tokens whose bytes are not valid UTF-8 alone.
    ids = tok.encode("𠀋")
    parts = [tok.token_bytes(i) for i in ids]
    assert b"".join(parts) == "𠀋".encode()
    table = tok.all_token_bytes()
    assert table is tok.all_token_bytes() and len(table) == tok.vocab_size
    assert table[151644] == b"<|im_start|>"
    assert tok.token_bytes(-1) == b"" and tok.token_bytes(10**7) == b""


def test_a_long_text_round_trips_through_the_rust_backend(folders: dict[str, Path]) -> None:
    """Encoding is the `tokenizers` library's compiled BPE (its speed is that library's; a bench, not a
    test, would time it), and ~15k characters come back whole."""
    from tokenizers import Tokenizer as RustTokenizer

    tok = Tokenizer.from_dir(folders["qwen2.5-coder-0.5b-instruct"])
    assert isinstance(tok._tok, RustTokenizer)
    text = " ".join(TEXTS) * 20
    ids = tok.encode(text)
    assert tok.decode(ids, skip_special_tokens=False) == text and len(ids) < len(text) / 2


# ---------------------------------------------------------------- a sentencepiece-style vocabulary


def _spm_meta() -> dict:
    pieces = ["▁h", "el", "lo", "▁hel", "▁hello", "▁w", "or", "ld", "▁wor", "▁world"]
    chars = ["▁", "h", "e", "l", "o", "w", "r", "d"]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces + chars + ["<|im_end|>"]
    types = [2, 3, 3] + [6] * 256 + [1] * (len(pieces) + len(chars)) + [3]
    scores = [0.0] * 259 + [-float(i) for i in range(len(pieces))] + [-100.0 - i for i in range(len(chars))] + [0.0]
    return {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.scores": scores,
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0,
    }


def _write_files(d: Path, files: dict) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    for name, obj in files.items():
        (d / name).write_text(obj if isinstance(obj, str) else json.dumps(obj), encoding="utf-8")
    return d


def test_sentencepiece_token_bytes_and_bos(tmp_path: Path) -> None:
    meta = _spm_meta()
    d = _write_files(tmp_path / "spm", build_tokenizer_files(meta, {"max_position_embeddings": 128}))
    tok = Tokenizer.from_dir(d)
    ids = tok.encode("hello world")
    assert [tok.id_to_token(i) for i in ids] == ["▁hello", "▁world"]
    assert tok.encode("hello", add_special_tokens=True)[0] == 1  # llama.cpp sentencepiece default: BOS
    assert tok.decode(tok.encode("hello world\n€")) == "hello world\n€"  # byte fallback round trip
    assert tok.token_bytes(meta["tokenizer.ggml.tokens"].index("▁world")) == b" world"
    assert tok.token_bytes(meta["tokenizer.ggml.tokens"].index("<0x0A>")) == b"\n"
    assert tok.token_bytes(meta["tokenizer.ggml.tokens"].index("<0xE2>")) == b"\xe2"
    im_end = meta["tokenizer.ggml.tokens"].index("<|im_end|>")  # llama.cpp also stops on known end-of-turn texts
    assert tok.token_bytes(2) == b"</s>" and tok.eos_token_ids == {2, im_end}
    euro = tok.encode("€")  # not in the vocabulary: three byte pieces
    assert b"".join(tok.token_bytes(i) for i in euro).endswith("€".encode())


def test_unsupported_tokenizer_model_is_clear() -> None:
    from dashchat.models.gguf_convert import GGUFConvertError

    meta = dict(_spm_meta(), **{"tokenizer.ggml.model": "bert"})
    with pytest.raises(GGUFConvertError, match="unsupported GGUF tokenizer model 'bert'.*gpt2.*llama"):
        build_tokenizer_files(meta, {"max_position_embeddings": 128})
    meta = dict(_spm_meta(), **{"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "chatglm-bpe"})
    with pytest.raises(GGUFConvertError, match="unsupported GGUF pre-tokenizer 'chatglm-bpe'.*qwen2.*smollm"):
        build_tokenizer_files(meta, {"max_position_embeddings": 128})


# ---------------------------------------------------------------- folder parsing rules


@pytest.fixture
def bare(tmp_path: Path, folders: dict[str, Path]) -> Path:
    """A folder with only a tokenizer.json (SmolLM2's)."""
    d = tmp_path / "tok"
    d.mkdir()
    shutil.copy(folders["smollm2-135m-instruct"] / "tokenizer.json", d / "tokenizer.json")
    return d


def test_template_sources_and_precedence(bare: Path) -> None:
    assert Tokenizer.from_dir(bare).chat_template is None
    cfg = {"chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]}
    (bare / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert Tokenizer.from_dir(bare).chat_template == "D"
    (bare / "chat_template.json").write_text(json.dumps({"chat_template": "J"}))
    assert Tokenizer.from_dir(bare).chat_template == "J"
    (bare / "chat_template.jinja").write_text("{{ messages }}")
    assert Tokenizer.from_dir(bare).chat_template == "{{ messages }}"


def test_eos_ids_union_and_token_forms(bare: Path) -> None:
    cfg = {"bos_token": {"content": "<|im_start|>", "special": True}, "eos_token": "<|im_end|>"}
    (bare / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = Tokenizer.from_dir(bare)
    assert (tok.bos_token, tok.bos_token_id, tok.eos_token, tok.eos_token_ids) == ("<|im_start|>", 1, "<|im_end|>", {2})
    (bare / "generation_config.json").write_text(json.dumps({"eos_token_id": 0}))
    assert Tokenizer.from_dir(bare).eos_token_ids == {0, 2}
    (bare / "generation_config.json").write_text(json.dumps({"eos_token_id": [0, 5]}))
    assert Tokenizer.from_dir(bare).eos_token_ids == {0, 2, 5}


def test_missing_tokenizer_json(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)
