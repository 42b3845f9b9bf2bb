"""Incremental detokenizing and stop strings, checked against one-shot decoding (hypothesis)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from server_fakes import ByteTokenizer

from dashchat.server.text.detokenizer import (
    IncrementalDetokenizer,
    StopChecker,
    TextStream,
    TokenPieces,
)

TOK = ByteTokenizer()
PIECES = TokenPieces(TOK)
token_ids = st.lists(st.integers(0, TOK.vocab_size - 1), max_size=60)


def _chunks(seq: list, cuts: list[int]) -> list[list]:
    out, last = [], 0
    for c in sorted(set(x % (len(seq) + 1) for x in cuts)) + [len(seq)]:
        out.append(seq[last:c])
        last = c
    return out


@settings(max_examples=300, deadline=None)
@given(ids=token_ids, cuts=st.lists(st.integers(0, 100), max_size=10), skip=st.booleans())
def test_incremental_equals_one_shot(ids: list[int], cuts: list[int], skip: bool) -> None:
    detok = IncrementalDetokenizer(PIECES, skip_special_tokens=skip)
    text = "".join(detok.add(c) for c in _chunks(ids, cuts)) + detok.flush()
    assert text == TOK.decode(ids, skip_special_tokens=skip)


def test_split_characters_arrive_whole() -> None:
    detok = IncrementalDetokenizer(PIECES)
    emoji = TOK.encode("😀")  # two tokens, each half of the character
    assert len(emoji) == 2
    assert detok.add(emoji[:1]) == ""
    assert detok.add(emoji[1:]) == "😀"
    for ch in "你好".encode():  # byte by byte
        piece = detok.add([ch])
        assert piece in ("", "你", "好")


texts = st.text(alphabet="ab你😀\n", max_size=40)


@settings(max_examples=400, deadline=None)
@given(text=texts, stops=st.lists(st.text(alphabet="ab你😀\n", min_size=1, max_size=4), max_size=3),
       cuts=st.lists(st.integers(0, 100), max_size=12))
def test_stop_strings_never_leak(text: str, stops: list[str], cuts: list[int]) -> None:
    checker = StopChecker(stops)
    emitted = ""
    hit = False
    for piece in _chunks(list(text), cuts):
        out, hit = checker.feed("".join(piece))
        emitted += out
        # Whatever was emitted so far can never contain (or complete) a stop string.
        assert not any(s in emitted for s in stops)
        if hit:
            break
    if not hit:
        emitted += checker.flush()
    # Reference: the stop that completes first (then the longest of those) cuts the text.
    ends = [(text.find(s) + len(s), text.find(s)) for s in stops if s in text]
    first = min(ends)[1] if ends else -1
    assert emitted == (text if first == -1 else text[:first])
    assert hit == (first != -1)


def test_stop_spanning_tokens_in_stream() -> None:
    stream = TextStream(PIECES, ["world 你"])
    out = ""
    for t in TOK.encode("Hello world 你好"):
        out += stream.add([t])
    assert out == "Hello "
    assert stream.stopped


def test_held_text_released_at_end() -> None:
    stream = TextStream(PIECES, ["wor!"])
    out = "".join(stream.add([t]) for t in TOK.encode("Hello wor"))
    assert out == "Hello "  # "wor" could still become the stop
    assert out + stream.finish() == "Hello wor"


# ---- real tokenizers: byte-level BPE (SmolLM2) and SentencePiece/Metaspace with byte fallback ------

import json  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from dashchat.models.gguf_convert import build_tokenizer_files  # noqa: E402
from dashchat.models.resolve import resolve_model  # noqa: E402
from dashchat.tokenizer import Tokenizer  # noqa: E402


def _metaspace_tokenizer(d: Path) -> Tokenizer:
    """A Llama-style SentencePiece vocabulary (Metaspace "▁" for spaces, <0xNN> byte fallback for
    what it lacks, e.g. "€" and "日" become byte pieces), converted as a GGUF's would be."""
    pieces = ["▁h", "el", "lo", "▁hel", "▁hello", "▁w", "or", "ld", "▁wor", "▁world", "▁a", "▁", "▁▁"]
    chars = ["h", "e", "l", "o", "w", "r", "d", "a"]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces + chars
    meta = {
        "tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [2, 3, 3] + [6] * 256 + [1] * (len(pieces) + len(chars)),
        "tokenizer.ggml.scores": [0.0] * 259 + [-float(i) for i in range(len(pieces) + len(chars))],
        "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.unknown_token_id": 0,
    }
    d.mkdir(parents=True, exist_ok=True)
    for name, obj in build_tokenizer_files(meta, {"max_position_embeddings": 128}).items():
        (d / name).write_text(obj if isinstance(obj, str) else json.dumps(obj), encoding="utf-8")
    return Tokenizer.from_dir(d)


@pytest.fixture(scope="module", params=["smollm2 (byte-level BPE)", "sentencepiece (Metaspace, byte fallback)"])
def real_tokenizer(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    if request.param.startswith("smollm2"):
        return Tokenizer.from_dir(resolve_model("smollm2-135m-instruct").path)
    d = tmp_path_factory.mktemp("spm")
    tok = _metaspace_tokenizer(d)
    assert '"Metaspace"' in (d / "tokenizer.json").read_text() and tok.token_bytes(tok.encode("hello")[0]) == b" hello"
    return tok


texts = st.lists(st.sampled_from(["hello", " world", "a", " ", "  ", "\n", "€", "日本", "😀", "é", "lo"]),
                 max_size=10).map("".join)


@settings(max_examples=150, deadline=None)
@given(text=texts, cuts=st.lists(st.integers(0, 100), max_size=8))
def test_incremental_equals_one_shot_on_real_tokenizers(real_tokenizer: Tokenizer, text: str, cuts: list[int]) -> None:
    """Streamed in any chunks, the text equals what the tokenizer decodes in one go, as a continuation:
    what the ids add after a prompt (a SentencePiece decoder drops the leading space of a text's first
    token; a generated answer is never the start of a text)."""
    tok = real_tokenizer
    anchor = tok.encode("hello")
    ids = tok.encode(text)
    pieces = TokenPieces(tok)
    detok = IncrementalDetokenizer(pieces)
    streamed = "".join(detok.add(c) for c in _chunks(ids, cuts) if c) + detok.flush()
    whole, head = tok.decode(anchor + ids), tok.decode(anchor)
    assert whole.startswith(head)
    assert streamed == whole[len(head):]
    assert "\ufffd" not in streamed  # characters split over byte pieces arrive whole
