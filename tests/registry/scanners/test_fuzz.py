"""Seeded random mutation of the corpus and the real fixtures through `scan()`.

Bounded (a fixed number of inputs, small Limits) so it runs in seconds: no exception may escape,
every result is well formed, and a mutated pickle that breaks the walk says so with a finding.
"""

from __future__ import annotations

import random
from pathlib import Path

from registry.scanners import BytesSource, Limits, ScanContext, ScanResult, Severity, scan
from tests.registry.scanners import corpus

FIXTURES = Path(__file__).parent / "fixtures"
SMALL = ScanContext(
    limits=Limits(
        max_depth=3,
        max_members=64,
        max_expanded=4 << 20,
        max_ratio=50,
        max_pickle=1 << 20,
        max_unknown=256 << 10,
    )
)
ROUNDS = 300


def seeds() -> list[tuple[str, bytes]]:
    items = [
        (s.filename, s.data)
        for s in corpus.malicious()
        if len(s.data) < 64 << 10  # the bombs are covered by their own tests
    ]
    items += [(p.name, p.read_bytes()) for p in sorted(FIXTURES.iterdir()) if p.suffix != ".py"]
    return items


def mutate(rng: random.Random, data: bytes) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        choice = rng.random()
        at = rng.randrange(len(buf) + 1)
        if choice < 0.4 and buf:
            buf[min(at, len(buf) - 1)] = rng.randrange(256)
        elif choice < 0.6:
            buf[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        elif choice < 0.8:
            del buf[at : at + rng.randint(1, 16)]
        elif choice < 0.9:
            buf = buf[:at]
        else:  # interesting values: lengths and counts at their extremes
            buf[at:at] = rng.choice(
                [b"\xff\xff\xff\xff", b"\x00\x00\x00\x80", b"\xff" * 8, b"PK\x05\x06", b"\x80\x05"]
            )
    return bytes(buf)


def test_mutated_inputs_never_escape_and_always_yield_well_formed_results() -> None:
    rng = random.Random(20240607)
    pool = seeds()
    for _ in range(ROUNDS):
        name, data = rng.choice(pool)
        sample = mutate(rng, data)
        result = scan(BytesSource(sample), name=name, ctx=SMALL)
        assert isinstance(result, ScanResult)
        for finding in result.findings:
            assert isinstance(finding.severity, Severity)
            assert finding.rule and finding.message


def test_broken_pickles_are_findings_not_passes() -> None:
    rng = random.Random(7)
    for _ in range(100):
        data = rng.choice([corpus.OS_SYSTEM, corpus.STACK_GLOBAL_MEMO, corpus.BENIGN_PICKLE])
        cut = data[: rng.randrange(1, len(data))]
        assert scan(BytesSource(cut), name="m.pkl", ctx=SMALL).findings


def test_an_analyser_crash_becomes_a_finding() -> None:
    class Exploding:
        size = 100

        def read(self, start: int, end: int) -> bytes:
            raise OSError("disk on fire")

    result = scan(Exploding(), name="m.pkl")
    assert [f.rule for f in result.findings] and all(
        f.rule == "scan.error" and f.severity >= Severity.HIGH for f in result.findings
    )
