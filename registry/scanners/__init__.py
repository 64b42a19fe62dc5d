"""Unsafe-serialization analysers: pure functions over byte sources (see base.py)."""

from __future__ import annotations

from registry.scanners.base import (
    SCANNER_VERSION,
    BytesSource,
    Finding,
    Limits,
    ScanContext,
    ScanResult,
    Severity,
    Source,
)

__all__ = [
    "SCANNER_VERSION",
    "BytesSource",
    "Finding",
    "Limits",
    "ScanContext",
    "ScanResult",
    "Severity",
    "Source",
    "scan",
]


def scan(source: Source, *, name: str, ctx: ScanContext | None = None) -> ScanResult:
    """Analyse one file: detect its formats by content (not by extension) and run them.

    PLACEHOLDER until the format analysers land: recognises nothing.
    """
    return ScanResult()
