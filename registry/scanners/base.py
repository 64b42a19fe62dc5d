"""The contract every format analyser follows. Pure Python over byte sources: no Django, no
network, never unpickles, imports or executes what it reads.

A `Source` is random-access plaintext (the registry's is the segment-addressable decryption of
an artifact, so an analyser that reads only headers decrypts only those segments). Analysers
read what a real loader would read, and no more.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum
from typing import Protocol

SCANNER_VERSION = "1.0.0"  # bump whenever rules change: reports record it, admins re-scan


class Severity(IntEnum):
    """Ordered: a namespace quarantines at or above its threshold."""

    INFO = 0
    LOW = 1
    MEDIUM = 2
    HIGH = 3
    CRITICAL = 4

    @classmethod
    def parse(cls, name: str) -> Severity:
        return cls[name.upper()]


@dataclass(frozen=True)
class Finding:
    """One problem found in one file (or one member of an archive inside it).

    `rule` is a stable id (e.g. "pickle.global.not_allowed"); `member` names the archive member
    path, nested members joined with "!" ("outer.zip!inner/data.pkl"), "" for the file itself;
    `offset` is the byte offset within that member (or file) where the problem starts;
    `reference` is what the content refers to (e.g. "os.system", an external-data location).
    """

    rule: str
    severity: Severity
    message: str
    member: str = ""
    offset: int | None = None
    reference: str = ""


class Source(Protocol):
    """Random-access plaintext of one file."""

    @property
    def size(self) -> int: ...

    def read(self, start: int, end: int) -> bytes:
        """Bytes [start, end) (clamped to the size)."""
        ...


@dataclass
class ScanResult:
    """What an analyser made of one file: its findings and which formats it recognised."""

    findings: list[Finding] = field(default_factory=list)
    formats: list[str] = field(default_factory=list)


class BytesSource:
    """A Source over bytes in memory (tests, small archive members)."""

    def __init__(self, data: bytes) -> None:
        self._data = data

    @property
    def size(self) -> int:
        return len(self._data)

    def read(self, start: int, end: int) -> bytes:
        return self._data[max(0, start) : max(0, min(end, len(self._data)))]


@dataclass(frozen=True)
class Limits:
    """Bounds that keep a hostile file from exhausting the worker (exceeding one is a finding)."""

    max_depth: int = 4  # archives inside archives
    max_members: int = 100_000
    max_expanded: int = 64 << 30  # total uncompressed bytes of one file's archive members
    max_ratio: int = 200  # uncompressed / compressed size of one member
    max_pickle: int = 1 << 30  # bytes of one pickle stream walked
    max_unknown: int = 64 << 20  # bytes of an unrecognised file searched for embedded pickles


@dataclass(frozen=True)
class ScanContext:
    """Where an analyser is: limits, archive depth and the member path so far."""

    limits: Limits = Limits()
    depth: int = 0
    member: str = ""

    def inside(self, member: str) -> ScanContext:
        """The context of an archive member one level down."""
        joined = f"{self.member}!{member}" if self.member else member
        return ScanContext(limits=self.limits, depth=self.depth + 1, member=joined)


# A finding whose rule ends in one of these means the analyser could not finish judging the
# file (it broke, the file was cut short, or a bound was hit), as opposed to having judged it
# and found something. The registry treats both as "not clean"; `scan_file` exits 2 for these.
UNANALYSABLE_SUFFIXES = (".unanalysable", ".error", ".truncated", ".limit")


def is_unanalysable(finding: Finding) -> bool:
    """True if `finding` says the content could not be (fully) analysed.

    The rule id decides, so the registry and `manage.py scan_file` classify alike: a rule whose
    last component is `unanalysable`, `error`, `truncated` or `limit`
    (`scan.error`, `pickle.truncated`, `archive.depth.limit`, `zip.method.unanalysable`).
    """
    return finding.rule.endswith(UNANALYSABLE_SUFFIXES)


class FileSource:
    """A Source over a local file, read by range (never whole)."""

    def __init__(self, path: str) -> None:
        import os

        self._path = path
        self._size = os.path.getsize(path)
        self._fh = open(path, "rb")  # noqa: SIM115 (closed by close() or the context manager)

    def __enter__(self) -> FileSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._fh.close()

    @property
    def size(self) -> int:
        return self._size

    def read(self, start: int, end: int) -> bytes:
        start, end = max(0, start), min(end, self._size)
        if start >= end:
            return b""
        self._fh.seek(start)
        return self._fh.read(end - start)
