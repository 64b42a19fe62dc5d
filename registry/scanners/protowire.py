"""A protobuf wire-format walker over a Source, for the SavedModel and large-ONNX analysers.

It decodes only the fields an analyser descends into and skips the others by offset, so a
frozen graph's constants or an ONNX file's embedded weights are never read. It is lenient the
way a walker for a scanner should be: every occurrence of a field is visited (protobuf keeps the
last value of a scalar and merges repeated messages; visiting all of them is a superset).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from registry.scanners.base import Source

VARINT, I64, LEN, SGROUP, EGROUP, I32 = 0, 1, 2, 3, 4, 5
_WINDOW = 64 << 10


class WireError(ValueError):
    """The bytes are not a well-formed protobuf message."""


@dataclass(frozen=True)
class Field:
    number: int
    wire_type: int
    offset: int  # where the field's value starts
    end: int  # where it ends (for LEN: the payload's end)
    value: int  # VARINT/I32/I64: the integer; LEN: the payload's start


class WireReader:
    """Ranged reads through a one-window cache (fields are visited mostly in order)."""

    def __init__(self, source: Source) -> None:
        self.source = source
        self.size = source.size
        self._start = 0
        self._buf = b""

    def bytes(self, start: int, end: int) -> bytes:
        if end > self.size or start < 0 or start > end:
            raise WireError(f"range [{start}, {end}) outside the message")
        if self._start <= start and end <= self._start + len(self._buf):
            return self._buf[start - self._start : end - self._start]
        if end - start > _WINDOW:
            return self.source.read(start, end)
        self._start = start
        self._buf = self.source.read(start, min(self.size, start + _WINDOW))
        return self._buf[: end - start]

    def varint(self, pos: int, end: int) -> tuple[int, int]:
        result = 0
        for shift in range(0, 70, 7):
            if pos >= end:
                raise WireError("truncated varint")
            byte = self.bytes(pos, pos + 1)[0]
            pos += 1
            result |= (byte & 0x7F) << shift
            if not byte & 0x80:
                return result, pos
        raise WireError("varint longer than 10 bytes")

    def fields(self, start: int, end: int) -> Iterator[Field]:
        """The fields of the message in [start, end); groups are skipped whole."""
        pos = start
        while pos < end:
            key, pos = self.varint(pos, end)
            number, wire_type = key >> 3, key & 7
            if number == 0:
                raise WireError(f"field number 0 at offset {pos}")
            if wire_type == VARINT:
                value, new = self.varint(pos, end)
                yield Field(number, wire_type, pos, new, value)
            elif wire_type in (I64, I32):
                width = 8 if wire_type == I64 else 4
                new = pos + width
                if new > end:
                    raise WireError("truncated fixed-width field")
                value = int.from_bytes(self.bytes(pos, new), "little")
                yield Field(number, wire_type, pos, new, value)
            elif wire_type == LEN:
                length, payload = self.varint(pos, end)
                new = payload + length
                if new > end:
                    raise WireError(f"field {number} at offset {pos} runs past its message")
                yield Field(number, wire_type, payload, new, payload)
            elif wire_type == SGROUP:
                new = self._skip_group(pos, end, number)
            else:
                raise WireError(f"unexpected wire type {wire_type} at offset {pos}")
            pos = new

    def _skip_group(self, pos: int, end: int, number: int) -> int:
        depth = 1
        while depth:
            key, pos = self.varint(pos, end)
            wire_type = key & 7
            if wire_type == VARINT:
                _, pos = self.varint(pos, end)
            elif wire_type == I64:
                pos += 8
            elif wire_type == I32:
                pos += 4
            elif wire_type == LEN:
                length, pos = self.varint(pos, end)
                pos += length
            elif wire_type == SGROUP:
                depth += 1
            elif wire_type == EGROUP:
                depth -= 1
            else:
                raise WireError(f"unexpected wire type {wire_type} in group {number}")
            if pos > end:
                raise WireError(f"group {number} runs past its message")
        return pos

    def text(self, field: Field, limit: int = 1 << 20) -> str:
        """A string field's value (at most `limit` bytes of it; decoding errors replaced)."""
        return self.bytes(field.offset, min(field.end, field.offset + limit)).decode(
            "utf-8", "replace"
        )
