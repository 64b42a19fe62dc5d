"""What a pickle may reference, per format: deny by default, allow what the real savers emit.

An allowlist, not a denylist: published scanner bypasses all reach a callable the denylist did
not name (`pkgutil.resolve_name`, `operator.attrgetter`, a re-export under another module).
Anything not listed here is a HIGH finding; `DANGEROUS` only raises a few to CRITICAL so that an
operator sees at a glance which files are attacks rather than merely unusual.

The lists were checked against files written by torch 2.13, numpy 2.4, scikit-learn 1.9 and
joblib 1.6 (tests/registry/scanners/fixtures/make_fixtures.py).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from registry.scanners.base import Severity

# Plain data that protocol 0-2 pickles need globals for (sets, bytes, complex numbers) and the
# copyreg helpers that only call a class which is itself a separately judged global.
PLAIN_DATA = frozenset(
    {
        "builtins.set",
        "builtins.frozenset",
        "builtins.bytearray",
        "builtins.bytes",
        "builtins.complex",
        "builtins.slice",
        "builtins.range",
        "builtins.object",
        "builtins.int",
        "builtins.float",
        "builtins.str",
        "builtins.bool",
        "builtins.list",
        "builtins.dict",
        "builtins.tuple",
        "_codecs.encode",
        "copyreg._reconstructor",
        "copyreg.__newobj__",
        "copyreg.__newobj_ex__",
        "collections.OrderedDict",
        "collections.Counter",
        "collections.defaultdict",
        "collections.deque",
        "datetime.datetime",
        "datetime.date",
        "datetime.time",
        "datetime.timedelta",
        "datetime.timezone",
        "decimal.Decimal",
        "fractions.Fraction",
    }
)

_TORCH_DTYPES = [
    "float32",
    "float",
    "float64",
    "double",
    "float16",
    "half",
    "bfloat16",
    "complex32",
    "chalf",
    "complex64",
    "cfloat",
    "complex128",
    "cdouble",
    "uint8",
    "uint16",
    "uint32",
    "uint64",
    "int8",
    "int16",
    "short",
    "int32",
    "int",
    "int64",
    "long",
    "bool",
    "qint8",
    "quint8",
    "qint32",
    "quint4x2",
    "quint2x4",
    "float8_e4m3fn",
    "float8_e5m2",
    "float8_e4m3fnuz",
    "float8_e5m2fnuz",
]
_TORCH_STORAGES = [
    "FloatStorage",
    "DoubleStorage",
    "HalfStorage",
    "BFloat16Storage",
    "LongStorage",
    "IntStorage",
    "ShortStorage",
    "CharStorage",
    "ByteStorage",
    "BoolStorage",
    "ComplexFloatStorage",
    "ComplexDoubleStorage",
    "QInt8Storage",
    "QUInt8Storage",
    "QInt32Storage",
    "QUInt4x2Storage",
    "QUInt2x4Storage",
    "UntypedStorage",
]

# What torch's own `weights_only=True` unpickler admits for state dicts (torch/_weights_only_
# unpickler.py), minus what only full-module pickles need.
TORCH = PLAIN_DATA | frozenset(
    {
        "torch._utils._rebuild_tensor",
        "torch._utils._rebuild_tensor_v2",
        "torch._utils._rebuild_tensor_v3",
        "torch._utils._rebuild_parameter",
        "torch._utils._rebuild_parameter_with_state",
        "torch._utils._rebuild_sparse_tensor",
        "torch._utils._rebuild_meta_tensor_no_storage",
        "torch._utils._rebuild_nested_tensor",
        "torch._utils._rebuild_qtensor",
        "torch._utils._rebuild_device_tensor_from_numpy",
        "torch._tensor._rebuild_from_type_v2",
        "torch.nn.parameter.Parameter",
        "torch.Tensor",
        "torch.Size",
        "torch.device",
        "torch.serialization._get_layout",
        "torch.storage.TypedStorage",
        "torch.storage.UntypedStorage",
        "torch.strided",
        "torch.sparse_coo",
        "torch.sparse_csr",
        "torch.sparse_csc",
        "torch.sparse_bsr",
        "torch.sparse_bsc",
        "torch.contiguous_format",
        "torch.channels_last",
        "torch.channels_last_3d",
        "torch.preserve_format",
        "torch.per_tensor_affine",
        "torch.per_channel_affine",
        "torch.per_channel_affine_float_qparams",
    }
    | {f"torch.{name}" for name in _TORCH_DTYPES}
    | {f"torch.{name}" for name in _TORCH_STORAGES}
)

# ndarray pickles (np.save of object arrays, arrays inside joblib or plain pickles). numpy 2
# moved numpy.core to numpy._core; files from either are in the wild.
NUMPY = PLAIN_DATA | frozenset(
    {
        f"numpy.{core}.multiarray.{name}"
        for core in ("core", "_core")
        for name in ("_reconstruct", "scalar")
    }
    | {
        "numpy.ndarray",
        "numpy.dtype",
        "numpy.ma.core._mareconstruct",
        "numpy.ma.core.MaskedArray",
        "numpy.random._pickle.__randomstate_ctor",
        "numpy.random._pickle.__bit_generator_ctor",
        "numpy.random._pickle.__generator_ctor",
        "numpy.random.mtrand.RandomState",
        "numpy.random._mt19937.MT19937",
        "numpy.random._pcg64.PCG64",
        "numpy.random._generator.Generator",
    }
    | {
        f"numpy.dtypes.{kind}DType"
        for kind in [
            "Float16",
            "Float32",
            "Float64",
            "Int8",
            "Int16",
            "Int32",
            "Int64",
            "UInt8",
            "UInt16",
            "UInt32",
            "UInt64",
            "Bool",
            "Complex64",
            "Complex128",
            "Str",
            "Bytes",
            "Object",
            "Void",
            "DateTime64",
            "TimeDelta64",
        ]
    }
)

JOBLIB = frozenset(
    {
        "joblib.numpy_pickle.NumpyArrayWrapper",
        "sklearn.externals.joblib.numpy_pickle.NumpyArrayWrapper",
    }
)

# Class-like names that sklearn modules import from elsewhere: reachable as `sklearn.x.Name`
# but not sklearn classes (some open files, sockets or processes). Found by walking every
# sklearn 1.9 module for CamelCase attributes whose __module__ is not sklearn.
_SKLEARN_REEXPORTS = frozenset(
    [
        "ABC",
        "ABCMeta",
        "Any",
        "ArffSparseDataType",
        "BSpline",
        "BytesIO",
        "Callable",
        "CalledProcessError",
        "Client",
        "ComplexWarning",
        "Connection",
        "Counter",
        "Dict",
        "Enum",
        "Generator",
        "GzipFile",
        "HTTPError",
        "Integral",
        "Iterable",
        "LinAlgError",
        "LinearOperator",
        "List",
        "Listener",
        "Literal",
        "Mapping",
        "MaskedArray",
        "Memory",
        "MethodType",
        "MutableMapping",
        "NamedTemporaryFile",
        "NamedTuple",
        "Number",
        "OpenmlFeaturesType",
        "OpenmlQualitiesType",
        "Optional",
        "OrderedDict",
        "Parameter",
        "Path",
        "PathLike",
        "Popen",
        "Protocol",
        "Queue",
        "Real",
        "Request",
        "Sequence",
        "SkipTest",
        "SparseEfficiencyWarning",
        "StringIO",
        "TemporaryDirectory",
        "TemporaryFile",
        "Thread",
        "ThreadpoolController",
        "TimeoutExpired",
        "Tuple",
        "URLError",
        "Union",
        "UserDict",
        "VisibleDeprecationWarning",
    ]
)
_CLASS_NAME = re.compile(r"[A-Z][A-Za-z0-9_]*\Z")


@dataclass(frozen=True)
class Allowlist:
    """References one format's pickles may make. `class_prefixes` admits CamelCase class names
    (never dotted, never a known re-export) directly under those module prefixes."""

    name: str
    exact: frozenset[str]
    class_prefixes: tuple[str, ...] = ()
    persistent_ids: bool = False

    def allows(self, module: str, name: str) -> bool:
        if f"{module}.{name}" in self.exact:
            return True
        return (
            any(module == p or module.startswith(p + ".") for p in self.class_prefixes)
            and _CLASS_NAME.match(name) is not None
            and name not in _SKLEARN_REEXPORTS
            and not module.endswith((".tests", "._testing", ".externals"))
        )


TORCH_ALLOW = Allowlist("pytorch", TORCH, persistent_ids=True)
NUMPY_ALLOW = Allowlist("numpy", NUMPY)
SKLEARN_ALLOW = Allowlist("sklearn", NUMPY | JOBLIB, class_prefixes=("sklearn",))
# A pickle whose saver we cannot tell: any of the ML formats above (sklearn models are often
# saved with plain pickle.dump, torch state dicts with pickle under a .pkl name).
DEFAULT_ALLOW = Allowlist("pickle", TORCH | NUMPY | JOBLIB, class_prefixes=("sklearn",))
PLAIN_ALLOW = Allowlist("plain", PLAIN_DATA)

# Known to run code, import modules, touch files or the network, or turn strings into
# callables. Only decides CRITICAL versus HIGH: everything else not allowed is still HIGH.
DANGEROUS_MODULES = frozenset(
    [
        "os",
        "posix",
        "nt",
        "subprocess",
        "importlib",
        "runpy",
        "pip",
        "timeit",
        "code",
        "codeop",
        "pty",
        "shutil",
        "socket",
        "webbrowser",
        "ctypes",
        "_ctypes",
        "sys",
        "types",
        "commands",
        "popen2",
        "multiprocessing",
        "pickle",
        "_pickle",
        "cPickle",
        "dill",
        "cloudpickle",
        "marshal",
        "asyncio",
        "threading",
        "_thread",
        "signal",
        "tempfile",
        "urllib",
        "http",
        "ftplib",
        "smtplib",
        "telnetlib",
        "requests",
        "bdb",
        "pdb",
        "ensurepip",
        "venv",
        "distutils",
        "setuptools",
        "zipimport",
        "imp",
        "inspect",
        "site",
        "sysconfig",
        "glob",
        "pathlib",
        "io",
        "_io",
        "fileinput",
        "tarfile",
        "zipfile",
        "linecache",
        "_posixsubprocess",
        "_winapi",
        "msvcrt",
        "winreg",
        "torch.hub",
        "torch.jit",
    ]
)
DANGEROUS_NAMES = frozenset(
    {
        f"{module}.{name}"
        for module in ("builtins", "__builtin__")
        for name in [
            "eval",
            "exec",
            "compile",
            "getattr",
            "setattr",
            "delattr",
            "__import__",
            "open",
            "input",
            "breakpoint",
            "globals",
            "locals",
            "vars",
            "execfile",
            "apply",
            "reload",
            "file",
            "help",
        ]
    }
    | {
        f"{module}.{name}"
        for module in ("operator", "_operator")
        for name in ("attrgetter", "methodcaller", "itemgetter", "call")
    }
    | {
        "pkgutil.resolve_name",
        "pkgutil.get_data",
        "pkgutil.find_loader",
        "functools.partial",
        "functools.partialmethod",
        "functools.reduce",
        "_functools.partial",
        "_functools.reduce",
        "numpy.load",
        "numpy.testing._private.utils.runstring",
        "torch.load",
        "torch.serialization.load",
        "copyreg._extension_registry",
    }
)
_DUNDER = re.compile(r"__\w+__")


def _is_dangerous(reference: str) -> bool:
    if reference in DANGEROUS_NAMES:
        return True
    return any(reference == m or reference.startswith(m + ".") for m in DANGEROUS_MODULES)


def judge(module: str, name: str, allow: Allowlist) -> Severity | None:
    """None if `allow` admits module.name; else CRITICAL for what is known to run code (also
    through a dotted name that walks attributes, `sklearn.x` + `os.system`), else HIGH."""
    if "." not in name and allow.allows(module, name):
        return None
    reference = f"{module}.{name}"
    parts = name.split(".")
    # A dotted name is a getattr chain from the module: judge every tail as well, since
    # `anything.os.system` reaches os.system through a re-export.
    tails = [reference] + [".".join(parts[i:]) for i in range(len(parts))]
    if any(_is_dangerous(t) for t in tails):
        return Severity.CRITICAL
    if len(parts) > 1 and any(_DUNDER.fullmatch(p) for p in parts):
        return Severity.CRITICAL  # __globals__, __builtins__, __subclasses__ walks
    return Severity.HIGH
