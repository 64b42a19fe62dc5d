"""The pure parts of the audit log: canonical bytes, the hash chain and RFC 9162 Merkle trees.

No Django here, so the verifier's arithmetic can be tested (and re-implemented by an auditor)
on its own.
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from typing import Any

GENESIS = "0" * 64
TIME_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"


def format_time(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime(TIME_FORMAT)


def _check_no_floats(value: Any) -> None:
    # Floats have no single canonical text form across languages; the log never holds them.
    if isinstance(value, float):
        raise TypeError("audit records must not contain floats; use integers or strings")
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError("audit record keys must be strings")
            _check_no_floats(v)
    elif isinstance(value, list | tuple):
        for v in value:
            _check_no_floats(v)


def canonical_bytes(record: dict[str, Any]) -> bytes:
    """Sorted, compact, UTF-8 JSON: the exact bytes that are hashed."""
    _check_no_floats(record)
    return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def entry_hash(prev_hash: str, seq: int, canonical: bytes) -> str:
    """SHA-256(0x00 || prev_hash || seq as 8 bytes big-endian || canonical), hex."""
    h = hashlib.sha256(b"\x00")
    h.update(bytes.fromhex(prev_hash))
    h.update(seq.to_bytes(8, "big"))
    h.update(canonical)
    return h.hexdigest()


def leaf_hash(data: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


class MerkleAccumulator:
    """RFC 9162 Merkle Tree Hash of a growing list of leaves in O(log n) memory.

    Keeps the roots of the perfect subtrees that make up the tree so far (sizes are the binary
    digits of the leaf count, largest first); folding them right to left gives MTH(D[n]),
    because RFC 9162 splits at the largest power of two below n.
    """

    def __init__(self) -> None:
        self.size = 0
        self._stack: list[tuple[int, bytes]] = []  # (subtree size, hash)

    def add(self, data: bytes) -> None:
        node = (1, leaf_hash(data))
        while self._stack and self._stack[-1][0] == node[0]:
            size, left = self._stack.pop()
            node = (size * 2, node_hash(left, node[1]))
        self._stack.append(node)
        self.size += 1

    def frontier(self) -> list[list[Any]]:
        """The perfect-subtree roots as [[size, hex], ...]: enough to continue the tree later."""
        return [[size, h.hex()] for size, h in self._stack]

    @classmethod
    def restore(cls, frontier: list[list[Any]]) -> MerkleAccumulator:
        acc = cls()
        sizes = [int(size) for size, _h in frontier]
        if any(s <= 0 or s & (s - 1) for s in sizes) or sizes != sorted(sizes, reverse=True):
            raise ValueError("not a Merkle frontier: sizes must be decreasing powers of two")
        if len(set(sizes)) != len(sizes):
            raise ValueError("not a Merkle frontier: repeated subtree size")
        acc._stack = [(int(size), bytes.fromhex(h)) for size, h in frontier]
        acc.size = sum(sizes)
        return acc

    def root(self) -> str:
        if not self._stack:
            return hashlib.sha256(b"").hexdigest()
        acc = self._stack[-1][1]
        for _size, left in reversed(self._stack[:-1]):
            acc = node_hash(left, acc)
        return acc.hex()


def merkle_root(leaves: list[bytes]) -> str:
    """Reference (recursive) RFC 9162 MTH, used to test the accumulator."""

    def mth(items: list[bytes]) -> bytes:
        if not items:
            return hashlib.sha256(b"").digest()
        if len(items) == 1:
            return leaf_hash(items[0])
        k = 1
        while k * 2 < len(items):
            k *= 2
        return node_hash(mth(items[:k]), mth(items[k:]))

    return mth(leaves).hex()
