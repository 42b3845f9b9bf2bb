"""Where ranks run and how they are started and watched: CPU core groups from a given topology, the
headless node's watch over its ranks (real processes), the rendezvous address checks."""

from __future__ import annotations

import pytest

from dashchat.distributed.launch import group_by_core

# 4 cores with 2 threads each, numbered as Linux often does: cpu N and N + 4 are siblings.
SPLIT_SIBLINGS = {cpu: (0, cpu % 4) for cpu in range(8)}
# the same, with siblings adjacent: cpu 2k and 2k + 1
ADJACENT_SIBLINGS = {cpu: (0, cpu // 2) for cpu in range(8)}


def test_core_groups_keep_a_cores_siblings_together():
    # halving the logical ids would give rank 0 cpus 0-3 and rank 1 their siblings 4-7
    assert group_by_core(list(range(8)), SPLIT_SIBLINGS, 2) == [[0, 1, 4, 5], [2, 3, 6, 7]]
    assert group_by_core(list(range(8)), ADJACENT_SIBLINGS, 2) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert group_by_core(list(range(8)), SPLIT_SIBLINGS, 4) == [[0, 4], [1, 5], [2, 6], [3, 7]]


def test_core_groups_of_two_packages_and_a_partial_affinity():
    # two sockets, core ids restart in each; this process may use 6 of the 8 cpus
    topology = {0: (0, 0), 1: (0, 1), 2: (1, 0), 3: (1, 1), 4: (0, 0), 5: (0, 1), 6: (1, 0), 7: (1, 1)}
    assert group_by_core([0, 1, 2, 3, 4, 6], topology, 2) == [[0, 1, 4], [2, 3, 6]]


def test_fewer_physical_cores_than_ranks_is_refused():
    with pytest.raises(ValueError, match="2 CPU ranks but only 1 physical cores"):
        group_by_core([0, 4], SPLIT_SIBLINGS, 2)
