"""Incremental detokenizing and stop strings, checked against one-shot decoding (hypothesis)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from server_fakes import ByteTokenizer

from dashchat.server.detokenizer import (
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
