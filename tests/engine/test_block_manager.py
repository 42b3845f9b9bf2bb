"""The prefix cache never hands one prompt another prompt's KV, whatever the digest says."""

from __future__ import annotations

import pytest

from dashchat.engine.native import block_manager
from dashchat.engine.native.block_manager import BlockManager
from dashchat.engine.native.sequence import Sequence
from dashchat.engine.types import SamplingParams

BS = 4


def _seq(tokens: list[int]) -> Sequence:
    return Sequence(request_id="r", index=0, token_ids=list(tokens), num_prompt_tokens=len(tokens),
                    params=SamplingParams(), arrival=0.0)


def _compute(blocks: BlockManager, seq: Sequence) -> None:
    """What the scheduler and a step do for a whole prompt: reuse, allocate, compute, publish."""
    seq.num_computed_tokens = blocks.reuse_cached_prefix(seq)
    assert blocks.allocate(seq, seq.num_tokens)
    seq.num_computed_tokens = seq.num_tokens
    blocks.register_full_blocks(seq)


def test_same_prefix_is_reused():
    blocks = BlockManager(16, BS)
    first = _seq([1, 2, 3, 4, 5, 6, 7, 8, 9])
    _compute(blocks, first)
    second = _seq([1, 2, 3, 4, 5, 6, 7, 8, 10])
    assert blocks.reuse_cached_prefix(second) == 8
    assert second.block_table == first.block_table[:2]


@pytest.mark.parametrize("colliding", ["first block", "second block"])
def test_colliding_digests_never_share_blocks(monkeypatch, colliding):
    """Every block gets the same key: a lookup finds a block, but its tokens differ, so no reuse."""
    monkeypatch.setattr(block_manager, "block_digest", lambda parent, tokens: b"\0" * 32)
    blocks = BlockManager(16, BS)
    first = _seq([1, 2, 3, 4, 5, 6, 7, 8, 9])
    _compute(blocks, first)
    blocks.free_seq(first)  # freed blocks stay cached
    if colliding == "first block":
        other = [11, 12, 13, 14, 15, 16, 17, 18, 19]
    else:  # same first block, other second block: only the first may be shared
        other = [1, 2, 3, 4, 15, 16, 17, 18, 19]
    second = _seq(other)
    covered = blocks.reuse_cached_prefix(second)
    shared = 0 if colliding == "first block" else BS
    assert covered == shared
    assert len(second.block_table) == shared // BS


def test_digest_is_collision_resistant_and_chained():
    d = block_manager.block_digest
    assert len(d(b"", [1, 2, 3])) == 32
    assert d(b"", [1, 2, 3]) != d(b"", [1, 2, 4])
    assert d(d(b"", [1]), [2]) != d(d(b"", [3]), [2])  # the parent is part of the key
    assert d(b"", [2**40]) != d(b"", [0])  # ids are not truncated to small widths


def test_cache_salt_partitions_the_prefix_cache():
    """Requests share cached blocks only under the same salt (None is a salt of its own)."""
    blocks = BlockManager(32, BS)
    prompt = [1, 2, 3, 4, 5, 6, 7, 8, 9]
    salted = _seq(prompt)
    salted.params = SamplingParams(cache_salt="tenant-a")
    _compute(blocks, salted)
    for other_salt in (None, "tenant-b"):
        other = _seq(prompt)
        other.params = SamplingParams(cache_salt=other_salt)
        assert blocks.reuse_cached_prefix(other) == 0
        blocks.free_seq(other)
    same = _seq(prompt)
    same.params = SamplingParams(cache_salt="tenant-a")
    assert blocks.reuse_cached_prefix(same) == 8
    assert same.block_table == salted.block_table[:2]
