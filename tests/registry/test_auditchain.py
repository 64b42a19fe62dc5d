"""The audit log's pure arithmetic: canonical bytes, chain hashes, RFC 9162 Merkle roots."""

from __future__ import annotations

import hashlib

import pytest

from registry.auditchain import (
    GENESIS,
    MerkleAccumulator,
    canonical_bytes,
    entry_hash,
    leaf_hash,
    merkle_root,
    node_hash,
)


def test_canonical_is_sorted_compact_utf8():
    assert (
        canonical_bytes({"b": 1, "a": {"y": "é", "x": [1, 2]}})
        == '{"a":{"x":[1,2],"y":"é"},"b":1}'.encode()
    )


@pytest.mark.parametrize("record", [{"x": 1.5}, {"x": [1, {"y": 0.0}]}, {1: "int key"}])
def test_canonical_rejects_floats_and_non_string_keys(record):
    with pytest.raises(TypeError):
        canonical_bytes(record)


def test_entry_hash_binds_prev_seq_and_content():
    base = entry_hash(GENESIS, 1, b"{}")
    manual = hashlib.sha256(b"\x00" + bytes(32) + (1).to_bytes(8, "big") + b"{}").hexdigest()
    assert base == manual
    assert entry_hash(GENESIS, 2, b"{}") != base
    assert entry_hash("11" * 32, 1, b"{}") != base
    assert entry_hash(GENESIS, 1, b"{ }") != base


def test_merkle_known_small_trees():
    a, b, c = b"a", b"b", b"c"
    assert merkle_root([]) == hashlib.sha256(b"").hexdigest()
    assert merkle_root([a]) == leaf_hash(a).hex()
    assert merkle_root([a, b]) == node_hash(leaf_hash(a), leaf_hash(b)).hex()
    # RFC 9162: three leaves split as (2, 1).
    assert (
        merkle_root([a, b, c])
        == node_hash(node_hash(leaf_hash(a), leaf_hash(b)), leaf_hash(c)).hex()
    )


@pytest.mark.parametrize("n", [*range(0, 20), 31, 32, 33, 100, 257])
def test_accumulator_matches_reference(n):
    leaves = [hashlib.sha256(str(i).encode()).digest() for i in range(n)]
    acc = MerkleAccumulator()
    for leaf in leaves:
        acc.add(leaf)
    assert acc.size == n
    assert acc.root() == merkle_root(leaves)


@pytest.mark.parametrize("split", [1, 2, 3, 5, 8, 13, 64, 99])
def test_accumulator_resumes_from_its_frontier(split):
    leaves = [hashlib.sha256(str(i).encode()).digest() for i in range(100)]
    first = MerkleAccumulator()
    for leaf in leaves[:split]:
        first.add(leaf)
    resumed = MerkleAccumulator.restore(first.frontier())
    assert resumed.size == split
    for leaf in leaves[split:]:
        resumed.add(leaf)
    assert resumed.root() == merkle_root(leaves)


@pytest.mark.parametrize(
    "frontier",
    [[[3, "00" * 32]], [[1, "00" * 32], [2, "00" * 32]], [[2, "aa" * 32], [2, "bb" * 32]]],
)
def test_restore_rejects_what_is_not_a_frontier(frontier):
    with pytest.raises(ValueError):
        MerkleAccumulator.restore(frontier)
