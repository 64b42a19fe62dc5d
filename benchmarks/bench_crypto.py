"""Throughput of the streaming AEAD next to its building blocks.

    .venv/bin/python benchmarks/bench_crypto.py [--size-mib 1024] [--repeat 3]

Prints one JSON line per figure (best of --repeat runs, in MiB/s) and a final ratio line:
the upload path (encrypt + SHA-256 in one pass) against SHA-256 alone, which is the floor any
content-addressed upload pays anyway. Input is streamed in random 1..8 MiB chunks cut from one
reused random buffer, so memory stays flat at any --size-mib.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import random
import resource
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cryptography.hazmat.backends.openssl.backend import backend
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from registry.crypto.stream import (
    FIRST_SEGMENT_PLAINTEXT,
    HEADER_SIZE,
    SEGMENT_PLAINTEXT,
    StreamEncryptor,
    decrypt_iter,
)

MiB = 1 << 20
TARGET = 0.85
DEK = bytes(range(32))
AD = b"bench"
POOL = memoryview(random.Random(0).randbytes(16 * MiB))


def chunks(total: int, seed: int = 1) -> Iterator[memoryview]:
    rng = random.Random(seed)
    sent = 0
    while sent < total:
        size = min(rng.randint(MiB, 8 * MiB), total - sent)
        offset = rng.randrange(len(POOL) - size + 1)
        yield POOL[offset : offset + size]
        sent += size


def segments(total: int) -> Iterator[memoryview]:
    """The same plaintext volume, already cut at segment boundaries (no staging copies)."""
    sent, size = 0, FIRST_SEGMENT_PLAINTEXT
    while sent < total:
        size = min(size, total - sent)
        offset = (sent * 7) % (len(POOL) - size + 1)
        yield POOL[offset : offset + size]
        sent += size
        size = SEGMENT_PLAINTEXT


def raw_ciphertext(total: int, timer: list[float]) -> Iterator[bytes]:
    """A Tink-format stream built with bare AESGCM calls, adding its own run time to timer[0]."""
    began = time.perf_counter()
    salt, prefix = os.urandom(32), os.urandom(7)
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=AD).derive(DEK)
    aead = AESGCM(key)
    pieces = list(segments(total)) or [POOL[:0]]
    timer[0] += time.perf_counter() - began
    yield bytes([HEADER_SIZE]) + salt + prefix
    for index, piece in enumerate(pieces):
        began = time.perf_counter()
        last = index == len(pieces) - 1
        out = aead.encrypt(prefix + index.to_bytes(4, "big") + bytes([last]), piece, None)
        timer[0] += time.perf_counter() - began
        yield out


def bench_sha256(total: int) -> float:
    began = time.perf_counter()
    digest = hashlib.sha256()
    for chunk in chunks(total):
        digest.update(chunk)
    digest.hexdigest()
    return time.perf_counter() - began


def bench_aes_gcm(total: int) -> float:
    timer = [0.0]
    for _ in raw_ciphertext(total, timer):
        pass
    return timer[0]


def bench_sequential(total: int) -> float:
    """What a single-threaded hash-then-encrypt loop costs, for comparison with the pipeline."""
    aead = AESGCM(DEK)
    nonce = bytes(12)
    began = time.perf_counter()
    digest = hashlib.sha256()
    for piece in segments(total):
        digest.update(piece)
        aead.encrypt(nonce, piece, None)
    return time.perf_counter() - began


def bench_encrypt_sha256(total: int) -> float:
    began = time.perf_counter()
    encryptor = StreamEncryptor(DEK, AD)
    out: list[bytes] = []
    for chunk in chunks(total):
        # Like an uploader, keep one call's output alive while the next one is produced.
        out = encryptor.update(chunk)
    out = encryptor.finalize()
    del out
    assert encryptor.plaintext_size == total
    return time.perf_counter() - began


def bench_decrypt(total: int) -> float:
    timer = [0.0]
    began = time.perf_counter()
    produced = 0
    for piece in decrypt_iter(DEK, AD, raw_ciphertext(total, timer)):
        produced += len(piece)
    elapsed = time.perf_counter() - began
    assert produced == total
    # The source's own encryption time is not decryption.
    return elapsed - timer[0]


BENCHES: list[tuple[str, Callable[[int], float], str]] = [
    ("sha256", bench_sha256, "hashlib.sha256 over 1..8 MiB chunks"),
    ("aes_gcm", bench_aes_gcm, "bare AESGCM.encrypt per segment, one thread"),
    ("sha256_then_aes_gcm_sequential", bench_sequential, "one thread, per segment"),
    ("encrypt_sha256", bench_encrypt_sha256, "StreamEncryptor.update/finalize (the upload path)"),
    ("decrypt", bench_decrypt, "decrypt_iter over 1 MiB segment-aligned chunks"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--repeat", type=int, default=3, help="report the best of N runs")
    args = parser.parse_args()
    total = args.size_mib * MiB

    print(
        json.dumps(
            {
                "bench": "env",
                "python": platform.python_version(),
                "openssl": backend.openssl_version_text(),
                "cpus": len(os.sched_getaffinity(0)),
                "size_mib": args.size_mib,
                "repeat": args.repeat,
            }
        ),
        flush=True,
    )
    best: dict[str, float] = {}
    runs: dict[str, list[tuple[float, int]]] = {name: [] for name, _, _ in BENCHES}
    # Interleaved rounds, so a noisy neighbour hurts every figure alike rather than just one.
    for _ in range(args.repeat):
        for name, bench, _ in BENCHES:
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            mib_s = args.size_mib / bench(total)
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
            runs[name].append((mib_s, faults))
    for name, _, what in BENCHES:
        mib_s, faults = max(runs[name])
        best[name] = mib_s
        print(
            json.dumps(
                {
                    "bench": name,
                    "mib_s": round(mib_s, 1),
                    "runs_mib_s": [round(r, 1) for r, _ in runs[name]],
                    # Fresh pages cost ~1 us each to fault in; a page per 4 KiB of output
                    # means the allocator is handing memory back to the OS between calls.
                    "minor_faults_per_mib": round(faults / args.size_mib, 1),
                    "what": what,
                }
            ),
            flush=True,
        )
    ratio = best["encrypt_sha256"] / best["sha256"]
    print(
        json.dumps(
            {
                "bench": "pipeline_vs_sha256",
                "ratio": round(ratio, 3),
                "target": TARGET,
                "ok": ratio >= TARGET,
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
