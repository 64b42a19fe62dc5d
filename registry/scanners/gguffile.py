"""GGUF models: chat templates in the metadata that reach beyond plain Jinja formatting.

llama-cpp-python and transformers render `tokenizer.chat_template` with Jinja2; rendered outside
a sandbox (CVE-2024-34359) a template can walk `__class__`/`__globals__` to `os`. The header and
metadata key/value pairs are read here by hand (v1-v3, either byte order; tensor data is never
read), and each `tokenizer.chat_template*` string is parsed into Jinja2's AST, never rendered.

Rules, on the AST:
- `gguf.chat_template.private_attribute` CRITICAL: an attribute or constant subscript naming
  something private (`_x`, `__class__`, `mro`, `f_globals`, ...), or any string constant that
  is a dunder name (reachable through `attr`, `map(attribute=...)`, `str.format`).
- `gguf.chat_template.dangerous_global` CRITICAL: `lipsum`, `cycler`, `joiner`, `self`,
  `config`, `request`, `url_for`, ... (each leads to module globals).
- `gguf.chat_template.unknown_call` HIGH: a call of a function, method, filter or test outside
  the allowlist of what real chat templates use.
- `gguf.chat_template.dynamic_attribute` HIGH: a subscript or attribute-taking filter whose name
  is built at render time (string concatenation, or a variable set from one).
- `gguf.chat_template.include` HIGH: `{% import %}`, `{% from %}`, `{% include %}`,
  `{% extends %}` (a string template has no business loading others).
- `gguf.unanalysable` HIGH: a malformed header or a template Jinja2 cannot parse.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Iterator
from typing import Any

from registry.scanners.base import Finding, ScanContext, ScanResult, Severity, Source

MAGIC = b"GGUF"
MAX_KV = 1 << 20
MAX_KEY = 1 << 16
MAX_TEMPLATE = 4 << 20
_WINDOW = 1 << 20
# value type -> struct format of one element (8 STRING and 9 ARRAY are handled apart)
_SCALARS = {
    0: "B",
    1: "b",
    2: "H",
    3: "h",
    4: "I",
    5: "i",
    6: "f",
    7: "?",
    10: "Q",
    11: "q",
    12: "d",
}
_STRING, _ARRAY = 8, 9

GLOBAL_FUNCTIONS = frozenset({"range", "namespace", "raise_exception", "strftime_now", "dict"})
DANGEROUS_GLOBALS = frozenset(
    {
        "lipsum",
        "cycler",
        "joiner",
        "self",
        "config",
        "request",
        "session",
        "g",
        "url_for",
        "get_flashed_messages",
        "environment",
        "context",
    }
)
METHODS = frozenset(
    {
        "strip",
        "lstrip",
        "rstrip",
        "lower",
        "upper",
        "title",
        "capitalize",
        "startswith",
        "endswith",
        "split",
        "rsplit",
        "splitlines",
        "replace",
        "find",
        "rfind",
        "count",
        "join",
        "items",
        "keys",
        "values",
        "get",
        "append",
        "isdigit",
        "isalpha",
        "isalnum",
        "isspace",
        "cycle",  # loop.cycle
        "changed",  # loop.changed
    }
)
FILTERS = frozenset(
    {
        "abs",
        "attr",
        "batch",
        "capitalize",
        "center",
        "count",
        "d",
        "default",
        "dictsort",
        "e",
        "escape",
        "first",
        "float",
        "format",  # printf-style %: no attribute lookups, unlike str.format
        "groupby",
        "indent",
        "int",
        "items",
        "join",
        "last",
        "length",
        "list",
        "lower",
        "map",
        "max",
        "min",
        "reject",
        "rejectattr",
        "replace",
        "reverse",
        "round",
        "safe",
        "select",
        "selectattr",
        "slice",
        "sort",
        "string",
        "striptags",
        "sum",
        "title",
        "tojson",
        "trim",
        "truncate",
        "unique",
        "upper",
        "wordcount",
        "wordwrap",
    }
)
# Filters that look an attribute up by a name given as an argument.
_ATTRIBUTE_FILTERS = frozenset(
    {"attr", "map", "selectattr", "rejectattr", "sort", "groupby", "sum", "unique", "min", "max"}
)
TESTS = frozenset(
    {
        "boolean",
        "defined",
        "divisibleby",
        "eq",
        "equalto",
        "escaped",
        "even",
        "false",
        "float",
        "ge",
        "greaterthan",
        "gt",
        "in",
        "integer",
        "iterable",
        "le",
        "lessthan",
        "lower",
        "lt",
        "mapping",
        "ne",
        "none",
        "number",
        "odd",
        "sameas",
        "sequence",
        "string",
        "true",
        "undefined",
        "upper",
    }
)
_PRIVATE_NAMES = frozenset(
    {"mro", "func_globals", "f_globals", "f_locals", "f_builtins", "f_back", "gi_frame"}
    | {"gi_code", "cr_frame", "cr_code", "ag_frame", "tb_frame", "tb_next", "co_code"}
)
_DUNDER = re.compile(r"__\w+__")


def detect(head: bytes, name: str) -> bool:
    return head.startswith(MAGIC)


def analyse(source: Source, *, name: str, ctx: ScanContext) -> ScanResult:
    result = ScanResult(formats=["gguf"])
    try:
        for key, template, offset in chat_templates(source):
            result.findings.extend(judge_template(template, key=key, offset=offset, ctx=ctx))
    except Exception as exc:
        result.findings.append(
            Finding(
                rule="gguf.unanalysable",
                severity=Severity.HIGH,
                message=f"GGUF file could not be analysed ({type(exc).__name__}: {exc}); "
                "re-convert it with a current llama.cpp.",
                member=ctx.member,
            )
        )
    return result


class _Reader:
    def __init__(self, source: Source) -> None:
        self.source = source
        self.pos = 0
        self.order = "<"
        self.wide = True  # v2+: 64-bit lengths and counts
        self._start = 0
        self._buf = b""

    def take(self, n: int) -> bytes:
        end = self.pos + n
        if n < 0 or end > self.source.size:
            raise ValueError(f"a {n}-byte read at offset {self.pos} runs past the end of file")
        if not (self._start <= self.pos and end <= self._start + len(self._buf)):
            if n > _WINDOW:
                self.pos = end
                return self.source.read(end - n, end)
            self._start = self.pos
            self._buf = self.source.read(self.pos, min(self.source.size, self.pos + _WINDOW))
        data = self._buf[self.pos - self._start : end - self._start]
        self.pos = end
        return data

    def unpack(self, fmt: str) -> Any:
        return struct.unpack(self.order + fmt, self.take(struct.calcsize(fmt)))[0]

    def length(self) -> int:
        return int(self.unpack("Q" if self.wide else "I"))

    def string(self, limit: int) -> tuple[str | None, int]:
        """A GGUF string and its offset (None when longer than `limit`: skipped)."""
        n = self.length()
        offset = self.pos
        if n > limit:
            self.skip(n)
            return None, offset
        return self.take(n).decode("utf-8"), offset

    def skip(self, n: int) -> None:
        if n < 0 or self.pos + n > self.source.size:
            raise ValueError(f"a {n}-byte value at offset {self.pos} runs past the end of file")
        self.pos += n


def chat_templates(source: Source) -> Iterator[tuple[str, str, int]]:
    """(key, template, offset) for each `tokenizer.chat_template*` string in the metadata."""
    r = _Reader(source)
    if r.take(4) != MAGIC:
        raise ValueError("no GGUF magic")
    version = r.unpack("I")
    if version & 0xFFFF == 0:  # written big-endian
        r.order = ">"
        version = struct.unpack(">I", struct.pack("<I", version))[0]
    if version not in (1, 2, 3):
        raise ValueError(f"unsupported GGUF version {version}")
    r.wide = version >= 2
    r.length()  # tensor count: the tensor infos follow the metadata and are not read
    kv_count = r.length()
    if kv_count > MAX_KV:
        raise ValueError(f"{kv_count} metadata entries exceed {MAX_KV}")
    for _ in range(kv_count):
        key, _ = r.string(MAX_KEY)
        if key is None:
            raise ValueError(f"a metadata key longer than {MAX_KEY} bytes")
        value_type = r.unpack("I")
        wanted = key == "tokenizer.chat_template" or key.startswith("tokenizer.chat_template.")
        if value_type == _STRING:
            value, offset = r.string(MAX_TEMPLATE if wanted else -1)
            if wanted:
                if value is None:
                    raise ValueError(f"{key} is longer than {MAX_TEMPLATE} bytes")
                yield key, value, offset
        elif value_type == _ARRAY:
            _skip_array(r)
        elif value_type in _SCALARS:
            r.skip(struct.calcsize(_SCALARS[value_type]))
        else:
            raise ValueError(f"metadata {key!r} has unknown value type {value_type}")


def _skip_array(r: _Reader) -> None:
    element_type = r.unpack("I")
    count = r.length()
    if element_type in _SCALARS:
        r.skip(count * struct.calcsize(_SCALARS[element_type]))
    elif element_type == _STRING:
        if count > r.source.size:
            raise ValueError(f"an array of {count} strings cannot fit in the file")
        for _ in range(count):
            r.skip(r.length())
    else:  # nested arrays are allowed by the format but unused; refuse them
        raise ValueError(f"array of value type {element_type} is not supported")


def judge_template(template: str, *, key: str, offset: int, ctx: ScanContext) -> list[Finding]:
    """Findings for one chat template (parsed, never rendered)."""
    from jinja2 import Environment, nodes
    from jinja2.ext import Extension, loopcontrols

    class _Generation(Extension):
        """transformers' `{% generation %}` marker: its body is ordinary template code."""

        tags = {"generation"}

        def parse(self, parser: Any) -> nodes.Node:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.Scope(body, lineno=lineno)

    environment = Environment(extensions=[loopcontrols, _Generation])  # noqa: S701 - never rendered
    tree = environment.parse(template)
    judge = _TemplateJudge(key=key, offset=offset, member=ctx.member)
    judge.walk(tree)
    return judge.findings


class _TemplateJudge:
    def __init__(self, *, key: str, offset: int, member: str) -> None:
        self.key = key
        self.offset = offset
        self.member = member
        self.findings: list[Finding] = []
        self._seen: set[tuple[str, str]] = set()
        self.macros: set[str] = set()
        self.stringy_names: set[str] = set()  # variables set from strings
        self.stringy_fields: set[str] = set()  # namespace fields set from strings

    def flag(self, rule: str, severity: Severity, what: str, reference: str) -> None:
        if (rule, reference) in self._seen:
            return
        self._seen.add((rule, reference))
        self.findings.append(
            Finding(
                rule=f"gguf.chat_template.{rule}",
                severity=severity,
                message=f"Chat template {self.key!r} {what}; chat templates should only format "
                "messages with plain Jinja.",
                member=self.member,
                offset=self.offset,
                reference=reference,
            )
        )

    def walk(self, tree: Any) -> None:
        from jinja2 import nodes

        self.macros = {m.name for m in tree.find_all(nodes.Macro)}
        bindings = [(a.target, a.node) for a in tree.find_all(nodes.Assign)]
        bindings += [(f.target, f.iter) for f in tree.find_all(nodes.For)]
        keywords = list(tree.find_all(nodes.Keyword))  # namespace(field=...)
        changed = True
        while changed:  # to a fixed point: `{% set a = '_' %}{% set b = a %}`
            changed = False
            for target, value in bindings:
                if not self._stringy(value):
                    continue
                names = {n.name for n in [target, *target.find_all(nodes.Name)]}
                fields = {r.attr for r in target.find_all(nodes.NSRef)}
                if isinstance(target, nodes.NSRef):
                    fields.add(target.attr)
                if not (names <= self.stringy_names and fields <= self.stringy_fields):
                    self.stringy_names |= names
                    self.stringy_fields |= fields
                    changed = True
            for keyword in keywords:
                if keyword.key not in self.stringy_fields and self._stringy(keyword.value):
                    self.stringy_fields.add(keyword.key)
                    changed = True
        stack = [tree]
        while stack:
            node = stack.pop()
            self.visit(node)
            stack.extend(node.iter_child_nodes())

    def _stringy(self, node: Any) -> bool:
        """Whether `node` may evaluate to a string the template spelled or built itself."""
        from jinja2 import nodes

        if isinstance(node, nodes.Const):
            return isinstance(node.value, str)
        if isinstance(node, nodes.Concat | nodes.Mod | nodes.Filter | nodes.Call):
            return True
        if isinstance(node, nodes.Name):
            return node.name in self.stringy_names
        if isinstance(node, nodes.Getattr):
            return node.attr in self.stringy_fields
        return any(self._stringy(child) for child in node.iter_child_nodes())

    def _private(self, name: str) -> bool:
        return name.startswith("_") or name in _PRIVATE_NAMES

    def _check_name_argument(self, node: Any, where: str) -> None:
        """An argument used as an attribute name: constant and public, or a finding."""
        from jinja2 import nodes

        if isinstance(node, nodes.Const):
            if isinstance(node.value, str) and self._private(node.value.split(".")[-1]):
                self.flag(
                    "private_attribute", Severity.CRITICAL, f"reaches {node.value!r}", node.value
                )
        elif self._stringy(node):
            self.flag("dynamic_attribute", Severity.HIGH, f"builds {where} at render time", where)

    def visit(self, node: Any) -> None:
        from jinja2 import nodes

        if isinstance(node, nodes.Getattr):
            if self._private(node.attr):
                self.flag(
                    "private_attribute", Severity.CRITICAL, f"reaches .{node.attr}", node.attr
                )
        elif isinstance(node, nodes.Getitem):
            self._check_name_argument(node.arg, "a subscript")
        elif isinstance(node, nodes.Const):
            if isinstance(node.value, str) and _DUNDER.search(node.value):
                reference = _DUNDER.search(node.value).group(0)  # type: ignore[union-attr]
                self.flag(
                    "private_attribute", Severity.CRITICAL, f"spells {reference!r}", reference
                )
        elif isinstance(node, nodes.Name) and node.ctx == "load":
            if node.name in DANGEROUS_GLOBALS:
                self.flag("dangerous_global", Severity.CRITICAL, f"uses {node.name}", node.name)
        elif isinstance(node, nodes.Call):
            self._check_call(node)
        elif isinstance(node, nodes.Filter):
            self._check_filter(node)
        elif isinstance(node, nodes.Test):
            if node.name not in TESTS:
                self.flag("unknown_call", Severity.HIGH, f"uses the test {node.name!r}", node.name)
        elif isinstance(node, nodes.Import | nodes.FromImport | nodes.Include | nodes.Extends):
            self.flag("include", Severity.HIGH, "loads another template", type(node).__name__)

    def _check_call(self, node: Any) -> None:
        from jinja2 import nodes

        callee = node.node
        if isinstance(callee, nodes.Name):
            if callee.name in GLOBAL_FUNCTIONS or callee.name in self.macros:
                return
            if callee.name == "caller":  # inside {% call %} blocks
                return
            reference = callee.name
        elif isinstance(callee, nodes.Getattr):
            if callee.attr in METHODS:
                return
            reference = f".{callee.attr}"
        else:
            reference = type(callee).__name__
        self.flag("unknown_call", Severity.HIGH, f"calls {reference}", reference)

    def _check_filter(self, node: Any) -> None:
        from jinja2 import nodes

        if node.name not in FILTERS:
            self.flag("unknown_call", Severity.HIGH, f"uses the filter {node.name!r}", node.name)
            return
        # map('upper') applies a filter, select('odd') a test, chosen by name
        by_name: frozenset[str] = frozenset()
        named: list[Any] = []
        if node.name in ("map", "select", "reject"):
            by_name, named = (FILTERS if node.name == "map" else TESTS), node.args[:1]
        elif node.name in ("selectattr", "rejectattr"):
            by_name, named = TESTS, node.args[1:2]
        for argument in named:
            if not (isinstance(argument, nodes.Const) and argument.value in by_name):
                reference = argument.value if isinstance(argument, nodes.Const) else node.name
                self.flag("unknown_call", Severity.HIGH, f"applies {reference!r}", str(reference))
        if node.name in _ATTRIBUTE_FILTERS:
            arguments = list(node.args) if node.name == "attr" else []
            arguments += [kw.value for kw in node.kwargs if kw.key == "attribute"]
            if node.name in ("selectattr", "rejectattr", "groupby") and node.args:
                arguments.append(node.args[0])
            for argument in arguments:
                self._check_name_argument(argument, f"the {node.name} attribute name")
