"""safetensors: the header is validated the way the reference (Rust) loader does, against the
file size; the tensor data is never read.

Layout: an 8-byte little-endian header length N, N bytes of UTF-8 JSON (an object, optionally
padded with spaces), then the data area. Each tensor is {dtype, shape, data_offsets [begin, end]}
relative to the data area; `__metadata__` is an optional str -> str map.

Rules: `safetensors.malformed` HIGH (the reference loader would refuse the file, or two parsers
could read it differently: bad length, JSON, dtype, shape, offsets, overlaps, duplicate keys);
`safetensors.gap` MEDIUM (bytes in the data area no tensor covers: a place to hide a payload);
`safetensors.unanalysable` HIGH (anything else that went wrong).
"""

from __future__ import annotations

import json
import math
import struct
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from registry.scanners.base import Finding, ScanContext, ScanResult, Severity, Source

MAX_HEADER = 100_000_000  # the reference implementation's limit
# dtype -> size in bits (the sub-byte float formats must fill whole bytes in total)
DTYPE_BITS = {
    "BOOL": 8,
    "U8": 8,
    "I8": 8,
    "F8_E5M2": 8,
    "F8_E4M3": 8,
    "F8_E8M0": 8,
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
    "I16": 16,
    "U16": 16,
    "F16": 16,
    "BF16": 16,
    "I32": 32,
    "U32": 32,
    "F32": 32,
    "C64": 64,
    "F64": 64,
    "I64": 64,
    "U64": 64,
}


class Malformed(ValueError):
    """The header breaks the format; `offset` is where in the file."""

    def __init__(self, message: str, offset: int = 0) -> None:
        super().__init__(message)
        self.offset = offset


@dataclass
class Header:
    length: int  # N, the JSON header's length
    tensors: dict[str, dict[str, Any]]
    metadata: dict[str, str]
    gaps: list[tuple[int, int]] = field(default_factory=list)  # data-area ranges uncovered


def detect(head: bytes, name: str) -> bool:
    if name.lower().endswith(".safetensors"):
        return True
    if len(head) < 10:
        return False
    (length,) = struct.unpack("<Q", head[:8])
    return 2 <= length <= MAX_HEADER and head[8:9] == b"{" and head[9:10] in b'"} \t\r\n'


def analyse(source: Source, *, name: str, ctx: ScanContext) -> ScanResult:
    result = ScanResult(formats=["safetensors"])
    try:
        header = parse_header(source)
        data_start = 8 + header.length
        for begin, end in header.gaps:
            result.findings.append(
                Finding(
                    rule="safetensors.gap",
                    severity=Severity.MEDIUM,
                    message=f"Bytes {begin}-{end} of the data area belong to no tensor; the "
                    "format requires tensors to cover it contiguously. Re-save the file.",
                    member=ctx.member,
                    offset=data_start + begin,
                )
            )
    except Malformed as exc:
        result.findings.append(
            Finding(
                rule="safetensors.malformed",
                severity=Severity.HIGH,
                message=f"Malformed safetensors header: {exc}. Re-save the file with the "
                "safetensors library.",
                member=ctx.member,
                offset=exc.offset,
            )
        )
    except Exception as exc:
        result.findings.append(
            Finding(
                rule="safetensors.unanalysable",
                severity=Severity.HIGH,
                message=f"safetensors file could not be analysed ({type(exc).__name__}: {exc}).",
                member=ctx.member,
            )
        )
    return result


def safetensors_summary(source: Source) -> dict[str, Any]:
    """Tensor count, dtype counts and parameter count of a valid file (raises Malformed)."""
    header = parse_header(source)
    return {
        "tensors": len(header.tensors),
        "dtypes": dict(Counter(info["dtype"] for info in header.tensors.values())),
        "parameters": sum(math.prod(info["shape"]) for info in header.tensors.values()),
        "metadata": header.metadata,
    }


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise Malformed(f"duplicate key {key!r} (parsers disagree on which wins)", 8)
        result[key] = value
    return result


def parse_header(source: Source) -> Header:
    if source.size < 8:
        raise Malformed(f"{source.size} bytes is too short for the 8-byte header length")
    (length,) = struct.unpack("<Q", source.read(0, 8))
    if length > MAX_HEADER:
        raise Malformed(f"header length {length} exceeds {MAX_HEADER}")
    if length > source.size - 8:
        raise Malformed(f"header length {length} exceeds the {source.size - 8} bytes after it")
    raw = source.read(8, 8 + length)
    if not raw.startswith(b"{"):
        raise Malformed("header does not start with '{'", 8)
    try:
        parsed = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise Malformed(f"header is not UTF-8 JSON ({exc})", 8) from exc
    if not isinstance(parsed, dict):
        raise Malformed("header is not a JSON object", 8)
    metadata = parsed.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise Malformed("__metadata__ must map strings to strings", 8)
    data_size = source.size - 8 - length
    spans: list[tuple[int, int, str]] = []
    for name, info in parsed.items():
        spans.append((*_tensor_span(name, info, data_size), name))
    spans.sort()
    gaps: list[tuple[int, int]] = []
    position = 0
    for begin, end, name in spans:
        if begin < position:
            raise Malformed(f"tensor {name!r} overlaps the one before it", 8)
        if begin > position:
            gaps.append((position, begin))
        position = end
    if position < data_size:
        gaps.append((position, data_size))
    return Header(length=length, tensors=parsed, metadata=metadata, gaps=gaps)


def _tensor_span(name: str, info: Any, data_size: int) -> tuple[int, int]:
    if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
        raise Malformed(f"tensor {name!r} must have exactly dtype, shape and data_offsets", 8)
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if dtype not in DTYPE_BITS:
        raise Malformed(f"tensor {name!r} has unknown dtype {dtype!r}", 8)
    if not isinstance(shape, list) or not all(_natural(d) for d in shape):
        raise Malformed(f"tensor {name!r} shape must be a list of non-negative integers", 8)
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_natural, offsets))):
        raise Malformed(f"tensor {name!r} data_offsets must be [begin, end]", 8)
    begin, end = offsets
    if begin > end or end > data_size:
        raise Malformed(f"tensor {name!r} data_offsets {offsets} outside the data area", 8)
    bits = math.prod(shape) * DTYPE_BITS[dtype]
    if bits % 8 or bits // 8 != end - begin:
        raise Malformed(
            f"tensor {name!r} spans {end - begin} bytes but {dtype}{shape} needs {bits / 8}", 8
        )
    return begin, end


def _natural(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
