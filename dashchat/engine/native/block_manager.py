"""Paged KV-cache bookkeeping with prefix caching.

The cache is `num_blocks` blocks of `block_size` token slots. A block filled with
tokens gets a digest chained from its predecessors' tokens; a later sequence with the
same prefix reuses it instead of recomputing. Freed blocks keep their content and digest
while they sit in the free list (least recently freed evicted first).

A wrong hit would hand one request another request's keys and values, so a digest is
never trusted alone: it is a 256-bit BLAKE2b over the parent's digest and the block's
token ids (collision-resistant, unlike Python's 64-bit `hash` of a tuple), and every hit
is checked against the block's stored tokens and parent digest before it is reused.

Image tokens are placeholders (the same id for every image), so a block that covers any part of
an image's span also folds in that image's content digest (`fold_images`): two different images
never share KV, and the same image in a later turn (same pixels, same place) does.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from functools import lru_cache

from .sequence import Sequence

_ROOT = b""  # the parent digest of an unsalted sequence's first block


@lru_cache(maxsize=4096)
def salt_root(salt: str | None) -> bytes:
    """The parent digest of a sequence's first block: the salt's own digest, so sequences with
    different salts share no digest and no cached block."""
    if salt is None:
        return _ROOT
    return hashlib.blake2b(b"cache-salt\0" + salt.encode("utf-8"), digest_size=32).digest()


def _root(seq: Sequence) -> bytes:
    return salt_root(seq.params.cache_salt)


def block_digest(parent: bytes, tokens: list[int]) -> bytes:
    """Key of a full block: BLAKE2b-256 over the parent block's digest and the token ids (int64)."""
    h = hashlib.blake2b(parent, digest_size=32)
    h.update(array("q", tokens).tobytes())
    return h.digest()


def fold_images(digest: bytes, images: bytes) -> bytes:
    """A block digest with the content digests of the images its tokens belong to folded in."""
    return hashlib.blake2b(digest + b"images\0" + images, digest_size=32).digest()


def _block_images(seq: Sequence, i: int, block_size: int) -> bytes:
    """The content digests of the images overlapping block i of the sequence (empty: none)."""
    lo, hi = i * block_size, (i + 1) * block_size
    return b"".join(img.digest for img in seq.params.images if img.offset < hi and img.offset + img.length > lo)


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.block_hashes: list[bytes | None] = [None] * num_blocks
        # What a cached block holds, checked on every hit: (parent digest, token ids).
        self.block_keys: list[tuple[bytes, tuple[int, ...], bytes] | None] = [None] * num_blocks
        self.cached: dict[bytes, int] = {}  # digest -> block id
        self.free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))
        self.seq_hashes: dict[int, list[bytes]] = {}  # id(seq) -> digests of its full blocks
        self.prefix_queries = 0
        self.prefix_hits = 0

    @property
    def num_free(self) -> int:
        return len(self.free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self.free)

    def blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        """Extra blocks the sequence needs to hold `num_tokens` tokens."""
        return max(0, -(-num_tokens // self.block_size) - len(seq.block_table))

    def _take_free_block(self) -> int:
        block, _ = self.free.popitem(last=False)
        old = self.block_hashes[block]
        if old is not None and self.cached.get(old) == block:
            del self.cached[old]
        self.block_hashes[block] = None
        self.block_keys[block] = None
        self.ref_counts[block] = 1
        return block

    def allocate(self, seq: Sequence, num_tokens: int) -> bool:
        """Grow the block table to hold `num_tokens` tokens; False (nothing taken) if blocks run out."""
        need = self.blocks_needed(seq, num_tokens)
        if need > len(self.free):
            return False
        seq.block_table.extend(self._take_free_block() for _ in range(need))
        return True

    def _chain_hashes(self, seq: Sequence, num_blocks: int, known: list[bytes]) -> list[bytes]:
        hashes = list(known[:num_blocks])
        bs, token_ids = self.block_size, seq.token_ids
        for i in range(len(hashes), num_blocks):
            parent = hashes[i - 1] if i else _root(seq)
            digest = block_digest(parent, token_ids[i * bs : (i + 1) * bs])
            images = _block_images(seq, i, bs) if seq.params.images else b""
            hashes.append(fold_images(digest, images) if images else digest)
        return hashes

    def _block_key(self, seq: Sequence, parent: bytes, i: int) -> tuple[bytes, tuple[int, ...], bytes]:
        """What a cached block must hold to serve block i of the sequence."""
        bs = self.block_size
        images = _block_images(seq, i, bs) if seq.params.images else b""
        return parent, tuple(seq.token_ids[i * bs : (i + 1) * bs]), images

    def reuse_cached_prefix(self, seq: Sequence) -> int:
        """At admission: take the cached blocks matching the prompt's prefix. Returns tokens covered.

        At least one token is left to compute: its logits start the generation.
        """
        assert not seq.block_table
        self.prefix_queries += seq.num_tokens
        if not self.enable_prefix_caching:
            return 0
        max_blocks = (seq.num_tokens - 1) // self.block_size
        hashes = self._chain_hashes(seq, max_blocks, self.seq_hashes.get(id(seq), []))
        for i, h in enumerate(hashes):
            block = self.cached.get(h)
            if block is None:
                break
            parent = hashes[i - 1] if i else _root(seq)
            if self.block_keys[block] != self._block_key(seq, parent, i):
                break  # same digest, other content: never reuse another prefix's KV
            if self.ref_counts[block] == 0:
                del self.free[block]
            self.ref_counts[block] += 1
            seq.block_table.append(block)
        self.seq_hashes[id(seq)] = hashes[: len(seq.block_table)]
        covered = len(seq.block_table) * self.block_size
        self.prefix_hits += covered
        return covered

    def register_full_blocks(self, seq: Sequence) -> None:
        """After a step: publish the blocks the sequence has completely filled."""
        if not self.enable_prefix_caching:
            return
        known = self.seq_hashes.setdefault(id(seq), [])
        full = seq.num_computed_tokens // self.block_size
        if full <= len(known):
            return
        hashes = self._chain_hashes(seq, full, known)
        for i in range(len(known), full):
            block, h = seq.block_table[i], hashes[i]
            self.block_hashes[block] = h
            self.block_keys[block] = self._block_key(seq, hashes[i - 1] if i else _root(seq), i)
            self.cached.setdefault(h, block)
        self.seq_hashes[id(seq)] = hashes

    def trim(self, seq: Sequence, num_tokens: int) -> None:
        """Give back the tail blocks past `num_tokens` tokens (a speculative step's rejected
        positions). They hold nothing worth caching, so they are the first to be handed out again."""
        keep = -(-num_tokens // self.block_size)
        while len(seq.block_table) > keep:
            block = seq.block_table.pop()
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self.free[block] = None
                self.free.move_to_end(block, last=False)

    def free_seq(self, seq: Sequence) -> None:
        for block in reversed(seq.block_table):  # tail blocks are evicted first
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self.free[block] = None
        seq.block_table = []
        self.seq_hashes.pop(id(seq), None)
