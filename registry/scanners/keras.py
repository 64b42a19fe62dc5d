"""Keras model configs: `.keras` archives (their `config.json` member), Keras JSON configs, and
HDF5 `.h5` files (their `model_config` and `training_config` root attributes).

A `.keras` file is a zip: the dispatcher recurses into it and hands this analyser the
`config.json` member, which is exactly what `keras.saving.load_model` reads to rebuild the
model; the whole zip is not detected here. `detect` therefore matches JSON whose head looks like
a serialized Keras object, and HDF5 files by their superblock signature.

Rules (the config tree is walked whole: wrappers, nested models, losses and metrics included):
- `keras.lambda` CRITICAL: a `Lambda` layer or a Keras 3 `__lambda__` object (marshalled
  Python bytecode or a function resolved by name).
- `keras.torch_module` CRITICAL: `TorchModuleWrapper`, whose config is a `torch.save` pickle.
- `keras.dangerous_function` CRITICAL: Keras utilities a config can call that touch files or the
  network (`get_file`, `load_model`, ...), the safe_mode bypass of CVE-2025-8747.
- `keras.tf_op_lambda` CRITICAL for TensorFlow file/Python ops, MEDIUM otherwise.
- `keras.custom_object` HIGH: an object whose `module` is not `keras`/`keras.*`, or whose
  registered name carries a package prefix (`Package>Name`): loading it imports code that is not
  Keras.
- `keras.unanalysable` HIGH: anything that could not be read or parsed.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Iterator
from typing import Any

from registry.scanners.base import Finding, ScanContext, ScanResult, Severity, Source

HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
MAX_CONFIG = 64 << 20  # a Keras config is kilobytes to a few megabytes

_LAMBDA_CLASSES = frozenset({"Lambda", "__lambda__"})
_TORCH_CLASSES = frozenset({"TorchModuleWrapper"})
_TF_OP_CLASSES = frozenset({"TFOpLambda", "SlicingOpLambda"})
_DANGEROUS_FUNCTIONS = frozenset(
    {
        "get_file",
        "load_model",
        "load_weights",
        "save_model",
        "save_weights",
        "model_from_json",
        "model_from_yaml",
        "model_from_config",
        "deserialize_keras_object",
        "register_keras_serializable",
    }
)
# TensorFlow symbol fragments a TFOpLambda can name that read/write files or run Python.
_DANGEROUS_TF_FRAGMENTS = (
    "io.",
    "gfile",
    "file",
    "py_function",
    "numpy_function",
    "py_func",
    "load_library",
    "load_op_library",
    "print",
    "summary",
    "saved_model",
    "train.",
    "compat.",
)


def detect(head: bytes, name: str) -> bool:
    return _hdf5_in_head(head) or _looks_like_keras_json(head, name)


def analyse(source: Source, *, name: str, ctx: ScanContext) -> ScanResult:
    result = ScanResult()
    try:
        if _find_superblock(source) is not None:
            result.formats.append("keras.h5")
            result.findings.extend(_analyse_h5(source, ctx))
        else:
            result.formats.append("keras.json")
            if source.size > MAX_CONFIG:
                raise ValueError(f"config of {source.size} bytes exceeds {MAX_CONFIG}")
            config = json.loads(source.read(0, source.size))
            result.findings.extend(walk_config(config, member=ctx.member))
    except Exception as exc:
        result.findings.append(unanalysable(exc, ctx))
    return result


def unanalysable(exc: BaseException, ctx: ScanContext) -> Finding:
    return Finding(
        rule="keras.unanalysable",
        severity=Severity.HIGH,
        message=f"Keras model could not be analysed ({type(exc).__name__}: {exc}); "
        "re-export it with a current Keras version.",
        member=ctx.member,
    )


def _hdf5_in_head(head: bytes) -> bool:
    offset = 0
    while offset + len(HDF5_SIGNATURE) <= len(head):
        if head[offset : offset + len(HDF5_SIGNATURE)] == HDF5_SIGNATURE:
            return True
        offset = 512 if offset == 0 else offset * 2
    return False


def _find_superblock(source: Source) -> int | None:
    """HDF5 looks for its signature at 0, 512, 1024, 2048, ... (after a user block)."""
    offset = 0
    while offset + len(HDF5_SIGNATURE) <= source.size:
        if source.read(offset, offset + len(HDF5_SIGNATURE)) == HDF5_SIGNATURE:
            return offset
        offset = 512 if offset == 0 else offset * 2
    return None


def _looks_like_keras_json(head: bytes, name: str) -> bool:
    stripped = head.lstrip()
    if not stripped.startswith(b"{"):
        return False
    if not (name.endswith(".json") or name == "" or "." not in name.rsplit("/", 1)[-1]):
        return False
    return b'"class_name"' in head and b'"config"' in head


class _SourceFile(io.RawIOBase):
    """A read-only file over a Source, so h5py reads the metadata it needs by ranged reads."""

    def __init__(self, source: Source) -> None:
        super().__init__()
        self._source = source
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._source.size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def tell(self) -> int:
        return self._pos

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        data = self._source.read(self._pos, self._pos + len(view))
        view[: len(data)] = data
        self._pos += len(data)
        return len(data)


def _analyse_h5(source: Source, ctx: ScanContext) -> list[Finding]:
    import h5py  # type: ignore[import-untyped]  # imported here: only .h5 scans pay for it

    findings: list[Finding] = []
    with _SourceFile(source) as fileobj, h5py.File(fileobj, "r") as h5:
        for attribute in ("model_config", "training_config"):
            if attribute not in h5.attrs:
                continue
            value = h5.attrs[attribute]
            if isinstance(value, bytes):
                value = value.decode("utf-8")
            if not isinstance(value, str):
                raise ValueError(f"root attribute {attribute} is not a string")
            findings.extend(walk_config(json.loads(value), member=ctx.member))
    return findings


def walk_config(config: Any, *, member: str) -> list[Finding]:
    """Findings for one deserialized Keras config (any JSON value)."""
    findings: list[Finding] = []
    for obj, in_lambda in _objects(config):
        findings.extend(_judge(obj, in_lambda=in_lambda, member=member))
    return findings


def _objects(config: Any) -> Iterator[tuple[dict[str, Any], bool]]:
    """Every dict with a string `class_name`, iteratively (configs may nest deeply)."""
    stack: list[tuple[Any, bool]] = [(config, False)]
    while stack:
        node, in_lambda = stack.pop()
        if isinstance(node, dict):
            is_object = isinstance(node.get("class_name"), str)
            if is_object:
                yield node, in_lambda
            child_in_lambda = in_lambda or (is_object and node["class_name"] in _LAMBDA_CLASSES)
            stack.extend((value, child_in_lambda) for value in node.values())
        elif isinstance(node, list):
            stack.extend((value, in_lambda) for value in node)


def _judge(obj: dict[str, Any], *, in_lambda: bool, member: str) -> Iterator[Finding]:
    class_name: str = obj["class_name"]
    config = obj.get("config")
    module = obj.get("module")
    registered = obj.get("registered_name")
    if class_name in _LAMBDA_CLASSES:
        if not in_lambda:  # a Keras 3 Lambda layer holds a __lambda__: one finding
            yield Finding(
                rule="keras.lambda",
                severity=Severity.CRITICAL,
                message=f"Keras {class_name} runs arbitrary Python code when the model is "
                "loaded or called; replace it with a built-in layer.",
                member=member,
                reference=_lambda_reference(config),
            )
        return
    if class_name in _TORCH_CLASSES:
        yield Finding(
            rule="keras.torch_module",
            severity=Severity.CRITICAL,
            message="TorchModuleWrapper stores a torch.save pickle that runs code on load.",
            member=member,
            reference=class_name,
        )
        return
    if class_name in _TF_OP_CLASSES:
        function = str(config.get("function", "")) if isinstance(config, dict) else ""
        dangerous = any(fragment in function.lower() for fragment in _DANGEROUS_TF_FRAGMENTS)
        yield Finding(
            rule="keras.tf_op_lambda",
            severity=Severity.CRITICAL if dangerous else Severity.MEDIUM,
            message=f"{class_name} calls the TensorFlow symbol {function!r} by name.",
            member=member,
            reference=function,
        )
        return
    function_name = config if class_name == "function" and isinstance(config, str) else ""
    for candidate in (class_name, function_name):
        if candidate.rsplit(">", 1)[-1].rsplit(".", 1)[-1] in _DANGEROUS_FUNCTIONS:
            yield Finding(
                rule="keras.dangerous_function",
                severity=Severity.CRITICAL,
                message=f"The config calls {candidate!r}, which reads or writes files or "
                "downloads data when the model is loaded.",
                member=member,
                reference=f"{module}.{candidate}" if isinstance(module, str) else candidate,
            )
            return
    custom = (
        (isinstance(module, str) and not (module == "keras" or module.startswith("keras.")))
        or (isinstance(registered, str) and ">" in registered)
        or ">" in class_name
    )
    if custom:
        reference = registered if isinstance(registered, str) and registered else class_name
        yield Finding(
            rule="keras.custom_object",
            severity=Severity.HIGH,
            message=f"Custom object {reference!r} (module {module!r}) needs code from outside "
            "Keras to load; use built-in layers or review that code.",
            member=member,
            reference=f"{module}.{class_name}" if isinstance(module, str) else reference,
        )


def _lambda_reference(config: Any) -> str:
    """A short, stable description of the Lambda's function (never the code itself).

    Marshalled code comes as a list (code, defaults, closure): Keras 2 `function`, Keras 3
    `__lambda__` `value`, or a Keras 3 Lambda layer's `__lambda__` `code` string; a function
    resolved by name comes as a string.
    """
    function = config.get("function") if isinstance(config, dict) else None
    if isinstance(function, dict):  # Keras 3: {"class_name": "__lambda__", "config": {...}}
        function = function.get("config")
    if isinstance(function, dict) and isinstance(function.get("code"), str):
        # Keras 3's Lambda layer writes {"code", "defaults", "closure"} (keras 3.15, see
        # fixtures/keras_lambda.keras); only a bare serialized lambda uses "value".
        function = [function["code"]]
    elif isinstance(function, dict) or (isinstance(config, dict) and "value" in config):
        function = (function if isinstance(function, dict) else config).get("value")
    if isinstance(function, list) and function and isinstance(function[0], str):
        code = function[0]
        digest = hashlib.sha256(code.encode()).hexdigest()[:16]
        return f"marshalled code, {len(code)} base64 chars, sha256 {digest}"
    if isinstance(function, str):
        return function[:200]
    return "lambda"
