"""Pickle analysis: walk the opcode stream with a model of the unpickler, never unpickle.

Why our own opcode pass rather than pickletools or picklescan/modelscan:
- `pickletools.genops` stops at the first malformed opcode and keeps no stack or memo, so it
  cannot tell which strings STACK_GLOBAL takes (through the memo, after DUP/MEMOIZE), and a
  payload placed before a deliberate break is invisible to anything that needs the whole stream.
- picklescan and modelscan judge globals against denylists and have published bypasses
  (pkgutil.resolve_name, operator.attrgetter, importlib, memo desynchronisation, broken pickles
  whose payload runs first). We model MARK/memo/stack as CPython's `_pickle` does and judge
  every callable against a per-format allowlist (allowlists.py).

Reading is incremental through a small buffered stream over a ranged Source (or a streaming
decompressor for compressed joblib files), so a pickle is never held whole in memory.
"""

from __future__ import annotations

import _compat_pickle
import codecs
import math
import re
import struct
from dataclasses import dataclass, field

from registry.scanners.allowlists import Allowlist, judge
from registry.scanners.base import Finding, Limits, ScanContext, Severity, Source

PROTO_START = re.compile(rb"\x80[\x02-\x05]")
TORCH_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_BIG = 1 << 20  # strings/bytes above this are skipped, not held (no module name is that long)
_MAX_LINE = 1 << 20
_MAX_ITEMS = 10_000  # container elements kept per list/dict; the rest are counted only
_IDENT = re.compile(r"[A-Za-z_][\w.]*\Z")


class Truncated(Exception):
    """The stream ended inside a pickle."""


class Malformed(Exception):
    """CPython's unpickler would fail here; `rule` says how."""

    def __init__(self, rule: str, message: str) -> None:
        super().__init__(message)
        self.rule = rule


class LimitExceeded(Exception):
    pass


# --------------------------------------------------------------------------------------------
# Streams


class ByteStream:
    """Sequential reads with a small buffer; subclasses supply the next chunk."""

    def __init__(self) -> None:
        self._buf = b""
        self._off = 0
        self.pos = 0  # bytes consumed

    def _fill(self) -> bytes:
        raise NotImplementedError

    def _ensure(self) -> bool:
        if self._off >= len(self._buf):
            self._buf = self._fill()
            self._off = 0
        return self._off < len(self._buf)

    def read(self, n: int) -> bytes:
        parts: list[bytes] = []
        while n > 0 and self._ensure():
            piece = self._buf[self._off : self._off + n]
            self._off += len(piece)
            n -= len(piece)
            parts.append(piece)
        data = b"".join(parts)
        self.pos += len(data)
        return data

    def skip(self, n: int) -> int:
        skipped = 0
        while n > 0 and self._ensure():
            take = min(n, len(self._buf) - self._off)
            self._off += take
            n -= take
            skipped += take
        self.pos += skipped
        return skipped

    def at_end(self) -> bool:
        return not self._ensure()

    def readline(self, limit: int = _MAX_LINE) -> bytes:
        """Up to and including b"\\n"; Truncated if the stream ends first."""
        parts: list[bytes] = []
        total = 0
        while True:
            if not self._ensure():
                self.pos += total
                raise Truncated("stream ended inside a text line")
            index = self._buf.find(b"\n", self._off)
            end = len(self._buf) if index < 0 else index + 1
            parts.append(self._buf[self._off : end])
            total += end - self._off
            self._off = end
            if index >= 0:
                self.pos += total
                return b"".join(parts)
            if total > limit:
                self.pos += total
                raise Malformed("pickle.limit", f"text line longer than {limit} bytes")


class SourceStream(ByteStream):
    """Ranged reads from a Source, growing chunks (4 KiB up to 1 MiB): a probe that fails after
    a few opcodes reads little, a long pickle reads in few requests."""

    def __init__(self, source: Source, start: int, end: int | None = None) -> None:
        super().__init__()
        self.source = source
        self.start = start
        self.end = source.size if end is None else min(end, source.size)
        self._next = start
        self._chunk = 4096
        self.pos = start

    def _fill(self) -> bytes:
        if self._next >= self.end:
            return b""
        data = self.source.read(self._next, min(self._next + self._chunk, self.end))
        self._next += len(data)
        self._chunk = min(self._chunk * 2, 1 << 20)
        return data

    def skip(self, n: int) -> int:
        avail = len(self._buf) - self._off
        if n <= avail:
            self._off += n
            self.pos += n
            return n
        self._buf, self._off = b"", 0
        target = min(self._next + (n - avail), self.end)
        skipped = avail + (target - self._next)
        self._next = target
        self.pos += skipped
        return skipped


# --------------------------------------------------------------------------------------------
# The value model: what the stack holds, as far as it can be known statically.


@dataclass(frozen=True)
class Ref:
    """A global (class or function) resolved by GLOBAL, STACK_GLOBAL or INST."""

    module: str
    name: str

    @property
    def full(self) -> str:
        return f"{self.module}.{self.name}"


@dataclass
class Call:
    """What calling `func` with `args` made (REDUCE, NEWOBJ, OBJ, INST), then BUILD's state."""

    func: object
    args: object
    state: object = None


@dataclass(frozen=True)
class Unknown:
    """A value the model does not keep (large bytes, sets, persistent objects...)."""

    what: str


@dataclass
class DictV:
    pairs: list[tuple[object, object]] = field(default_factory=list)

    def get(self, key: str) -> object:
        for k, v in self.pairs:
            if k == key:
                return v
        return None


def describe(value: object) -> str:
    if isinstance(value, Ref):
        return value.full
    if isinstance(value, Call):
        return f"result of calling {describe(value.func)}"
    if isinstance(value, Unknown):
        return value.what
    if isinstance(value, str | bytes | int | float | bool) or value is None:
        return repr(value)[:80]
    return type(value).__name__


# --------------------------------------------------------------------------------------------


@dataclass
class Walk:
    findings: list[Finding]
    start: int
    end: int
    stopped: bool  # reached STOP
    broken: bool  # ended on an error (truncated, malformed, limit)
    refs: int  # globals referenced
    critical: bool  # referenced something known to run code
    value: object = None
    joblib: bool = False


class PickleWalker:
    """One pickle, from the current stream position to its STOP (or the first error)."""

    def __init__(
        self, stream: ByteStream, *, allow: Allowlist, ctx: ScanContext, label: str = ""
    ) -> None:
        self.stream = stream
        self.allow = allow
        self.ctx = ctx
        self.limits: Limits = ctx.limits
        self.label = label
        self.stack: list[object] = []
        self.metastack: list[list[object]] = []
        self.memo: dict[int, object] = {}
        self.proto = 0
        self.findings: list[Finding] = []
        self._seen: set[tuple[str, str]] = set()
        self.refs = 0
        self.critical = False
        self.joblib = False
        self.start = stream.pos

    # -- reporting -----------------------------------------------------------------------------

    def report(
        self, rule: str, severity: Severity, message: str, offset: int, reference: str = ""
    ) -> None:
        if (rule, reference) in self._seen:
            return
        self._seen.add((rule, reference))
        if self.label:
            message = f"{message} ({self.label})"
        self.findings.append(Finding(rule, severity, message, self.ctx.member, offset, reference))

    # -- stack ---------------------------------------------------------------------------------

    def pop(self) -> object:
        if not self.stack:
            raise Malformed("pickle.stack.unanalysable", "stack underflow")
        return self.stack.pop()

    def top(self) -> object:
        if not self.stack:
            raise Malformed("pickle.stack.unanalysable", "stack underflow")
        return self.stack[-1]

    def pop_mark(self) -> list[object]:
        if not self.metastack:
            raise Malformed(
                "pickle.stack.unanalysable", "MARK expected but the mark stack is empty"
            )
        items = self.stack
        self.stack = self.metastack.pop()
        return items

    # -- reading -------------------------------------------------------------------------------

    def exact(self, n: int) -> bytes:
        data = self.stream.read(n)
        if len(data) < n:
            raise Truncated(f"needed {n} bytes, got {len(data)}")
        return data

    def data(self, n: int, kind: str) -> bytes | Unknown:
        if n < 0:
            raise Malformed("pickle.stack.unanalysable", f"negative {kind} length")
        if n > _BIG:
            if self.stream.pos + n - self.start > self.limits.max_pickle:
                raise LimitExceeded(f"a {n}-byte {kind} exceeds the pickle limit")
            if self.stream.skip(n) < n:
                raise Truncated(f"{kind} of {n} bytes cut short")
            return Unknown(f"{n}-byte {kind}")
        return self.exact(n)

    def text(self, n: int) -> str | Unknown:
        raw = self.data(n, "string")
        if isinstance(raw, Unknown):
            return raw
        return raw.decode("utf-8", "surrogatepass")

    def line(self) -> bytes:
        return self.stream.readline()[:-1]

    def uint(self, n: int) -> int:
        return int.from_bytes(self.exact(n), "little")

    # -- semantics -----------------------------------------------------------------------------

    def global_ref(self, module: str, name: str, offset: int) -> Ref:
        if self.proto < 3:  # CPython's fix_imports maps Python 2 names before importing
            if (module, name) in _compat_pickle.NAME_MAPPING:
                module, name = _compat_pickle.NAME_MAPPING[(module, name)]
            elif module in _compat_pickle.IMPORT_MAPPING:
                module = _compat_pickle.IMPORT_MAPPING[module]
        self.refs += 1
        severity = judge(module, name, self.allow)
        ref = Ref(module, name)
        if ref.full == "joblib.numpy_pickle.NumpyArrayWrapper":
            self.joblib = True
        if severity is Severity.CRITICAL:
            self.critical = True
            self.report(
                "pickle.global.dangerous",
                severity,
                f"references {ref.full}, which can run code when the file is loaded",
                offset,
                ref.full,
            )
        elif severity is not None:
            self.report(
                "pickle.global.not_allowed",
                severity,
                f"references {ref.full}, which is not on the {self.allow.name} allowlist",
                offset,
                ref.full,
            )
        return ref

    def call(self, func: object, args: object, offset: int, how: str) -> Call:
        if not isinstance(func, Ref):
            self.report(
                "pickle.call.dynamic",
                Severity.HIGH,
                f"{how} calls {describe(func)}, not a named global",
                offset,
                describe(func),
            )
        return Call(func, args)

    def persistent(self, pid: object, offset: int) -> Unknown:
        if not self.allow.persistent_ids:
            self.report(
                "pickle.persistent_id",
                Severity.MEDIUM,
                "uses a persistent id, which only a custom loader resolves",
                offset,
                describe(pid),
            )
        return Unknown("persistent object")

    def build(self, inst: object, state: object, offset: int) -> None:
        if isinstance(inst, Ref):
            self.report(
                "pickle.build.global",
                Severity.HIGH,
                f"BUILD sets attributes on {inst.full} itself, not on an instance",
                offset,
                inst.full,
            )
        elif isinstance(inst, Call):
            inst.state = state
            if isinstance(inst.func, Ref) and inst.func.full.endswith(
                "numpy_pickle.NumpyArrayWrapper"
            ):
                self.joblib_array(inst, state, offset)

    def joblib_array(self, wrapper: Call, state: object, offset: int) -> None:
        """joblib writes each array's bytes inline right after its wrapper's BUILD (or a nested
        pickle for object arrays): step over them as joblib's NumpyUnpickler.load_build does."""
        # joblib replaces the wrapper on the stack with the array it reads.
        self.stack[-1] = Unknown("joblib array")
        if not isinstance(state, DictV):
            raise Malformed("joblib.array.unanalysable", "array wrapper without a state dict")
        shape = state.get("shape")
        info = numpy_dtype(state.get("dtype"))
        if not isinstance(shape, tuple) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
        ):
            raise Malformed("joblib.array.unanalysable", f"array shape {describe(shape)}")
        if info is None:
            raise Malformed("joblib.array.unanalysable", "array dtype not statically known")
        itemsize, hasobject = info
        if hasobject:
            self.report(
                "numpy.object_array",
                Severity.HIGH,
                "a joblib array of Python objects (a nested pickle)",
                offset,
            )
            nested = PickleWalker(self.stream, allow=self.allow, ctx=self.ctx, label="nested")
            walk = nested.run()
            self.findings.extend(walk.findings)
            self.refs += walk.refs
            self.critical |= walk.critical
            if not walk.stopped:
                raise Malformed("pickle.nested.unanalysable", "nested object-array pickle broken")
            return
        alignment = state.get("numpy_array_alignment_bytes")
        if alignment is not None:
            padding = self.exact(1)[0]
            self.exact(padding)
        size = math.prod(shape) * itemsize
        if self.stream.pos + size - self.start > self.limits.max_pickle:
            raise LimitExceeded(f"inline array of {size} bytes exceeds the pickle limit")
        if self.stream.skip(size) < size:
            raise Truncated("joblib array data cut short")

    # -- the loop ------------------------------------------------------------------------------

    def run(self) -> Walk:
        stopped = broken = False
        value: object = None
        offset = self.stream.pos
        try:
            while True:
                offset = self.stream.pos
                if offset - self.start > self.limits.max_pickle:
                    raise LimitExceeded(f"pickle longer than {self.limits.max_pickle} bytes")
                op = self.stream.read(1)
                if not op:
                    raise Truncated("stream ended before STOP")
                if op == b".":
                    value = self.pop()
                    stopped = True
                    break
                self.step(op[0], offset)
        except Truncated as exc:
            broken = True
            self.report("pickle.truncated", Severity.HIGH, f"pickle is truncated: {exc}", offset)
        except Malformed as exc:
            broken = True
            self.report(exc.rule, Severity.HIGH, f"malformed pickle: {exc}", offset)
        except LimitExceeded as exc:
            broken = True
            self.report("pickle.limit", Severity.HIGH, str(exc), offset)
        except UnicodeDecodeError:
            broken = True  # CPython fails on the same bytes
            self.report(
                "pickle.string.unanalysable", Severity.HIGH, "string is not valid text", offset
            )
        except Exception as exc:  # the walker must never raise: anything else is a finding
            broken = True
            self.report(
                "scan.error", Severity.HIGH, f"pickle analysis failed: {type(exc).__name__}", offset
            )
        return Walk(
            self.findings,
            self.start,
            self.stream.pos,
            stopped,
            broken,
            self.refs,
            self.critical,
            value,
            self.joblib,
        )

    def step(self, op: int, offset: int) -> None:
        if op == 0x28:  # ( MARK
            self.metastack.append(self.stack)
            self.stack = []
        elif op == 0x30:  # 0 POP (pops the mark when the current stack is empty, as CPython)
            if self.stack:
                self.stack.pop()
            else:
                self.pop_mark()
        elif op == 0x31:  # 1 POP_MARK
            self.pop_mark()
        elif op == 0x32:  # 2 DUP
            self.stack.append(self.top())
        elif op == 0x46:  # F FLOAT
            self.stack.append(_float(self.line(), "FLOAT"))
        elif op == 0x49:  # I INT
            raw = self.line()
            self.stack.append(True if raw == b"01" else False if raw == b"00" else _int(raw, "INT"))
        elif op == 0x4A:  # J BININT
            self.stack.append(struct.unpack("<i", self.exact(4))[0])
        elif op == 0x4B:  # K BININT1
            self.stack.append(self.uint(1))
        elif op == 0x4C:  # L LONG
            self.stack.append(_int(self.line().rstrip(b"L"), "LONG"))
        elif op == 0x4D:  # M BININT2
            self.stack.append(self.uint(2))
        elif op == 0x4E:  # N NONE
            self.stack.append(None)
        elif op == 0x50:  # P PERSID
            self.stack.append(self.persistent(self.line().decode("ascii", "replace"), offset))
        elif op == 0x51:  # Q BINPERSID
            self.stack.append(self.persistent(self.pop(), offset))
        elif op == 0x52:  # R REDUCE
            args = self.pop()
            self.stack.append(self.call(self.pop(), args, offset, "REDUCE"))
        elif op == 0x53:  # S STRING
            self.stack.append(_py2_string(self.line()))
        elif op == 0x54:  # T BINSTRING
            blob = self.data(struct.unpack("<i", self.exact(4))[0], "string")
            self.stack.append(blob.decode("latin-1") if isinstance(blob, bytes) else blob)
        elif op == 0x55:  # U SHORT_BINSTRING
            self.stack.append(self.exact(self.uint(1)).decode("latin-1"))
        elif op == 0x56:  # V UNICODE
            self.stack.append(self.line().decode("raw-unicode-escape"))
        elif op == 0x58:  # X BINUNICODE
            self.stack.append(self.text(self.uint(4)))
        elif op == 0x61:  # a APPEND
            item = self.pop()
            _extend(self.top(), [item])
        elif op == 0x62:  # b BUILD
            state = self.pop()
            self.build(self.top(), state, offset)
        elif op == 0x63:  # c GLOBAL
            module = self.line().decode("utf-8")
            name = self.line().decode("utf-8")
            self.stack.append(self.global_ref(module, name, offset))
        elif op == 0x64:  # d DICT
            made: object = _dict(self.pop_mark())
            self.stack.append(made)
        elif op == 0x7D:  # } EMPTY_DICT
            self.stack.append(DictV())
        elif op == 0x65:  # e APPENDS
            items = self.pop_mark()
            _extend(self.top(), items)
        elif op == 0x67:  # g GET
            self.stack.append(self.memo_get(_int(self.line(), "GET")))
        elif op == 0x68:  # h BINGET
            self.stack.append(self.memo_get(self.uint(1)))
        elif op == 0x6A:  # j LONG_BINGET
            self.stack.append(self.memo_get(self.uint(4)))
        elif op == 0x69:  # i INST
            module = self.line().decode("ascii")
            name = self.line().decode("ascii")
            ref = self.global_ref(module, name, offset)
            args = tuple(self.pop_mark())
            self.stack.append(self.call(ref, args, offset, "INST"))
        elif op == 0x6C:  # l LIST
            made = self.pop_mark()[:_MAX_ITEMS]
            self.stack.append(made)
        elif op == 0x5D:  # ] EMPTY_LIST
            self.stack.append([])
        elif op == 0x6F:  # o OBJ
            items = self.pop_mark()
            if not items:
                raise Malformed("pickle.stack.unanalysable", "OBJ without a class")
            self.stack.append(self.call(items[0], tuple(items[1:]), offset, "OBJ"))
        elif op == 0x70:  # p PUT
            self.memo_put(_int(self.line(), "PUT"))
        elif op == 0x71:  # q BINPUT
            self.memo_put(self.uint(1))
        elif op == 0x72:  # r LONG_BINPUT
            self.memo_put(self.uint(4))
        elif op == 0x73:  # s SETITEM
            value = self.pop()
            key = self.pop()
            _setitems(self.top(), [key, value])
        elif op == 0x74:  # t TUPLE
            made = tuple(self.pop_mark())
            self.stack.append(made)
        elif op == 0x29:  # ) EMPTY_TUPLE
            self.stack.append(())
        elif op == 0x75:  # u SETITEMS
            items = self.pop_mark()
            _setitems(self.top(), items)
        elif op == 0x47:  # G BINFLOAT
            self.stack.append(struct.unpack(">d", self.exact(8))[0])
        elif op == 0x80:  # PROTO
            self.proto = self.uint(1)
            if self.proto > 5:
                raise Malformed("pickle.opcode.unanalysable", f"unsupported protocol {self.proto}")
        elif op == 0x81:  # NEWOBJ
            args = self.pop()
            self.stack.append(self.call(self.pop(), args, offset, "NEWOBJ"))
        elif op in (0x82, 0x83, 0x84):  # EXT1, EXT2, EXT4
            code = self.uint({0x82: 1, 0x83: 2, 0x84: 4}[op])
            self.refs += 1
            self.report(
                "pickle.extension",
                Severity.HIGH,
                f"refers to copyreg extension code {code}: a callable chosen by the loader's "
                "registry, not by the file",
                offset,
                f"copyreg extension {code}",
            )
            self.stack.append(Unknown(f"extension {code}"))
        elif op in (0x85, 0x86, 0x87):  # TUPLE1-3
            n = op - 0x84
            if len(self.stack) < n:
                raise Malformed("pickle.stack.unanalysable", "stack underflow")
            items = self.stack[-n:]
            del self.stack[-n:]
            self.stack.append(tuple(items))
        elif op == 0x88:
            self.stack.append(True)
        elif op == 0x89:
            self.stack.append(False)
        elif op == 0x8A:  # LONG1
            self.stack.append(int.from_bytes(self.exact(self.uint(1)), "little", signed=True))
        elif op == 0x8B:  # LONG4
            blob = self.data(struct.unpack("<i", self.exact(4))[0], "long")
            self.stack.append(
                int.from_bytes(blob, "little", signed=True) if isinstance(blob, bytes) else blob
            )
        elif op == 0x42:  # B BINBYTES
            self.stack.append(self.data(self.uint(4), "bytes"))
        elif op == 0x43:  # C SHORT_BINBYTES
            self.stack.append(self.exact(self.uint(1)))
        elif op == 0x8C:  # SHORT_BINUNICODE
            self.stack.append(self.text(self.uint(1)))
        elif op == 0x8D:  # BINUNICODE8
            self.stack.append(self.text(self.uint(8)))
        elif op in (0x8E, 0x96):  # BINBYTES8, BYTEARRAY8
            self.stack.append(self.data(self.uint(8), "bytes"))
        elif op == 0x8F:  # EMPTY_SET
            self.stack.append(Unknown("set"))
        elif op == 0x90:  # ADDITEMS
            self.pop_mark()
            self.top()
        elif op == 0x91:  # FROZENSET
            self.pop_mark()
            self.stack.append(Unknown("frozenset"))
        elif op == 0x92:  # NEWOBJ_EX
            kwargs = self.pop()
            args = self.pop()
            self.stack.append(self.call(self.pop(), (args, kwargs), offset, "NEWOBJ_EX"))
        elif op == 0x93:  # STACK_GLOBAL
            name_v = self.pop()
            module_v = self.pop()
            if isinstance(module_v, str) and isinstance(name_v, str):
                self.stack.append(self.global_ref(module_v, name_v, offset))
            else:
                self.refs += 1
                reference = f"{describe(module_v)}.{describe(name_v)}"
                self.report(
                    "pickle.global.dynamic",
                    Severity.HIGH,
                    "STACK_GLOBAL takes a module or name that is not a literal string",
                    offset,
                    reference,
                )
                self.stack.append(Unknown(f"global {reference}"))
        elif op == 0x94:  # MEMOIZE: CPython indexes by the number of memo entries
            self.memo[len(self.memo)] = self.top()
        elif op == 0x95:  # FRAME: framing only groups the opcodes that follow
            self.exact(8)
        elif op == 0x97:  # NEXT_BUFFER
            self.report(
                "pickle.buffer",
                Severity.MEDIUM,
                "uses an out-of-band buffer that the file does not contain",
                offset,
            )
            self.stack.append(Unknown("out-of-band buffer"))
        elif op == 0x98:  # READONLY_BUFFER
            self.top()
        else:
            raise Malformed("pickle.opcode.unanalysable", f"unknown opcode 0x{op:02x}")

    def memo_get(self, index: int) -> object:
        if index not in self.memo:
            raise Malformed("pickle.memo.unanalysable", f"memo has no entry {index}")
        return self.memo[index]

    def memo_put(self, index: int) -> None:
        if index < 0:
            raise Malformed("pickle.memo.unanalysable", "negative PUT index")
        self.memo[index] = self.top()


def _int(raw: bytes, opcode: str) -> int:
    try:
        return int(raw.decode("ascii"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise Malformed("pickle.stack.unanalysable", f"bad {opcode} argument") from exc


def _float(raw: bytes, opcode: str) -> float:
    try:
        return float(raw.decode("ascii"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise Malformed("pickle.stack.unanalysable", f"bad {opcode} argument") from exc


def _py2_string(raw: bytes) -> str:
    if len(raw) < 2 or raw[0] != raw[-1] or raw[:1] not in (b"'", b'"'):
        raise Malformed("pickle.stack.unanalysable", "STRING argument must be quoted")
    try:
        return codecs.escape_decode(raw[1:-1])[0].decode("latin-1")
    except ValueError as exc:
        raise Malformed("pickle.stack.unanalysable", "bad STRING escape") from exc


def _extend(target: object, items: list[object]) -> None:
    if isinstance(target, list):
        target.extend(items[: max(0, _MAX_ITEMS - len(target))])


def _setitems(target: object, items: list[object]) -> None:
    if len(items) % 2:
        raise Malformed("pickle.stack.unanalysable", "odd number of items for SETITEMS")
    if isinstance(target, DictV):
        room = max(0, _MAX_ITEMS - len(target.pairs))
        target.pairs.extend(list(zip(items[::2], items[1::2], strict=True))[:room])


def _dict(items: list[object]) -> DictV:
    result = DictV()
    _setitems(result, items)
    return result


_DTYPE = re.compile(r"[<>|=]?([a-zA-Z?])(\d*)\Z")
_ITEMSIZE = {"?": 1, "b": 1, "B": 1, "h": 2, "H": 2, "e": 2, "l": 8, "L": 8, "q": 8, "Q": 8}


def numpy_dtype(value: object) -> tuple[int, bool] | None:
    """(itemsize, hasobject) of a pickled numpy.dtype('f8', ...) or a dtype string."""
    if isinstance(value, Call) and isinstance(value.args, tuple) and value.args:
        value = value.args[0]
    if not isinstance(value, str):
        return None
    match = _DTYPE.match(value)
    if not match:
        return None
    kind, digits = match.group(1), match.group(2)
    if kind == "O":
        return 8, True
    if digits:
        return (int(digits) * 4 if kind == "U" else int(digits)), False
    if kind in _ITEMSIZE:
        return _ITEMSIZE[kind], False
    return None


def is_pickle_start(head: bytes) -> bool:
    return len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5


# --------------------------------------------------------------------------------------------
# Files and regions that hold pickles


@dataclass
class PickleScan:
    findings: list[Finding] = field(default_factory=list)
    formats: list[str] = field(default_factory=list)


def walk_one(
    source: Source, start: int, end: int, *, allow: Allowlist, ctx: ScanContext, label: str = ""
) -> Walk:
    return PickleWalker(SourceStream(source, start, end), allow=allow, ctx=ctx, label=label).run()


def scan_pickles(
    source: Source,
    *,
    allow: Allowlist,
    ctx: ScanContext,
    start: int = 0,
    end: int | None = None,
) -> PickleScan:
    """Every pickle from `start`: the first, and each one that follows its STOP. Bytes after a
    STOP that are not another pickle are a finding (and are searched for embedded pickles)."""
    end = source.size if end is None else end
    out = PickleScan(formats=["pickle"])
    first = walk_one(source, start, end, allow=allow, ctx=ctx)
    out.findings.extend(first.findings)
    if first.joblib:
        out.formats.append("joblib")
    if not first.stopped:
        return out
    pos = first.end
    if first.value == TORCH_LEGACY_MAGIC:
        # torch's legacy format: magic, protocol, sys info, the object, storage keys; then the
        # raw storages, which torch reads without unpickling.
        out.formats.append("pytorch-legacy")
        from registry.scanners.allowlists import TORCH_ALLOW

        for index in range(4):
            walk = walk_one(
                source, pos, end, allow=TORCH_ALLOW, ctx=ctx, label=f"pickle {index + 2}"
            )
            out.findings.extend(walk.findings)
            if not walk.stopped:
                return out
            pos = walk.end
        return out
    count = 1
    while pos < end:
        walk = walk_one(source, pos, end, allow=allow, ctx=ctx, label=f"pickle {count + 1}")
        if walk.stopped or walk.refs:
            out.findings.extend(walk.findings)
            count += 1
            if not walk.stopped:
                return out
            pos = walk.end
            continue
        out.findings.append(
            Finding(
                "pickle.trailing",
                Severity.HIGH,
                f"{end - pos} bytes after STOP that are not a pickle",
                ctx.member,
                pos,
            )
        )
        stop = min(end, pos + ctx.limits.max_unknown)
        out.findings.extend(scan_embedded(source, pos, stop, allow=allow, ctx=ctx).findings)
        break
    return out


def scan_embedded(
    source: Source, start: int, end: int, *, allow: Allowlist, ctx: ScanContext
) -> PickleScan:
    """Pickles hidden inside other bytes: each PROTO 2-5 opcode is tried; one that references a
    global or reaches STOP is reported. Random bytes that merely contain b"\\x80\\x02" fail
    within a few opcodes and are dropped (they cannot import anything)."""
    out = PickleScan()
    pos = start
    chunk = 1 << 20
    while pos < end:
        window = source.read(pos, min(end, pos + chunk + 1))
        if len(window) < 2:
            break
        skip_to = pos
        for match in PROTO_START.finditer(window):
            at = pos + match.start()
            if at < skip_to or at >= end:
                continue
            walk = walk_one(source, at, source.size, allow=allow, ctx=ctx)
            if walk.refs or (walk.stopped and walk.end - at > 4):
                out.findings.append(
                    Finding(
                        "pickle.embedded",
                        Severity.MEDIUM,
                        "a pickle embedded after other bytes",
                        ctx.member,
                        at,
                    )
                )
                out.findings.extend(walk.findings)
                if "pickle" not in out.formats:
                    out.formats.append("pickle")
                skip_to = walk.end
        pos = max(pos + chunk, skip_to)
    return out
