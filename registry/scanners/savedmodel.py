"""TensorFlow SavedModel: `saved_model.pb` (and `.pbtxt`) graphs, and Keras's `keras_metadata.pb`.

The protobuf is walked on the wire (no TensorFlow): SavedModel.meta_graphs[].graph_def.node[]
and .library.function[].node_def[] give every op the graph can run (a function call is a node
whose op is a library function's name, and that function's nodes are walked too). Large
constants are skipped by offset, never read. Keras layer metadata (keras_metadata.pb, and the
older SavedUserObject.metadata inside saved_model.pb) is JSON judged by the Keras rules.

Ops judged (by name, in any graph or function):
- `savedmodel.python_op` CRITICAL: PyFunc, PyFuncStateless, EagerPyFunc (run Python code).
- `savedmodel.file_write_op` CRITICAL: WriteFile, summary/event writers, dataset writers
  (SaveDataset, DatasetToTFRecord, snapshots), and PrintV2 whose output_stream is `file://`.
- `savedmodel.file_read_op` HIGH: ReadFile, MatchingFiles, ImmutableConst (memory-maps a path),
  file readers and file-reading datasets (TFRecord/TextLine/FixedLength/CSV/LMDB/SQL), LoadDataset.
- `savedmodel.network_op` HIGH: RPC ops, tf.data service, GCS configuration, Debug* ops (they
  send tensors to debug URLs or dump them to files).
Not flagged: Save/SaveV2/SaveSlices/Restore/RestoreV2/RestoreSlice/MergeV2Checkpoints/
ShardedFilename (every SavedModel's own saver uses them, with the path fed at run time) and
InitializeTableFromTextFile (reads vocabulary assets shipped with the model).
`savedmodel.unanalysable` HIGH: a malformed protobuf or anything else that could not be read.
"""

from __future__ import annotations

import json
import re

from registry.scanners import keras
from registry.scanners.base import Finding, ScanContext, ScanResult, Severity, Source
from registry.scanners.protowire import LEN, WireReader

PYTHON_OPS = frozenset({"PyFunc", "PyFuncStateless", "EagerPyFunc"})
FILE_WRITE_OPS = frozenset(
    {
        "WriteFile",
        "CreateSummaryFileWriter",
        "CreateSummaryDbWriter",
        "WriteSummary",
        "WriteRawProtoSummary",
        "WriteScalarSummary",
        "WriteHistogramSummary",
        "WriteImageSummary",
        "WriteAudioSummary",
        "WriteGraphSummary",
        "ImportEvent",
        "FlushSummaryWriter",
        "SaveDataset",
        "SaveDatasetV2",
        "DatasetToTFRecord",
        "ExperimentalDatasetToTFRecord",
        "SnapshotDataset",
        "SnapshotDatasetV2",
    }
)
FILE_READ_OPS = frozenset(
    {
        "ReadFile",
        "MatchingFiles",
        "MatchingFilesDataset",
        "ExperimentalMatchingFilesDataset",
        "ImmutableConst",
        "WholeFileReader",
        "WholeFileReaderV2",
        "TextLineReader",
        "TextLineReaderV2",
        "FixedLengthRecordReader",
        "FixedLengthRecordReaderV2",
        "TFRecordReader",
        "TFRecordReaderV2",
        "LMDBReader",
        "TextLineDataset",
        "TFRecordDataset",
        "TFRecordDatasetV2",
        "FixedLengthRecordDataset",
        "FixedLengthRecordDatasetV2",
        "CSVDataset",
        "CSVDatasetV2",
        "ExperimentalCSVDataset",
        "LMDBDataset",
        "ExperimentalLMDBDataset",
        "SqlDataset",
        "ExperimentalSqlDataset",
        "LoadDataset",
        "ExperimentalLoadDataset",
    }
)
NETWORK_OPS = frozenset(
    {
        "RpcServer",
        "RpcClient",
        "RpcCall",
        "RpcServerStart",
        "RpcServerRegister",
        "DataServiceDataset",
        "DataServiceDatasetV2",
        "DataServiceDatasetV3",
        "DataServiceDatasetV4",
        "GcsConfigureCredentials",
        "GcsConfigureBlockCache",
        "DebugIdentity",
        "DebugIdentityV2",
        "DebugIdentityV3",
        "DebugNanCount",
        "DebugNumericSummary",
        "DebugNumericSummaryV2",
    }
)
_NAMES = ("saved_model.pb", "saved_model.pbtxt", "keras_metadata.pb")
_PBTXT_OP = re.compile(rb'\bop\s*:\s*"([A-Za-z0-9_>.]+)"')
MAX_PBTXT = 256 << 20
MAX_METADATA = 64 << 20


def detect(head: bytes, name: str) -> bool:
    if name.rsplit("/", 1)[-1] in _NAMES:
        return True
    return _looks_like_saved_model(head)


def _looks_like_saved_model(head: bytes) -> bool:
    """SavedModel{schema_version=1 (08 01), meta_graphs (12 len) {meta_info_def (0a ...)}}."""
    if not head.startswith(b"\x08\x01\x12"):
        return False
    pos = 3
    while pos < min(len(head), 13) and head[pos] & 0x80:
        pos += 1
    return pos + 1 < len(head) and head[pos + 1] == 0x0A


def analyse(source: Source, *, name: str, ctx: ScanContext) -> ScanResult:
    basename = name.rsplit("/", 1)[-1]
    result = ScanResult()
    try:
        if basename == "keras_metadata.pb":
            result.formats.append("savedmodel.keras_metadata")
            result.findings.extend(_keras_metadata(WireReader(source), ctx))
        elif basename.endswith(".pbtxt"):
            result.formats.append("savedmodel.pbtxt")
            result.findings.extend(_pbtxt(source, ctx))
        else:
            result.formats.append("savedmodel")
            result.findings.extend(_Walker(WireReader(source), ctx).saved_model())
    except Exception as exc:
        result.findings.append(
            Finding(
                rule="savedmodel.unanalysable",
                severity=Severity.HIGH,
                message=f"SavedModel could not be analysed ({type(exc).__name__}: {exc}); "
                "re-export it with a current TensorFlow.",
                member=ctx.member,
            )
        )
    return result


def judge_op(op: str, *, node: str, offset: int | None, member: str) -> Finding | None:
    """The finding for one op by name (None for ordinary ops)."""
    if op in PYTHON_OPS:
        rule, severity, what = "savedmodel.python_op", Severity.CRITICAL, "runs Python code"
    elif op in FILE_WRITE_OPS:
        rule, severity, what = "savedmodel.file_write_op", Severity.CRITICAL, "writes files"
    elif op in FILE_READ_OPS:
        rule, severity, what = "savedmodel.file_read_op", Severity.HIGH, "reads the file system"
    elif op in NETWORK_OPS:
        rule, severity, what = "savedmodel.network_op", Severity.HIGH, "sends data out"
    else:
        return None
    return Finding(
        rule=rule,
        severity=severity,
        message=f"Op {op} (node {node!r}) {what} when the graph runs; a model graph should "
        "not contain it.",
        member=member,
        offset=offset,
        reference=op,
    )


class _Walker:
    def __init__(self, reader: WireReader, ctx: ScanContext) -> None:
        self.r = reader
        self.ctx = ctx
        self.findings: list[Finding] = []

    def _children(self, start: int, end: int, number: int) -> list[tuple[int, int]]:
        return [
            (f.offset, f.end)
            for f in self.r.fields(start, end)
            if f.number == number and f.wire_type == LEN
        ]

    def saved_model(self) -> list[Finding]:
        for mg_start, mg_end in self._children(0, self.r.size, 2):
            for field in self.r.fields(mg_start, mg_end):
                if field.wire_type != LEN:
                    continue
                if field.number == 2:
                    self.graph_def(field.offset, field.end)
                elif field.number == 7:
                    self.object_graph(field.offset, field.end)
        return self.findings

    def graph_def(self, start: int, end: int) -> None:
        for field in self.r.fields(start, end):
            if field.wire_type != LEN:
                continue
            if field.number == 1:
                self.node_def(field.offset, field.end)
            elif field.number == 2:  # FunctionDefLibrary.function[] -> FunctionDef.node_def[]
                for fn_start, fn_end in self._children(field.offset, field.end, 1):
                    for node_start, node_end in self._children(fn_start, fn_end, 3):
                        self.node_def(node_start, node_end)

    def node_def(self, start: int, end: int) -> None:
        name = op = ""
        output_stream = ""
        for field in self.r.fields(start, end):
            if field.wire_type != LEN:
                continue
            if field.number == 1:
                name = self.r.text(field, 4096)
            elif field.number == 2:
                op = self.r.text(field, 4096)
            elif field.number == 5:
                key, value = self._attr_string(field.offset, field.end)
                if key == "output_stream":
                    output_stream = value
        finding = judge_op(op, node=name, offset=start, member=self.ctx.member)
        if finding is None and op == "PrintV2" and output_stream.startswith("file://"):
            finding = Finding(
                rule="savedmodel.file_write_op",
                severity=Severity.CRITICAL,
                message=f"PrintV2 (node {name!r}) appends to {output_stream!r} when the graph "
                "runs; a model graph should not write files.",
                member=self.ctx.member,
                offset=start,
                reference=output_stream,
            )
        if finding is not None:
            self.findings.append(finding)

    def _attr_string(self, start: int, end: int) -> tuple[str, str]:
        """A NodeDef.attr map entry's key and, when the AttrValue is a string, its value."""
        key = value = ""
        for field in self.r.fields(start, end):
            if field.number == 1 and field.wire_type == LEN:
                key = self.r.text(field, 4096)
            elif field.number == 2 and field.wire_type == LEN and key == "output_stream":
                for inner in self.r.fields(field.offset, field.end):
                    if inner.number == 2 and inner.wire_type == LEN:
                        value = self.r.text(inner, 4096)
        return key, value

    def object_graph(self, start: int, end: int) -> None:
        """SavedObjectGraph.nodes[].user_object.metadata: Keras layer JSON (TF 2.0-2.4)."""
        for obj_start, obj_end in self._children(start, end, 1):
            for user_start, user_end in self._children(obj_start, obj_end, 4):
                for field in self.r.fields(user_start, user_end):
                    if field.number == 3 and field.wire_type == LEN and field.end > field.offset:
                        self.findings.extend(
                            _metadata_json(self.r, field.offset, field.end, self.ctx)
                        )


def _keras_metadata(reader: WireReader, ctx: ScanContext) -> list[Finding]:
    """keras_metadata.pb: SavedMetadata.nodes[] (SavedObject.metadata = 5, a JSON string)."""
    findings: list[Finding] = []
    for node in reader.fields(0, reader.size):
        if node.number != 1 or node.wire_type != LEN:
            continue
        for field in reader.fields(node.offset, node.end):
            if field.number == 5 and field.wire_type == LEN and field.end > field.offset:
                findings.extend(_metadata_json(reader, field.offset, field.end, ctx))
    return findings


def _metadata_json(reader: WireReader, start: int, end: int, ctx: ScanContext) -> list[Finding]:
    if end - start > MAX_METADATA:
        raise ValueError(f"Keras metadata of {end - start} bytes exceeds {MAX_METADATA}")
    findings = keras.walk_config(json.loads(reader.bytes(start, end)), member=ctx.member)
    return [Finding(f.rule, f.severity, f.message, f.member, start, f.reference) for f in findings]


def _pbtxt(source: Source, ctx: ScanContext) -> list[Finding]:
    if source.size > MAX_PBTXT:
        raise ValueError(f"text SavedModel of {source.size} bytes exceeds {MAX_PBTXT}")
    data = source.read(0, source.size)
    findings: list[Finding] = []
    for match in _PBTXT_OP.finditer(data):
        op = match.group(1).decode("ascii")
        finding = judge_op(op, node="", offset=match.start(), member=ctx.member)
        if finding is not None:
            findings.append(finding)
    if b'"file://' in data and b"PrintV2" in data:
        findings.append(
            Finding(
                rule="savedmodel.file_write_op",
                severity=Severity.CRITICAL,
                message="PrintV2 writes to a file:// stream when the graph runs.",
                member=ctx.member,
                offset=data.index(b'"file://'),
                reference="PrintV2",
            )
        )
    return findings
