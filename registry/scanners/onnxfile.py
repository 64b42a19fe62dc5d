"""ONNX models: external-data locations that leave the model's folder.

A tensor stored outside the .onnx file names its file in `external_data["location"]`, which the
loader joins to the model's directory; an absolute path, a drive or UNC path, or a `..` segment
makes it read (or, when saving, write) any file the process can reach. Every tensor is checked:
graph initializers, sparse initializers (values and indices), node attribute tensors (`t`,
`tensors`, `sparse_tensor(s)`), subgraphs of If/Loop/Scan at any depth, function bodies and
default attributes, and training-info graphs. A tensor with external_data entries is checked
whatever its data_location says (a superset of what the loader follows).

Files up to PARSE_LIMIT are parsed with onnx itself (the loaders' own protobuf schema, so a file
it rejects is a finding). Larger files, which embed weights and can reach 2 GiB, are walked on the
wire instead, so the tensor payloads are skipped by offset rather than read.

Rules: `onnx.external_data.escape` CRITICAL (reference = the location),
`onnx.external_data.invalid` HIGH (external tensor without a usable location),
`onnx.unanalysable` HIGH.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Iterator
from typing import Any

from registry.scanners.base import BytesSource, Finding, ScanContext, ScanResult, Severity, Source
from registry.scanners.protowire import LEN, VARINT, WireError, WireReader

# Small enough that the in-memory parse never holds a model's weights: above it, the wire walk
# reads only the graph structure.
PARSE_LIMIT = 16 << 20
MAX_DEPTH = 64  # protobuf's own recursion limit is 100
EXTERNAL = 1  # TensorProto.DataLocation.EXTERNAL
_DRIVE = re.compile(r"^[A-Za-z]:")

# Message schemas for the wire walk: field number -> the message it holds (onnx.proto3).
_TENSOR, _SPARSE, _GRAPH, _NODE, _ATTR, _FUNCTION, _TRAINING = range(7)
_SCHEMA: dict[int, dict[int, int]] = {
    -1: {7: _GRAPH, 20: _TRAINING, 25: _FUNCTION},  # ModelProto
    _GRAPH: {1: _NODE, 5: _TENSOR, 15: _SPARSE},
    _NODE: {5: _ATTR},
    _ATTR: {5: _TENSOR, 6: _GRAPH, 10: _TENSOR, 11: _GRAPH, 22: _SPARSE, 23: _SPARSE},
    _SPARSE: {1: _TENSOR, 2: _TENSOR},
    _FUNCTION: {7: _NODE, 11: _ATTR},
    _TRAINING: {1: _GRAPH, 2: _GRAPH},
}
# ModelProto's top-level fields and wire types, for detection by content.
_MODEL_FIELDS = {1: VARINT, 2: LEN, 3: LEN, 4: LEN, 5: VARINT, 6: LEN, 7: LEN, 8: LEN, 14: LEN}


def detect(head: bytes, name: str) -> bool:
    if name.lower().endswith(".onnx"):
        return True
    if not head.startswith(b"\x08") or len(head) < 2 or not 3 <= head[1] <= 30:
        return False  # ir_version 3+ (IR 1-2 predate external data); also rules out SavedModel
    reader = WireReader(BytesSource(head))
    pos = 0
    seen: set[int] = set()
    try:
        while pos < len(head):
            key, value_at = reader.varint(pos, len(head))
            number, wire_type = key >> 3, key & 7
            if _MODEL_FIELDS.get(number) != wire_type:
                return False
            seen.add(number)
            if number in (7, 8):
                return 1 in seen
            if wire_type == VARINT:
                _, pos = reader.varint(value_at, len(head))
            else:
                length, payload = reader.varint(value_at, len(head))
                pos = payload + length
    except WireError:
        return False
    return False


def analyse(source: Source, *, name: str, ctx: ScanContext) -> ScanResult:
    result = ScanResult(formats=["onnx"])
    try:
        for tensor_name, location_entries, offset in external_tensors(source):
            finding = judge_location(tensor_name, location_entries, offset=offset, ctx=ctx)
            if finding is not None:
                result.findings.append(finding)
    except Exception as exc:
        result.findings.append(
            Finding(
                rule="onnx.unanalysable",
                severity=Severity.HIGH,
                message=f"ONNX model could not be analysed ({type(exc).__name__}: {exc}); "
                "check it with onnx.checker and re-export it.",
                member=ctx.member,
            )
        )
    return result


def location_problem(location: str) -> str | None:
    """Why `location` may leave the model's folder, or None if it stays inside."""
    if "\x00" in location:
        return "contains a NUL byte"
    normalised = location.replace("\\", "/")
    if normalised.startswith("/"):
        return "is an absolute or UNC path"
    if _DRIVE.match(normalised):
        return "names a drive"
    if ".." in normalised.split("/"):
        return "contains a '..' segment"
    if posixpath.normpath(normalised).startswith(("..", "/")):
        return "normalises outside the model's folder"
    return None


def judge_location(
    tensor: str, entries: list[tuple[str, str]], *, offset: int | None, ctx: ScanContext
) -> Finding | None:
    locations = [value for key, value in entries if key == "location"]
    if not locations or not all(loc.strip() for loc in locations):
        return Finding(
            rule="onnx.external_data.invalid",
            severity=Severity.HIGH,
            message=f"Tensor {tensor!r} is stored externally but names no file; re-export "
            "the model with its external data.",
            member=ctx.member,
            offset=offset,
        )
    for location in locations:  # protobuf-level duplicates: a loader may take either
        problem = location_problem(location)
        if problem is not None:
            return Finding(
                rule="onnx.external_data.escape",
                severity=Severity.CRITICAL,
                message=f"Tensor {tensor!r} reads its data from {location!r}, which {problem}; "
                "external data must be a relative path inside the model's folder.",
                member=ctx.member,
                offset=offset,
                reference=location,
            )
    return None


_Tensor = tuple[str, list[tuple[str, str]], int | None]


def external_tensors(source: Source, *, parse_limit: int = PARSE_LIMIT) -> list[_Tensor]:
    """(name, external_data entries, offset or None) of every externally stored tensor."""
    if source.size <= parse_limit:
        return _tensors_parsed(source)
    return _tensors_on_wire(WireReader(source))


def _tensors_parsed(source: Source) -> list[_Tensor]:
    import onnx  # imported here: only ONNX scans pay for it

    model = onnx.load_model_from_string(source.read(0, source.size))
    found: list[_Tensor] = []
    for tensor in _walk_messages(model):
        if tensor.data_location == EXTERNAL or len(tensor.external_data):
            entries = [(entry.key, entry.value) for entry in tensor.external_data]
            found.append((tensor.name, entries, None))
    return found


def _walk_messages(model: Any) -> Iterator[Any]:
    """Every TensorProto reachable in a parsed ModelProto, iteratively."""
    graphs: list[Any] = [model.graph]
    attributes: list[Any] = []
    for function in model.functions:
        attributes.extend(function.attribute_proto)
        attributes.extend(a for node in function.node for a in node.attribute)
    for info in model.training_info:
        graphs.extend((info.initialization, info.algorithm))
    while graphs or attributes:
        if graphs:
            graph = graphs.pop()
            yield from graph.initializer
            for sparse in graph.sparse_initializer:
                yield from (sparse.values, sparse.indices)
            attributes.extend(a for node in graph.node for a in node.attribute)
            continue
        attribute = attributes.pop()
        if attribute.HasField("t"):
            yield attribute.t
        yield from attribute.tensors
        for sparse in [*attribute.sparse_tensors, attribute.sparse_tensor]:
            yield from (sparse.values, sparse.indices)
        if attribute.HasField("g"):
            graphs.append(attribute.g)
        graphs.extend(attribute.graphs)


def _tensors_on_wire(reader: WireReader) -> list[_Tensor]:
    found: list[_Tensor] = []
    stack: list[tuple[int, int, int, int]] = [(-1, 0, reader.size, 0)]
    while stack:
        kind, start, end, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise WireError(f"messages nested deeper than {MAX_DEPTH}")
        if kind == _TENSOR:
            found.extend(_tensor_on_wire(reader, start, end))
            continue
        for field in reader.fields(start, end):
            child = _SCHEMA[kind].get(field.number)
            if child is not None:
                if field.wire_type != LEN:
                    raise WireError(f"field {field.number} at {field.offset} is not a message")
                stack.append((child, field.offset, field.end, depth + 1))
    return found


def _tensor_on_wire(reader: WireReader, start: int, end: int) -> list[_Tensor]:
    name = ""
    external = False
    entries: list[tuple[str, str]] = []
    for field in reader.fields(start, end):
        if field.number == 8 and field.wire_type == LEN:
            name = reader.text(field, 4096)
        elif field.number == 14 and field.wire_type == VARINT:
            external = field.value == EXTERNAL
        elif field.number == 13 and field.wire_type == LEN:
            key = value = ""
            for inner in reader.fields(field.offset, field.end):
                if inner.number == 1 and inner.wire_type == LEN:
                    key = reader.text(inner, 4096)
                elif inner.number == 2 and inner.wire_type == LEN:
                    value = reader.text(inner, 1 << 16)
            entries.append((key, value))
    return [(name, entries, start)] if external or entries else []
