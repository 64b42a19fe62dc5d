"""The malicious corpus, built opcode by opcode and byte by byte.

Nothing here pickles a live object: every sample is assembled from opcodes, so building the
corpus cannot run anything, and the payloads are harmless (`echo`) should a sample ever be
loaded by mistake.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass, field

from registry.scanners import Severity

STOP = b"."
MARK = b"("
TUPLE = b"t"
REDUCE = b"R"
POP = b"0"
DUP = b"2"
MEMOIZE = b"\x94"
STACK_GLOBAL = b"\x93"
EMPTY_TUPLE = b")"
EMPTY_DICT = b"}"
BUILD = b"b"


def proto(n: int = 2) -> bytes:
    return b"\x80" + bytes([n])


def glob(module: str, name: str) -> bytes:
    return b"c" + f"{module}\n{name}\n".encode()


def uni(text: str) -> bytes:
    data = text.encode()
    return b"X" + struct.pack("<I", len(data)) + data


def short_uni(text: str) -> bytes:
    data = text.encode()
    return b"\x8c" + bytes([len(data)]) + data


def binput(index: int) -> bytes:
    return b"q" + bytes([index])


def binget(index: int) -> bytes:
    return b"h" + bytes([index])


def call(module: str, name: str, *args: str, protocol: int = 2) -> bytes:
    """module.name(*args) as a whole pickle."""
    return (
        proto(protocol)
        + glob(module, name)
        + MARK
        + b"".join(uni(a) for a in args)
        + TUPLE
        + REDUCE
        + STOP
    )


def call_body(module: str, name: str, *args: str) -> bytes:
    return glob(module, name) + MARK + b"".join(uni(a) for a in args) + TUPLE + REDUCE


BENIGN_PICKLE = proto(2) + EMPTY_DICT + binput(0) + uni("k") + b"K\x01s" + STOP
ECHO = "echo scanned"

# -- pickles ----------------------------------------------------------------------------------

OS_SYSTEM = call("os", "system", ECHO)
POSIX_SYSTEM = call("posix", "system", ECHO)
SUBPROCESS_POPEN = (
    proto(2)
    + glob("subprocess", "Popen")
    + MARK
    + b"]"
    + uni("echo")
    + b"a"
    + TUPLE
    + REDUCE
    + STOP
)
BUILTINS_EVAL = call("builtins", "eval", "print('scanned')", protocol=3)
BUILTINS_EXEC = call("builtins", "exec", "print('scanned')", protocol=3)
PY2_BUILTIN_EVAL = call("__builtin__", "eval", "1+1", protocol=2)
# getattr(__import__('os'), 'system')('echo ...')
GETATTR_IMPORT_CHAIN = (
    proto(2)
    + glob("builtins", "getattr")
    + MARK
    + call_body("builtins", "__import__", "os")
    + uni("system")
    + TUPLE
    + REDUCE
    + MARK
    + uni(ECHO)
    + TUPLE
    + REDUCE
    + STOP
)
IMPORTLIB = (
    proto(2)
    + glob("builtins", "getattr")
    + MARK
    + call_body("importlib", "import_module", "os")
    + uni("system")
    + TUPLE
    + REDUCE
    + MARK
    + uni(ECHO)
    + TUPLE
    + REDUCE
    + STOP
)
RUNPY = call("runpy", "run_path", "/tmp/x.py")
PIP = proto(2) + glob("pip", "main") + MARK + b"]" + uni("--version") + b"a" + TUPLE + REDUCE + STOP
TIMEIT = call("timeit", "timeit", "print('scanned')")
# attrgetter('system')(os-module-from-a-collections-reexport): the classic denylist bypass
ATTRGETTER = (
    proto(2)
    + call_body("operator", "attrgetter", "system")
    + MARK
    + call_body("importlib", "import_module", "os")
    + TUPLE
    + REDUCE
    + MARK
    + uni(ECHO)
    + TUPLE
    + REDUCE
    + STOP
)
RESOLVE_NAME = (
    proto(2)
    + call_body("pkgutil", "resolve_name", "os:system")
    + MARK
    + uni(ECHO)
    + TUPLE
    + REDUCE
    + STOP
)
PARTIAL = (
    proto(2)
    + glob("functools", "partial")
    + MARK
    + glob("os", "system")
    + uni(ECHO)
    + TUPLE
    + REDUCE
    + EMPTY_TUPLE
    + REDUCE
    + STOP
)
# STACK_GLOBAL with both strings fetched back through the memo.
STACK_GLOBAL_MEMO = (
    proto(4)
    + short_uni("os")
    + MEMOIZE
    + short_uni("system")
    + MEMOIZE
    + POP
    + POP
    + binget(0)
    + binget(1)
    + STACK_GLOBAL
    + MARK
    + short_uni(ECHO)
    + TUPLE
    + REDUCE
    + STOP
)
# CPython numbers MEMOIZE by len(memo), not by how many MEMOIZEs came before: after a BINPUT 1,
# the first MEMOIZE overwrites index 1. A scanner that counts MEMOIZEs reads "collections" there.
MEMO_DESYNC = (
    proto(4)
    + short_uni("collections")
    + b"q\x01"  # BINPUT 1: memo = {1: "collections"}
    + POP
    + short_uni("os")
    + DUP
    + MEMOIZE  # len(memo) == 1: memo = {1: "os"}
    + POP
    + POP
    + binget(1)
    + short_uni("system")
    + STACK_GLOBAL
    + MARK
    + short_uni(ECHO)
    + TUPLE
    + REDUCE
    + STOP
)
DYNAMIC_STACK_GLOBAL = (
    proto(4)
    + glob("collections", "OrderedDict")
    + EMPTY_TUPLE
    + REDUCE
    + short_uni("system")
    + STACK_GLOBAL
    + STOP
)
INST = b"(S'" + ECHO.encode() + b"'\nios\nsystem\n."
OBJ = b"(cos\nsystem\nS'" + ECHO.encode() + b"'\no."
PROTOCOL0 = b"cos\nsystem\n(S'" + ECHO.encode() + b"'\ntR."
PROTOCOL1 = b"cposix\nsystem\n(X" + struct.pack("<I", len(ECHO)) + ECHO.encode() + b"tR."
SECOND_PICKLE = BENIGN_PICKLE + SUBPROCESS_POPEN
PREFIXED = b"NOT A PICKLE HEADER\x00\x01\x02" * 8 + OS_SYSTEM
TRUNCATED = proto(2) + call_body("os", "system", ECHO) + EMPTY_DICT + MARK + uni("k")
EXTENSION = proto(2) + b"\x82\x01" + EMPTY_TUPLE + REDUCE + STOP
DOTTED_REEXPORT = call("sklearn.datasets._base", "os.system", ECHO, protocol=4)
SKLEARN_REEXPORT = call("sklearn.datasets._openml", "GzipFile", "/tmp/x", "wb")
NOT_ALLOWED = call("collections", "UserString", "x")
UNKNOWN_OPCODE = proto(2) + b"\xff" + STOP
MEMO_MISS = proto(2) + binget(7) + STOP
UNDERFLOW = proto(2) + REDUCE + STOP
TRAILING = BENIGN_PICKLE + b"\x00\xffgarbage that is no pickle"
TORCH_LEGACY_MAGIC = proto(2) + b"\x8a\x0a" + (0x1950A86A20F9469CFC6C).to_bytes(10, "little") + STOP


def legacy_torch(object_pickle: bytes) -> bytes:
    return (
        TORCH_LEGACY_MAGIC
        + proto(2)
        + b"M\xe9\x03"
        + STOP
        + proto(2)
        + EMPTY_DICT
        + STOP
        + object_pickle
        + proto(2)
        + b"]"
        + STOP
        + b"\x00" * 64
    )


# -- zips -------------------------------------------------------------------------------------


@dataclass
class Member:
    name: str
    data: bytes
    method: int = 0
    local_name: str | None = None
    bad_crc: bool = False
    flags: int = 0
    declared_size: int | None = None
    compressed: bytes | None = None


def deflate(data: bytes) -> bytes:
    co = zlib.compressobj(9, zlib.DEFLATED, -15)
    return co.compress(data) + co.flush()


def zip_bytes(members: list[Member], prefix: bytes = b"") -> bytes:
    """A zip written byte by byte (offsets relative to the archive, as `cat a b` leaves them)."""
    body = bytearray()
    central = bytearray()
    for m in members:
        if m.compressed is not None:
            payload = m.compressed
        elif m.method == 8:
            payload = deflate(m.data)
        else:
            payload = m.data
        crc = zlib.crc32(m.data) ^ (0xDEADBEEF if m.bad_crc else 0)
        usize = len(m.data) if m.declared_size is None else m.declared_size
        local_name = (m.local_name or m.name).encode()
        offset = len(body)
        body += b"PK\x03\x04" + struct.pack(
            "<HHHHHIIIHH",
            20,
            m.flags,
            m.method,
            0,
            0x21,
            crc,
            len(payload),
            usize,
            len(local_name),
            0,
        )
        body += local_name + payload
        name = m.name.encode()
        central += b"PK\x01\x02" + struct.pack(
            "<HHHHHHIIIHHHHHII",
            20,
            20,
            m.flags,
            m.method,
            0,
            0x21,
            crc,
            len(payload),
            usize,
            len(name),
            0,
            0,
            0,
            0,
            0,
            offset,
        )
        central += name
    eocd = b"PK\x05\x06" + struct.pack(
        "<HHHHIIH", 0, 0, len(members), len(members), len(central), len(body), 0
    )
    return prefix + bytes(body) + bytes(central) + eocd


def torch_zip(data_pkl: bytes, *, tensor: bytes = b"\x00" * 64, **member_kw: object) -> bytes:
    pkl = Member("archive/data.pkl", data_pkl)
    for key, value in member_kw.items():
        setattr(pkl, key, value)
    return zip_bytes(
        [
            pkl,
            Member("archive/byteorder", b"little"),
            Member("archive/data/0", tensor),
            Member("archive/version", b"3\n"),
        ]
    )


def npy(descr: str, shape: tuple[int, ...], payload: bytes) -> bytes:
    header = f"{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape!r}, }}"
    header += " " * (63 - (10 + len(header)) % 64) + "\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode() + payload


# An object array whose pickle carries the payload (np.load(allow_pickle=True) runs it).
NPY_OBJECT = npy("|O", (1,), OS_SYSTEM)
NPZ_OBJECT = zip_bytes([Member("arr_0.npy", NPY_OBJECT, method=8)])


def _bomb_member() -> bytes:
    co = zlib.compressobj(9, zlib.DEFLATED, -15)
    chunk = b"\x00" * (1 << 20)
    return b"".join(co.compress(chunk) for _ in range(64)) + co.flush()


def zip_bomb(*, lie: bool) -> bytes:
    """64 MiB of zeros deflated to ~64 KiB; `lie` declares a plausible 2 MiB instead."""
    data = _bomb_member()
    return zip_bytes(
        [
            Member(
                "weights.bin",
                b"",
                method=8,
                compressed=data,
                declared_size=(2 << 20) if lie else (64 << 20),
            )
        ]
    )


@dataclass
class Sample:
    name: str  # pytest id
    data: bytes
    filename: str
    rule: str
    reference: str = ""
    severity: Severity = Severity.HIGH
    also: list[str] = field(default_factory=list)  # further rules that must be present


def malicious() -> list[Sample]:
    crit = Severity.CRITICAL
    dangerous = "pickle.global.dangerous"
    evil_pkl = OS_SYSTEM
    return [
        Sample("os.system", OS_SYSTEM, "model.pkl", dangerous, "os.system", crit),
        Sample("posix.system", POSIX_SYSTEM, "model.pkl", dangerous, "posix.system", crit),
        Sample("subprocess", SUBPROCESS_POPEN, "model.pt", dangerous, "subprocess.Popen", crit),
        Sample("eval", BUILTINS_EVAL, "model.pkl", dangerous, "builtins.eval", crit),
        Sample("exec", BUILTINS_EXEC, "model.pkl", dangerous, "builtins.exec", crit),
        Sample("py2-eval", PY2_BUILTIN_EVAL, "model.pkl", dangerous, "builtins.eval", crit),
        Sample(
            "getattr-import",
            GETATTR_IMPORT_CHAIN,
            "m.pkl",
            dangerous,
            "builtins.getattr",
            crit,
            also=["pickle.call.dynamic"],
        ),
        Sample("importlib", IMPORTLIB, "m.pkl", dangerous, "importlib.import_module", crit),
        Sample("runpy", RUNPY, "m.pkl", dangerous, "runpy.run_path", crit),
        Sample("pip", PIP, "m.pkl", dangerous, "pip.main", crit),
        Sample("timeit", TIMEIT, "m.pkl", dangerous, "timeit.timeit", crit),
        Sample("attrgetter", ATTRGETTER, "m.pkl", dangerous, "operator.attrgetter", crit),
        Sample(
            "resolve_name",
            RESOLVE_NAME,
            "m.pkl",
            dangerous,
            "pkgutil.resolve_name",
            crit,
            also=["pickle.call.dynamic"],
        ),
        Sample("partial", PARTIAL, "m.pkl", dangerous, "functools.partial", crit),
        Sample("stack-global-memo", STACK_GLOBAL_MEMO, "m.pkl", dangerous, "os.system", crit),
        Sample("memo-desync", MEMO_DESYNC, "m.pkl", dangerous, "os.system", crit),
        Sample("dynamic-stack-global", DYNAMIC_STACK_GLOBAL, "m.pkl", "pickle.global.dynamic"),
        Sample("inst", INST, "m.pkl", dangerous, "os.system", crit),
        Sample("obj", OBJ, "m.pkl", dangerous, "os.system", crit),
        Sample("protocol0", PROTOCOL0, "m.pkl", dangerous, "os.system", crit),
        Sample("protocol0-txt", PROTOCOL0, "notes.txt", dangerous, "os.system", crit),
        Sample("protocol1", PROTOCOL1, "weights", dangerous, "posix.system", crit),
        Sample("second-pickle", SECOND_PICKLE, "m.pkl", dangerous, "subprocess.Popen", crit),
        Sample(
            "prefixed",
            PREFIXED,
            "model.weights",
            dangerous,
            "os.system",
            crit,
            also=["pickle.embedded"],
        ),
        Sample(
            "truncated",
            TRUNCATED,
            "m.pkl",
            dangerous,
            "os.system",
            crit,
            also=["pickle.truncated"],
        ),
        Sample("extension", EXTENSION, "m.pkl", "pickle.extension"),
        Sample(
            "dotted-reexport",
            DOTTED_REEXPORT,
            "m.pkl",
            dangerous,
            "sklearn.datasets._base.os.system",
            crit,
        ),
        Sample(
            "sklearn-reexport",
            SKLEARN_REEXPORT,
            "m.joblib",
            "pickle.global.not_allowed",
            "sklearn.datasets._openml.GzipFile",
        ),
        Sample(
            "not-allowed",
            NOT_ALLOWED,
            "m.pkl",
            "pickle.global.not_allowed",
            "collections.UserString",
        ),
        Sample("unknown-opcode", UNKNOWN_OPCODE, "m.pkl", "pickle.opcode.unanalysable"),
        Sample("memo-miss", MEMO_MISS, "m.pkl", "pickle.memo.unanalysable"),
        Sample("underflow", UNDERFLOW, "m.pkl", "pickle.stack.unanalysable"),
        Sample("trailing", TRAILING, "m.pkl", "pickle.trailing"),
        Sample("legacy-torch", legacy_torch(OS_SYSTEM), "model.pt", dangerous, "os.system", crit),
        Sample("torch-zip", torch_zip(evil_pkl), "model.pt", dangerous, "os.system", crit),
        Sample(
            "torch-zip-bad-crc",
            torch_zip(evil_pkl, bad_crc=True),
            "model.pt",
            dangerous,
            "os.system",
            crit,
        ),
        Sample(
            "torch-zip-flag-bits",
            torch_zip(evil_pkl, flags=0x0008 | 0x0002 | 0x0800 | 0x4000),
            "model.pt",
            dangerous,
            "os.system",
            crit,
        ),
        Sample(
            "torch-zip-name-mismatch",
            torch_zip(evil_pkl, local_name="archive/other.pkl"),
            "model.pt",
            dangerous,
            "os.system",
            crit,
            also=["zip.name_mismatch"],
        ),
        Sample(
            # The central directory calls the pickle a tensor: the local name still says pickle.
            "torch-zip-hidden-as-tensor",
            zip_bytes(
                [
                    Member("archive/data.pkl", BENIGN_PICKLE),
                    Member("archive/data/0", evil_pkl, local_name="archive/data.pkl"),
                ]
            ),
            "model.pt",
            dangerous,
            "os.system",
            crit,
            also=["zip.name_mismatch"],
        ),
        Sample("torch-zip-as-txt", torch_zip(evil_pkl), "readme.txt", dangerous, "os.system", crit),
        Sample(
            "torch-zip-deflated",
            torch_zip(evil_pkl, method=8),
            "model.pt",
            dangerous,
            "os.system",
            crit,
        ),
        Sample(
            "zip-in-zip",
            zip_bytes([Member("inner.zip", torch_zip(evil_pkl)), Member("README", b"hi")]),
            "bundle.zip",
            dangerous,
            "os.system",
            crit,
        ),
        Sample(
            "pickle-zip-polyglot",
            zip_bytes([Member("archive/data.pkl", SUBPROCESS_POPEN)], prefix=OS_SYSTEM),
            "model.pkl",
            dangerous,
            "subprocess.Popen",
            crit,
            also=["zip.prefix"],
        ),
        Sample("npy-object", NPY_OBJECT, "a.npy", "numpy.object_array", also=[dangerous]),
        Sample("npz-object", NPZ_OBJECT, "a.npz", "numpy.object_array", also=[dangerous]),
        Sample("zip-bomb", zip_bomb(lie=False), "w.zip", "archive.bomb", severity=crit),
        Sample("zip-bomb-lying", zip_bomb(lie=True), "w.zip", "archive.bomb", severity=crit),
    ]
