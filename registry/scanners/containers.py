"""Containers: zip archives (PyTorch checkpoints, .npz, .keras, zips in zips), .npy files and
compressed pickles (joblib's compress=...).

Zips are read with our own central-directory walker rather than `zipfile`, because the loaders
that matter are more lenient than zipfile: torch's reader ignores CRCs, flag bits and a local
header whose name differs from the central directory's. A scanner stricter than the loader
would refuse (or skip) a member the loader happily unpickles. Members are read by range: stored
ones directly, deflated ones through zlib with the ratio and size limits enforced.
"""

from __future__ import annotations

import ast
import bz2
import contextvars
import lzma
import re
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from registry.scanners.allowlists import NUMPY_ALLOW, TORCH_ALLOW, Allowlist
from registry.scanners.base import Finding, Limits, ScanContext, ScanResult, Severity, Source
from registry.scanners.pickle import (
    ByteStream,
    PickleWalker,
    is_pickle_start,
    scan_embedded,
    scan_pickles,
)

LOCAL_MAGIC = b"PK\x03\x04"
EOCD_MAGIC = b"PK\x05\x06"
NPY_MAGIC = b"\x93NUMPY"
_TENSOR_MEMBER = re.compile(r"(^|/)data/\d+\Z")
# Tensor members of a torch archive whose local header and first bytes are checked.
TORCH_TENSORS_CHECKED = 8
_PEEK = 64
_INMEMORY = 16 << 20  # deflated members up to this size are inflated once and kept

ScanFn = Callable[..., ScanResult]


class RangeSource:
    """A window [start, end) of another Source (a stored zip member, a prefix)."""

    def __init__(self, source: Source, start: int, end: int) -> None:
        self._source = source
        self._start = start
        self._size = max(0, min(end, source.size) - start)

    @property
    def size(self) -> int:
        return self._size

    def read(self, start: int, end: int) -> bytes:
        start, end = max(0, start), min(end, self._size)
        if start >= end:
            return b""
        return self._source.read(self._start + start, self._start + end)


@dataclass
class Budget:
    """Uncompressed bytes produced for one top-level file, across nested archives."""

    expanded: int = 0


_BUDGET: contextvars.ContextVar[Budget | None] = contextvars.ContextVar("_BUDGET", default=None)


def budget_scope() -> contextvars.Token[Budget | None] | None:
    """Start a fresh budget unless one is running (nested scans share their parent's)."""
    if _BUDGET.get() is not None:
        return None
    return _BUDGET.set(Budget())


def budget_reset(token: contextvars.Token[Budget | None] | None) -> None:
    if token is not None:
        _BUDGET.reset(token)


class Decompressor(Protocol):
    def decompress(self, data: bytes, max_length: int = ...) -> bytes: ...

    @property
    def eof(self) -> bool: ...


class InflateSource:
    """Random access to a compressed member by streaming: forward reads continue the stream, a
    backward read restarts it. Limits are enforced as bytes come out; when one is exceeded the
    member reads as truncated there and `bomb` says why."""

    def __init__(
        self,
        raw: Source,
        declared: int,
        limits: Limits,
        make: Callable[[], Decompressor] = lambda: zlib.decompressobj(-15),
    ) -> None:
        self._raw = raw
        self._declared = declared
        self._limits = limits
        self._make = make
        self.bomb = ""
        self.error = ""
        self._restarts = 0
        self._all: bytes | None = None
        self._start_stream()

    def _start_stream(self) -> None:
        self._dec = self._make()
        self._in = 0  # compressed bytes fed
        self._out = 0  # uncompressed bytes produced
        self._pending = b""  # produced but not yet consumed

    @property
    def size(self) -> int:
        return self._declared

    def _produce(self, want: int) -> bytes:
        """Up to `want` more uncompressed bytes ("" at the end of the stream or on a limit)."""
        if self.bomb or self.error:
            return b""
        while not self._pending:
            if self._dec.eof:
                return b""
            if getattr(self._dec, "needs_input", True):
                chunk = self._raw.read(self._in, self._in + 65536)
            else:  # bz2/lzma keep unconsumed input themselves
                chunk = b""
            self._in += len(chunk)
            try:
                data = self._dec.decompress(chunk, want)
            except (zlib.error, lzma.LZMAError, OSError, EOFError) as exc:
                self.error = f"does not decompress ({type(exc).__name__})"
                return b""
            # Feed back what max_length left unconsumed on the next call.
            unconsumed = getattr(self._dec, "unconsumed_tail", b"")
            self._in -= len(unconsumed)
            if not data and not chunk and getattr(self._dec, "needs_input", True):
                return b""
            self._pending = data
        data, self._pending = self._pending[:want], self._pending[want:]
        self._out += len(data)
        self._check()
        return data

    def _check(self) -> None:
        if self._out > self._declared:
            self.bomb = f"expands past its declared size of {self._declared} bytes"
        elif self._out >= (1 << 20) and self._out > max(self._in, 1) * self._limits.max_ratio:
            self.bomb = f"expands more than {self._limits.max_ratio}x"
        elif self._out > self._limits.max_expanded:
            self.bomb = f"expands past {self._limits.max_expanded} bytes"

    def read(self, start: int, end: int) -> bytes:
        start, end = max(0, start), min(end, self._declared)
        if start >= end:
            return b""
        if self._all is not None:
            return self._all[start:end]
        if self._declared <= _INMEMORY and self._out == 0 and start == 0:
            parts = []
            while True:
                piece = self._produce(1 << 20)
                if not piece:
                    break
                parts.append(piece)
            self._all = b"".join(parts)[: self._declared]
            return self._all[start:end]
        position = self._out - len(self._pending)
        if start < position:
            self._restarts += 1
            if self._restarts > 16:
                raise RuntimeError("too many backward reads in a compressed member")
            self._start_stream()
            position = 0
        while position < start:
            skipped = self._produce(min(start - position, 1 << 20))
            if not skipped:
                return b""
            position += len(skipped)
        parts = []
        while position < end:
            piece = self._produce(end - position)
            if not piece:
                break
            parts.append(piece)
            position += len(piece)
        return b"".join(parts)


# --------------------------------------------------------------------------------------------
# Zip


@dataclass
class ZipEntry:
    name: str
    method: int
    flags: int
    csize: int
    usize: int
    header: int  # local header offset as declared (before adding the archive's start)


@dataclass
class ZipLayout:
    entries: list[ZipEntry]
    concat: int  # bytes before the archive (a polyglot's prefix)
    findings: list[Finding]


def find_eocd(source: Source) -> int | None:
    size = source.size
    tail_start = max(0, size - (65535 + 22))
    tail = source.read(tail_start, size)
    index = tail.rfind(EOCD_MAGIC)
    while index >= 0:
        if len(tail) - index >= 22:
            cd_size, _cd_offset = struct.unpack("<II", tail[index + 12 : index + 20])
            if cd_size <= tail_start + index:
                return tail_start + index
        index = tail.rfind(EOCD_MAGIC, 0, index)
    return None


def _zip64_extra(extra: bytes, usize: int, csize: int, offset: int) -> tuple[int, int, int]:
    pos = 0
    while pos + 4 <= len(extra):
        kind, length = struct.unpack("<HH", extra[pos : pos + 4])
        body = extra[pos + 4 : pos + 4 + length]
        if kind == 1:
            values = list(struct.unpack(f"<{len(body) // 8}Q", body[: len(body) // 8 * 8]))
            if usize == 0xFFFFFFFF and values:
                usize = values.pop(0)
            if csize == 0xFFFFFFFF and values:
                csize = values.pop(0)
            if offset == 0xFFFFFFFF and values:
                offset = values.pop(0)
        pos += 4 + length
    return usize, csize, offset


def read_layout(source: Source, eocd: int, ctx: ScanContext) -> ZipLayout:
    findings: list[Finding] = []
    record = source.read(eocd, eocd + 22)
    _, _, _, total, cd_size, cd_offset, _ = struct.unpack("<HHHHIIH", record[4:22])
    cd_end = eocd
    locator = source.read(eocd - 20, eocd) if eocd >= 20 else b""
    if locator[:4] == b"PK\x06\x07":
        (eocd64,) = struct.unpack("<Q", locator[8:16])
        guess = eocd - 20 - 56
        record64 = source.read(guess, guess + 56)
        if record64[:4] == b"PK\x06\x06":
            total, _, cd_size, cd_offset = struct.unpack("<QQQQ", record64[24:56])
            cd_end = guess
        del eocd64
    cd_start = cd_end - cd_size
    concat = cd_start - cd_offset
    if cd_start < 0:
        raise ValueError("central directory starts before the file")
    limit = ctx.limits.max_members
    if total > limit:
        findings.append(
            Finding(
                "archive.members.limit",
                Severity.HIGH,
                f"{total} members, more than the limit of {limit}",
                ctx.member,
            )
        )
    data = source.read(cd_start, cd_end)
    entries: list[ZipEntry] = []
    pos = 0
    while pos + 46 <= len(data) and len(entries) < limit:
        if data[pos : pos + 4] != b"PK\x01\x02":
            findings.append(
                Finding(
                    "zip.central.unanalysable",
                    Severity.HIGH,
                    "central directory entry has a bad signature",
                    ctx.member,
                    cd_start + pos,
                )
            )
            break
        (flags, method, _, _, _, csize, usize, nlen, xlen, clen) = struct.unpack(
            "<HHHHIIIHHH", data[pos + 8 : pos + 34]
        )
        (offset,) = struct.unpack("<I", data[pos + 42 : pos + 46])
        raw_name = data[pos + 46 : pos + 46 + nlen]
        extra = data[pos + 46 + nlen : pos + 46 + nlen + xlen]
        usize, csize, offset = _zip64_extra(extra, usize, csize, offset)
        name = raw_name.decode("utf-8" if flags & 0x800 else "cp437", "replace")
        entries.append(ZipEntry(name, method, flags, csize, usize, offset))
        pos += 46 + nlen + xlen + clen
    return ZipLayout(entries, concat, findings)


def locate_zip(source: Source, head: bytes) -> int | None:
    """The end-of-central-directory offset if `source` holds a zip anywhere (by content)."""
    if head.startswith(LOCAL_MAGIC) or head.startswith(EOCD_MAGIC) or source.size >= 22:
        return find_eocd(source)
    return None


def analyse_zip(
    source: Source, *, name: str, ctx: ScanContext, eocd: int, scan: ScanFn
) -> ScanResult:
    result = ScanResult(formats=["zip"])
    found = result.findings
    if ctx.depth > ctx.limits.max_depth:
        found.append(
            Finding(
                "archive.depth.limit",
                Severity.HIGH,
                f"archive nested deeper than {ctx.limits.max_depth} levels",
                ctx.member,
            )
        )
        return result
    layout = read_layout(source, eocd, ctx)
    found.extend(layout.findings)
    if layout.concat > 0:
        found.append(
            Finding(
                "zip.prefix",
                Severity.MEDIUM,
                f"{layout.concat} bytes precede the zip archive (a polyglot file)",
                ctx.member,
                0,
            )
        )
    names = [e.name for e in layout.entries]
    torch_roots = {n[: -len("data.pkl")] for n in names if re.fullmatch(r"[^/]*/data\.pkl", n)}
    is_torch = bool(torch_roots)
    if is_torch:
        result.formats.append("pytorch")
        if any(re.match(r"[^/]*/code/", n) for n in names):
            found.append(
                Finding(
                    "pytorch.torchscript.unanalysable",
                    Severity.HIGH,
                    "a TorchScript archive: its code is not analysed",
                    ctx.member,
                )
            )
    files = [n for n in names if not n.endswith("/")]
    if files and all(n.endswith(".npy") for n in files):
        result.formats.append("npz")
    seen: set[str] = set()
    tensors_checked = 0
    for entry in layout.entries:
        if entry.name in seen:
            found.append(
                Finding(
                    "zip.duplicate_name",
                    Severity.MEDIUM,
                    f"two members are named {entry.name!r}; loaders disagree on which wins",
                    ctx.member,
                    reference=entry.name,
                )
            )
        seen.add(entry.name)
        if entry.name.endswith("/"):
            continue
        if is_torch and _TENSOR_MEMBER.search(entry.name):
            # torch finds every member through the central directory and reads tensor members
            # as raw storage, never as pickles. Each tensor's local header sits in its own
            # 1 MiB encryption segment, so checking all of them would decrypt ~1 MiB per tensor
            # (5.6% of a 2 GiB, 146-tensor checkpoint). The first few are checked (a renamed or
            # pickle-shaped tensor in a small archive is still caught); the rest are not read.
            if tensors_checked >= TORCH_TENSORS_CHECKED:
                continue
            tensors_checked += 1
        _scan_member(source, entry, layout.concat, ctx, is_torch, scan, result)
    return result


def _scan_member(
    source: Source,
    entry: ZipEntry,
    concat: int,
    ctx: ScanContext,
    is_torch: bool,
    scan: ScanFn,
    result: ScanResult,
) -> None:
    found = result.findings
    member_ctx = ctx.inside(entry.name)
    where = member_ctx.member

    def finding(rule: str, severity: Severity, message: str, offset: int | None = None) -> None:
        found.append(Finding(rule, severity, message, where, offset, entry.name))

    header_at = entry.header + concat
    local = source.read(header_at, header_at + 30)
    if len(local) < 30 or local[:4] != LOCAL_MAGIC:
        finding("zip.member.unanalysable", Severity.HIGH, "local header missing or damaged")
        return
    nlen, xlen = struct.unpack("<HH", local[26:30])
    local_name = source.read(header_at + 30, header_at + 30 + nlen).decode("utf-8", "replace")
    start = header_at + 30 + nlen + xlen
    names = [entry.name]
    if local_name != entry.name:
        finding(
            "zip.name_mismatch",
            Severity.MEDIUM,
            f"local header names this member {local_name!r}",
        )
        names.append(local_name)
    if entry.flags & 0x1:
        finding("zip.encrypted.unanalysable", Severity.HIGH, "member is encrypted")
        return
    if start + entry.csize > source.size:
        finding("zip.truncated", Severity.HIGH, "member data runs past the end of the file")
    raw = RangeSource(source, start, start + entry.csize)
    limits = ctx.limits
    member: Source
    inflate: InflateSource | None = None
    if entry.method == 0:
        member = raw
    elif entry.method == 8:
        budget = _BUDGET.get()
        if budget is not None:
            budget.expanded += entry.usize
        declared_ratio = entry.usize / max(entry.csize, 1)
        if entry.usize >= (1 << 20) and declared_ratio > limits.max_ratio:
            finding(
                "archive.bomb",
                Severity.CRITICAL,
                f"declares {entry.usize} bytes from {entry.csize} ({declared_ratio:.0f}x)",
            )
            return
        if entry.usize > limits.max_expanded or (
            budget is not None and budget.expanded > limits.max_expanded
        ):
            finding("archive.bomb", Severity.CRITICAL, "expands past the size limit")
            return
        inflate = InflateSource(raw, entry.usize, limits)
        member = inflate
    else:
        finding(
            "zip.method.unanalysable",
            Severity.HIGH,
            f"compression method {entry.method} is not supported",
        )
        return
    try:
        head = member.read(0, _PEEK)
        pickle_named = any(n.endswith(".pkl") for n in names)
        tensor = is_torch and all(_TENSOR_MEMBER.search(n) for n in names)
        if is_torch and pickle_named:
            scanned = scan_pickles(member, allow=TORCH_ALLOW, ctx=member_ctx)
            found.extend(scanned.findings)
        elif tensor:
            # Tensor bytes are read by torch as raw storage, never unpickled: peek only, and
            # scan further just if the first bytes are an executable format.
            if head.startswith((LOCAL_MAGIC, NPY_MAGIC)):
                found.extend(scan(member, name=entry.name, ctx=member_ctx).findings)
            elif is_pickle_start(head):
                found.extend(
                    scan_embedded(member, 0, 2, allow=TORCH_ALLOW, ctx=member_ctx).findings
                )
        else:
            for index, member_name in enumerate(names):
                sub = scan(member, name=member_name, ctx=member_ctx)
                for f in sub.findings:
                    if index == 0 or f not in found:
                        found.append(f)
    finally:
        if inflate is not None and inflate.bomb:
            finding("archive.bomb", Severity.CRITICAL, f"member {inflate.bomb}")
        if inflate is not None and inflate.error:
            finding("zip.member.unanalysable", Severity.HIGH, f"member {inflate.error}")


# --------------------------------------------------------------------------------------------
# .npy


def analyse_npy(source: Source, *, ctx: ScanContext) -> ScanResult:
    result = ScanResult(formats=["npy"])
    where = ctx.member

    def bad(message: str) -> ScanResult:
        result.findings.append(Finding("numpy.header.unanalysable", Severity.HIGH, message, where))
        return result

    head = source.read(0, 12)
    if len(head) < 10:
        return bad("truncated .npy header")
    major = head[6]
    if major == 1:
        (length,) = struct.unpack("<H", head[8:10])
        start = 10
    elif major in (2, 3):
        if len(head) < 12:
            return bad("truncated .npy header")
        (length,) = struct.unpack("<I", head[8:12])
        start = 12
    else:
        return bad(f"unknown .npy version {major}")
    if length > (1 << 20):
        return bad(f".npy header of {length} bytes")
    raw = source.read(start, start + length)
    if len(raw) < length:
        return bad("truncated .npy header")
    try:
        header = ast.literal_eval(raw.decode("utf-8" if major == 3 else "latin-1"))
    except (ValueError, SyntaxError, MemoryError, RecursionError, UnicodeDecodeError):
        return bad(".npy header is not a Python literal")
    if not isinstance(header, dict) or "descr" not in header:
        return bad(".npy header has no descr")
    if _has_object(header["descr"]):
        result.findings.append(
            Finding(
                "numpy.object_array",
                Severity.HIGH,
                "array of Python objects: numpy.load(allow_pickle=True) unpickles it",
                where,
                start + length,
            )
        )
        scanned = scan_pickles(source, allow=NUMPY_ALLOW, ctx=ctx, start=start + length)
        result.findings.extend(scanned.findings)
        result.formats.append("pickle")
    return result


def _has_object(descr: object) -> bool:
    if isinstance(descr, str):
        return bool(re.fullmatch(r"[<>|=]?O\d*", descr))
    if isinstance(descr, list | tuple):
        return any(_has_object(part) for part in descr)
    return False


# --------------------------------------------------------------------------------------------
# Compressed pickles (joblib compress=...)

COMPRESSED = (
    (b"\x1f\x8b", "gzip", lambda: zlib.decompressobj(31)),
    (b"BZh", "bz2", bz2.BZ2Decompressor),
    (b"\xfd7zXZ\x00", "xz", lzma.LZMADecompressor),
    (b"]\x00\x00", "lzma", lzma.LZMADecompressor),
)


def compression_of(
    head: bytes, pickle_named: bool
) -> tuple[str, Callable[[], Decompressor]] | None:
    for magic, kind, make in COMPRESSED:
        if head.startswith(magic):
            return kind, make
    if pickle_named and len(head) >= 2 and head[0] == 0x78 and (head[0] * 256 + head[1]) % 31 == 0:
        return "zlib", zlib.decompressobj
    return None


class _InflateStream(ByteStream):
    def __init__(self, source: InflateSource) -> None:
        super().__init__()
        self._source = source
        self._at = 0

    def _fill(self) -> bytes:
        data = self._source.read(self._at, self._at + 65536)
        self._at += len(data)
        return data


def analyse_compressed(
    source: Source,
    *,
    kind: str,
    make: Callable[[], Decompressor],
    allow: Allowlist,
    ctx: ScanContext,
) -> ScanResult:
    """A compressed stream of pickles, walked as it inflates (never held whole)."""
    result = ScanResult(formats=[kind])
    limits = ctx.limits
    inflate = InflateSource(source, limits.max_expanded, limits, make)
    stream = _InflateStream(inflate)
    if not is_pickle_start(inflate.read(0, 2)) and inflate.read(0, 1)[:1] not in (b"(", b"c"):
        result.findings.append(
            Finding(
                "compressed.unanalysable",
                Severity.HIGH,
                f"{kind}-compressed content that is not a pickle",
                ctx.member,
            )
        )
        return result
    result.formats.append("pickle")
    count = 0
    while not stream.at_end() and count < 64:
        walk = PickleWalker(stream, allow=allow, ctx=ctx, label=f"{kind} stream").run()
        result.findings.extend(walk.findings)
        if walk.joblib and "joblib" not in result.formats:
            result.formats.append("joblib")
        count += 1
        if not walk.stopped:
            break
    if inflate.bomb:
        result.findings.append(
            Finding("archive.bomb", Severity.CRITICAL, f"stream {inflate.bomb}", ctx.member)
        )
    if inflate.error:
        result.findings.append(
            Finding("compressed.unanalysable", Severity.HIGH, f"stream {inflate.error}", ctx.member)
        )
    return result
