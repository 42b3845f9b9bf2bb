"""The tokenizer every layer shares: a thin, fast wrapper over `tokenizers.Tokenizer`.

Reads an HF-style folder: tokenizer.json, tokenizer_config.json (chat template, bos/eos), the chat
template from chat_template.jinja / chat_template.json when present, and generation_config.json
(extra eos ids).
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as _HFTokenizer


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table used by byte-level BPE vocabularies."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 256))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """Inverse of bytes_to_unicode (byte-level BPE spelling -> raw byte)."""
    return {c: b for b, c in bytes_to_unicode().items()}


def _is_byte_piece(piece: str) -> bool:
    """Sentencepiece byte-fallback pieces look like <0x0A>."""
    return (
        len(piece) == 6
        and piece.startswith("<0x")
        and piece.endswith(">")
        and all(c in "0123456789abcdefABCDEF" for c in piece[3:5])
    )


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    return data if isinstance(data, dict) else {}


def _token_text(tok: Any) -> str | None:
    """tokenizer_config stores special tokens as a string or as a serialized AddedToken dict."""
    if isinstance(tok, dict):
        tok = tok.get("content")
    return tok if isinstance(tok, str) else None


def _pick_template(tpl: Any) -> str | None:
    """A chat template is a string, or a list of {name, template} with a "default" one."""
    if isinstance(tpl, str):
        return tpl
    if isinstance(tpl, list):
        named = {t.get("name"): t.get("template") for t in tpl if isinstance(t, dict)}
        return named.get("default") or next(iter(named.values()), None)
    return None


def _as_id_list(v: Any) -> list[int]:
    if isinstance(v, int):
        return [v]
    if isinstance(v, list):
        return [i for i in v if isinstance(i, int)]
    return []


class Tokenizer:
    def __init__(
        self,
        backend: _HFTokenizer,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        chat_template: str | None = None,
        extra_eos_token_ids: Sequence[int] = (),
        add_bos_token: bool | None = None,
    ) -> None:
        self._tok = backend
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.chat_template = chat_template
        self.add_bos_token = add_bos_token
        self.bos_token_id = self.token_to_id(bos_token) if bos_token else None
        self.eos_token_id = self.token_to_id(eos_token) if eos_token else None
        self.eos_token_ids: set[int] = set(extra_eos_token_ids)
        if self.eos_token_id is not None:
            self.eos_token_ids.add(self.eos_token_id)
        added = backend.get_added_tokens_decoder()  # id -> AddedToken
        self._added: dict[int, str] = {i: t.content for i, t in added.items()}
        self.special_token_ids: set[int] = {i for i, t in added.items() if t.special}
        top = max(self._added, default=-1) + 1
        self.vocab_size: int = max(backend.get_vocab_size(with_added_tokens=True), top)
        self._all_bytes: list[bytes] | None = None
        self._literal_tok: _HFTokenizer | None = None  # a copy that reads special tokens as text
        self._literal_lock = threading.Lock()

    @classmethod
    def from_dir(cls, path: str | os.PathLike[str]) -> Tokenizer:
        d = Path(path)
        if not (d / "tokenizer.json").is_file():
            raise FileNotFoundError(f"no tokenizer.json in {d} (a fast tokenizer file is required)")
        backend = _HFTokenizer.from_file(str(d / "tokenizer.json"))
        cfg = _read_json(d / "tokenizer_config.json")
        gen = _read_json(d / "generation_config.json")
        # Newer HF repos keep the template beside tokenizer_config.json; those files win.
        template = None
        if (d / "chat_template.jinja").is_file():
            template = (d / "chat_template.jinja").read_text(encoding="utf-8")
        if template is None:
            template = _pick_template(_read_json(d / "chat_template.json").get("chat_template"))
        if template is None:
            template = _pick_template(cfg.get("chat_template"))
        eos_ids = _as_id_list(gen.get("eos_token_id"))
        eos_token = _token_text(cfg.get("eos_token"))
        if not eos_ids and eos_token is None:  # last resort: config.json's eos id(s)
            eos_ids = _as_id_list(_read_json(d / "config.json").get("eos_token_id"))
        add_bos = cfg.get("add_bos_token")
        return cls(
            backend,
            bos_token=_token_text(cfg.get("bos_token")),
            eos_token=eos_token,
            chat_template=template,
            extra_eos_token_ids=eos_ids,
            add_bos_token=add_bos if isinstance(add_bos, bool) else None,
        )

    # ---- the hot path: thin calls into the Rust tokenizer

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = False) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=add_special_tokens)]

    @property
    def special_tokens(self) -> list[str]:
        """The text of every special added token (turn markers, eos, fill-in-the-middle...)."""
        return [self._added[i] for i in sorted(self.special_token_ids) if i in self._added]

    def encode_segments(self, segments: Sequence[tuple[str, bool]], add_special_tokens: bool = False) -> list[int]:
        """Encode `(text, literal)` pieces in order as one prompt. A literal piece never becomes a
        special token: its `<|im_end|>` is ordinary tokens, as transformers' `split_special_tokens`
        reads it; the others encode as `encode` does. The post-processor (BOS...) runs once, around
        the whole."""
        from tokenizers import Encoding

        encodings = [(self._literal() if literal else self._tok).encode(text, add_special_tokens=False)
                     for text, literal in segments if text]
        merged = Encoding.merge(encodings, growing_offsets=True) if encodings else self._tok.encode("")
        if add_special_tokens:
            merged = self._tok.post_process(merged, add_special_tokens=True)
        return merged.ids

    def _literal(self) -> _HFTokenizer:
        with self._literal_lock:  # built once, on first use (a copy of the whole vocabulary)
            if self._literal_tok is None:
                tok = _HFTokenizer.from_str(self._tok.to_str())
                tok.encode_special_tokens = True
                self._literal_tok = tok
            return self._literal_tok

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    # ---- raw bytes per token (incremental detokenizing, grammar engines)

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes token `token_id` stands for; b"" for ids outside the vocabulary."""
        table = self._all_bytes if self._all_bytes is not None else self.all_token_bytes()
        return table[token_id] if 0 <= token_id < len(table) else b""

    def all_token_bytes(self) -> list[bytes]:
        """token_bytes for every id (index = id), computed once."""
        if self._all_bytes is None:
            self._all_bytes = self._compute_all_bytes()
        return self._all_bytes

    def _compute_all_bytes(self) -> list[bytes]:
        backend = self._tok
        pieces: list[str | None] = [None] * self.vocab_size
        for piece, i in backend.get_vocab(with_added_tokens=False).items():
            if 0 <= i < self.vocab_size:
                pieces[i] = piece
        # The decoder / pre-tokenizer say how pieces spell bytes: byte-level BPE or sentencepiece.
        spec = " ".join(
            c.__getstate__().decode("utf-8", "replace") for c in (backend.decoder, backend.pre_tokenizer) if c
        )
        byte_level = '"ByteLevel"' in spec
        metaspace = '"Metaspace"' in spec or "\u2581" in spec or "\\u2581" in spec
        byte_fallback = bool(getattr(backend.model, "byte_fallback", False))
        to_latin1 = {ord(ch): b for ch, b in _byte_decoder().items()}  # str.translate runs in C
        alphabet = frozenset(_byte_decoder())
        out: list[bytes] = []
        for i, piece in enumerate(pieces):
            if i in self._added:  # added/special tokens are literal text
                out.append(self._added[i].encode("utf-8"))
            elif piece is None:
                out.append(b"")
            elif byte_level:
                if alphabet.issuperset(piece):
                    out.append(piece.translate(to_latin1).encode("latin-1"))
                else:  # a raw-text piece in a byte-level vocab
                    out.append(piece.encode("utf-8"))
            elif byte_fallback and _is_byte_piece(piece):
                out.append(bytes([int(piece[3:5], 16)]))
            elif metaspace:
                out.append(piece.replace("\u2581", " ").encode("utf-8"))
            else:
                out.append(piece.encode("utf-8"))
        return out

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, bos={self.bos_token!r}, eos={self.eos_token!r})"
