"""Finding relay groups from block tables (pure numpy)."""

import numpy as np

from edgeprompt_vllm.attention.grouping import find_groups, plan_relay

BS = 16


def test_groups_by_shared_leading_blocks_capped_by_context():
    table = np.array([
        [7, 8, 9, 20, 0],   # cloud A: blocks 7, 8, 9
        [7, 8, 9, 21, 22],
        [7, 8, 30, 0, 0],   # shares only two blocks of A
        [40, 41, 0, 0, 0],  # alone
        [50, 51, 52, 0, 0],  # cloud B
        [50, 51, 53, 0, 0],
    ])
    seq_lens = np.array([4 * BS, 5 * BS, 3 * BS, 2 * BS, 3 * BS, 3 * BS])
    query_lens = np.array([1, 1, 1, 1, 1, 1])
    groups = find_groups(table, seq_lens, query_lens, BS)
    assert sorted(groups) == [([0, 1, 2], 2 * BS), ([4, 5], 2 * BS)]


def test_prefix_never_covers_a_query_token():
    table = np.array([[3, 4, 5], [3, 4, 5]])
    # request 1 is prefilling 20 tokens that start inside block 4: the prefix stops at block 3.
    groups = find_groups(table, np.array([3 * BS, 2 * BS + 10]), np.array([1, 20]), BS)
    assert groups == [([0, 1], BS)]


def test_no_sharing_no_groups_and_singletons_ignored():
    table = np.array([[1, 2], [3, 4], [5, 6]])
    assert find_groups(table, np.array([2 * BS] * 3), np.array([1, 1, 1]), BS) == []
    assert find_groups(table[:1], np.array([2 * BS]), np.array([1]), BS) == []


def test_plan_makes_groups_contiguous_and_keeps_everyone():
    plan = plan_relay(6, [([1, 4], 32), ([0, 5], 16)])
    assert plan.order == [1, 4, 0, 5, 2, 3]
    assert plan.groups == [(0, 2, 32), (2, 4, 16)]
    assert not plan.is_identity
