"""Unsafe-serialization analysers: pure functions over byte sources (see base.py).

`scan()` detects formats by content (first bytes, and the tail for zips, so a misleading
extension or a pickle+zip polyglot changes nothing), runs every analyser that recognises the
file, and recurses into archive members. Analysers of other formats live in their own modules
and share one interface, imported lazily so that a missing one is skipped:

    detect(head: bytes, name: str) -> bool
    analyse(source: Source, *, name: str, ctx: ScanContext) -> ScanResult
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

from registry.scanners import containers
from registry.scanners.allowlists import DEFAULT_ALLOW, SKLEARN_ALLOW
from registry.scanners.base import (
    SCANNER_VERSION,
    BytesSource,
    Finding,
    Limits,
    ScanContext,
    ScanResult,
    Severity,
    Source,
    is_unanalysable,
)
from registry.scanners.pickle import is_pickle_start, scan_embedded, scan_pickles, walk_one

__all__ = [
    "SCANNER_VERSION",
    "BytesSource",
    "Finding",
    "Limits",
    "ScanContext",
    "ScanResult",
    "Severity",
    "Source",
    "is_unanalysable",
    "scan",
]

EXTERNAL_ANALYSERS = (
    "registry.scanners.keras",
    "registry.scanners.savedmodel",
    "registry.scanners.onnxfile",
    "registry.scanners.gguffile",
    "registry.scanners.safetensorsfile",
)
# Extensions under which files are pickles (or pickle-based): a protocol 0/1 pickle has no
# magic number, so for these names a failed walk is a finding rather than "not a pickle".
# `.bin`, `.dat`, `.data`, `.model` and `.npy` are left out on purpose: they hold raw tensors
# as often as pickles (a PyTorch `.bin` is a zip or starts with PROTO, both found by content),
# and random bytes under those names would otherwise be quarantined as "unknown opcode".
# They still get the content search for pickles that every unrecognised file gets.
PICKLE_EXTENSIONS = frozenset([".pkl", ".pickle", ".pt", ".pth", ".ckpt", ".joblib", ".sav", ".p"])
_HEAD = 4096

_modules: dict[str, ModuleType | None] = {}


def _external(path: str) -> ModuleType | None:
    if path not in _modules:
        try:
            _modules[path] = importlib.import_module(path)
        except ImportError:
            _modules[path] = None
    return _modules[path]


def scan(source: Source, *, name: str, ctx: ScanContext | None = None) -> ScanResult:
    """Analyse one file: detect its formats by content (not by extension) and run them.

    Never raises: an analyser that fails adds a `scan.error` finding (see `is_unanalysable`).
    Findings name `ctx.member` (archive members joined with "!") and an offset.
    """
    ctx = ctx or ScanContext()
    result = ScanResult()
    token = containers.budget_scope()
    try:
        _dispatch(source, name, ctx, result)
    except Exception as exc:  # every failure is a finding, never an escape
        result.findings.append(
            Finding(
                "scan.error",
                Severity.HIGH,
                f"analysis failed ({type(exc).__name__}); the file was not fully analysed",
                ctx.member,
            )
        )
    finally:
        containers.budget_reset(token)
    return result


def _merge(into: ScanResult, part: ScanResult) -> None:
    into.findings.extend(part.findings)
    for fmt in part.formats:
        if fmt not in into.formats:
            into.formats.append(fmt)


def _guard(result: ScanResult, ctx: ScanContext, what: str) -> _Guard:
    return _Guard(result, ctx, what)


class _Guard:
    """Turns an analyser's exception into a finding so the other analysers still run."""

    def __init__(self, result: ScanResult, ctx: ScanContext, what: str) -> None:
        self.result, self.ctx, self.what = result, ctx, what

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: object, exc: object, tb: object) -> bool:
        if exc is None:
            return False
        self.result.findings.append(
            Finding(
                "scan.error",
                Severity.HIGH,
                f"{self.what} analysis failed ({type(exc).__name__})",
                self.ctx.member,
            )
        )
        return isinstance(exc, Exception)


def _dispatch(source: Source, name: str, ctx: ScanContext, result: ScanResult) -> None:
    head = source.read(0, _HEAD)
    ext = os.path.splitext(name.lower())[1]
    pickle_named = ext in PICKLE_EXTENSIONS
    recognised = False

    for path in EXTERNAL_ANALYSERS:
        module = _external(path)
        if module is None:
            continue
        with _guard(result, ctx, path.rsplit(".", 1)[1]):
            if module.detect(head, name):
                recognised = True
                _merge(result, module.analyse(source, name=name, ctx=ctx))

    eocd = None
    with _guard(result, ctx, "zip"):
        eocd = containers.locate_zip(source, head)
        if eocd is not None:
            recognised = True
            _merge(result, containers.analyse_zip(source, name=name, ctx=ctx, eocd=eocd, scan=scan))
        elif head.startswith(containers.LOCAL_MAGIC):
            recognised = True
            result.formats.append("zip")
            result.findings.append(
                Finding(
                    "zip.truncated",
                    Severity.HIGH,
                    "zip local header but no central directory (truncated archive)",
                    ctx.member,
                )
            )
    if head.startswith(containers.LOCAL_MAGIC) or head.startswith(containers.EOCD_MAGIC):
        return

    allow = SKLEARN_ALLOW if ext == ".joblib" else DEFAULT_ALLOW
    with _guard(result, ctx, "pickle"):
        if head.startswith(containers.NPY_MAGIC):
            _merge(result, containers.analyse_npy(source, ctx=ctx))
            return
        if is_pickle_start(head):
            scanned = scan_pickles(source, allow=allow, ctx=ctx)
            _merge(result, ScanResult(scanned.findings, scanned.formats))
            return
        compression = containers.compression_of(head, pickle_named)
        if compression is not None:
            kind, make = compression
            _merge(
                result,
                containers.analyse_compressed(source, kind=kind, make=make, allow=allow, ctx=ctx),
            )
            return
        if pickle_named and not recognised and source.size:
            scanned = scan_pickles(source, allow=allow, ctx=ctx)
            _merge(result, ScanResult(scanned.findings, scanned.formats))
            return
        if recognised and eocd is None:
            return
        _unknown(source, head, ctx, result, eocd)


def _unknown(
    source: Source, head: bytes, ctx: ScanContext, result: ScanResult, eocd: int | None
) -> None:
    """No format claims the file: look for pickles anyway (an extension proves nothing)."""
    found = result.findings
    # A protocol 0/1 pickle has no magic: try offset 0 and keep it only if it is a whole pickle
    # or reaches for something known to run code (text that happens to start with an opcode
    # letter fails before that).
    if head[:1] in (b"(", b"c", b"]", b"}", b")", b"i", b"l", b"d"):
        walk = walk_one(source, 0, source.size, allow=DEFAULT_ALLOW, ctx=ctx)
        if walk.critical or (walk.stopped and walk.end == source.size):
            found.extend(walk.findings)
            result.formats.append("pickle")
            return
    end = source.size
    if eocd is not None:
        end = min(end, eocd)
    limit = ctx.limits.max_unknown
    embedded = scan_embedded(source, 0, min(end, limit), allow=DEFAULT_ALLOW, ctx=ctx)
    found.extend(embedded.findings)
    for fmt in embedded.formats:
        if fmt not in result.formats:
            result.formats.append(fmt)
    if end > limit:
        found.append(
            Finding(
                "format.unknown.limit",
                Severity.MEDIUM,
                f"unrecognised file larger than {limit} bytes: only its start was searched",
                ctx.member,
            )
        )
    if eocd is None and not result.formats and ctx.depth == 0:
        found.append(Finding("format.unknown", Severity.INFO, "no known model format", ctx.member))
