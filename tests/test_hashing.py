"""Rendezvous hashing: agreement, balance, and minimal movement when a node joins."""

from __future__ import annotations

from collections import Counter

from cachefs.node.cluster.hashing import block_key, rank

NODES = [f"10.0.0.{i}:7070" for i in range(1, 9)]
KEYS = [block_key(f"{i:032x}", b) for i in range(200) for b in range(10)]


def test_every_node_agrees_whatever_order_it_lists_members_in() -> None:
    for key in KEYS[:100]:
        assert rank(key, NODES) == rank(key, list(reversed(NODES)))
        assert sorted(rank(key, NODES)) == sorted(NODES)


def test_blocks_spread_over_the_nodes() -> None:
    owners = Counter(rank(key, NODES)[0] for key in KEYS)
    expected = len(KEYS) / len(NODES)
    assert set(owners) == set(NODES)
    assert all(0.7 * expected < count < 1.3 * expected for count in owners.values())


def test_a_joining_node_takes_blocks_only_from_their_previous_owner() -> None:
    joined = "10.0.0.9:7070"
    moved = 0
    for key in KEYS:
        before = rank(key, NODES)
        after = rank(key, [*NODES, joined])
        if after[0] == joined:
            moved += 1
            assert after[1] == before[0]  # the previous owner is next-ranked: ask it first
        else:
            assert after[0] == before[0]  # nothing else moves
    assert 0.5 * len(KEYS) / 9 < moved < 1.5 * len(KEYS) / 9


def test_a_leaving_node_hands_its_blocks_to_their_next_ranked() -> None:
    for key in KEYS[:300]:
        before = rank(key, NODES)
        after = rank(key, [n for n in NODES if n != before[0]])
        assert after[0] == before[1]
