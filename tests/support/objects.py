"""Direct access to stored ciphertext, for tamper and at-rest tests (uses the real store)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

from registry import storage


def read_object(key: str) -> bytes:
    return b"".join(storage.get_object_store().read(key))


def write_object(key: str, data: bytes) -> None:
    writer = storage.get_object_store().writer(key)
    writer.write(data)
    writer.commit()


def pattern(size: int, seed: int = 0) -> Iterator[bytes]:
    """Deterministic pseudo-random bytes, generated 1 MiB at a time (never all in memory)."""
    block = 1 << 20
    base = hashlib.shake_256(f"smr-test-{seed}".encode()).digest(block + 4096)
    sent = 0
    i = 0
    while sent < size:
        n = min(block, size - sent)
        off = (i * 4093) % 4096
        yield base[off : off + n]
        sent += n
        i += 1


def pattern_bytes(size: int, seed: int = 0) -> bytes:
    return b"".join(pattern(size, seed))


def pattern_sha256(size: int, seed: int = 0) -> str:
    h = hashlib.sha256()
    for chunk in pattern(size, seed):
        h.update(chunk)
    return h.hexdigest()


class IterBody:
    """A request body of known length: `requests` sends Content-Length and streams the chunks."""

    def __init__(self, chunks: Iterator[bytes], length: int) -> None:
        self._chunks = chunks
        self.len = length

    def __len__(self) -> int:
        return self.len

    def __iter__(self) -> Iterator[bytes]:
        return iter(self._chunks)
