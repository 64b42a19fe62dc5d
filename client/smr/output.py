"""What `smr` writes: data on stdout (JSON with --json, else text for people), messages and
progress bars on stderr. Bars only when stderr is a terminal and -q was not given, so a
pipe or a log file never fills with carriage returns."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import IO, Any

from smr.errors import SmrError
from smr.refs import Ref


def to_jsonable(value: Any) -> Any:
    """SDK results (dataclasses holding a Ref and a Path) as plain JSON values."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_jsonable(v) for v in value]
    if isinstance(value, Path | Ref):
        return str(value)
    return value


def human_size(size: int | float | None) -> str:
    if size is None:
        return "-"
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


class Output:
    """One command's output channels. `secret` (the token in use) is scrubbed from anything
    written to stderr: a message that quotes a request must not leak it."""

    def __init__(
        self,
        *,
        json_mode: bool = False,
        quiet: bool = False,
        stdout: IO[str] | None = None,
        stderr: IO[str] | None = None,
    ) -> None:
        self.json_mode = json_mode
        self.quiet = quiet
        self.stdout = stdout or sys.stdout
        self.stderr = stderr or sys.stderr
        self.secrets: list[str] = []

    # --- stdout: data ---------------------------------------------------------------------

    def data(self, value: Any, text: str | Iterable[str] | None = None) -> None:
        """The command's result: JSON with --json, else `text` (lines), else JSON anyway."""
        if self.json_mode or text is None:
            self.stdout.write(json.dumps(to_jsonable(value), indent=2, sort_keys=True) + "\n")
        elif isinstance(text, str):
            self.stdout.write(text + ("" if text.endswith("\n") or not text else "\n"))
        else:
            for line in text:
                self.stdout.write(line + "\n")
        self.stdout.flush()

    def table(
        self, value: Any, rows: Sequence[Sequence[Any]], headers: Sequence[str] | None = None
    ) -> None:
        """A list: JSON with --json, else aligned columns."""
        self.data(value, table_lines(rows, headers))

    # --- stderr: messages -----------------------------------------------------------------

    def scrub(self, text: str) -> str:
        for secret in self.secrets:
            if secret:
                text = text.replace(secret, "<token>")
        return text

    def info(self, message: str) -> None:
        """A message for people (silenced by -q)."""
        if not self.quiet:
            self.stderr.write(self.scrub(message) + "\n")
            self.stderr.flush()

    def error(self, exc: SmrError) -> None:
        """An error: its code and message only (never a request, header or token)."""
        if self.json_mode:
            body = {"error": {"code": exc.code, "message": exc.message, "status": exc.status}}
            if exc.extra:
                body["error"]["extra"] = to_jsonable(exc.extra)
            self.stderr.write(self.scrub(json.dumps(body, sort_keys=True)) + "\n")
        else:
            self.stderr.write(self.scrub(f"smr: error: {exc.code}: {exc.message}") + "\n")
        self.stderr.flush()

    # --- stderr: progress -----------------------------------------------------------------

    @property
    def bars_enabled(self) -> bool:
        isatty = getattr(self.stderr, "isatty", None)
        return not self.quiet and bool(isatty and isatty())

    def progress(self, description: str) -> Bars | None:
        """A Progress callback drawing one bar per file, or None where no bar may be drawn."""
        return Bars(description, self.stderr) if self.bars_enabled else None


class Bars:
    """The SDK's Progress callback (event, path, done_bytes, total_bytes) as tqdm bars: one
    overall bar, and one per file in flight. Transfer workers call it from several threads."""

    # Events after which a file's bar is gone (whatever the transfer names them).
    FINAL = frozenset({"done", "end", "skip", "skipped", "cached", "verified", "error", "failed"})

    def __init__(self, description: str, stream: IO[str]) -> None:
        self.description = description
        self.stream = stream
        self.lock = threading.Lock()
        self.bars: dict[str, Any] = {}
        self.sizes: dict[str, int] = {}
        self.done: dict[str, int] = {}
        self.overall: Any = None

    def _bar(self, desc: str, total: int | None, *, leave: bool) -> Any:
        from tqdm import tqdm  # type: ignore[import-untyped]

        # A terminal that reports no size (0x0: some ptys, `script`) gets no bar at all from
        # tqdm: draw 80x24 there.
        sized = _columns(self.stream) > 0
        return tqdm(
            desc=desc,
            total=total,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            file=self.stream,
            leave=leave,
            dynamic_ncols=sized,
            ncols=None if sized else 80,
            nrows=None if sized else 24,
        )

    def __call__(self, event: str, path: str, done: int, total: int) -> None:
        with self.lock:
            if self.overall is None:
                self.overall = self._bar(self.description, 0, leave=True)
            if path not in self.sizes:
                self.sizes[path] = total
                self.done[path] = 0
                self.overall.total += max(total, 0)
                self.overall.refresh()
                if total > 0 and event not in self.FINAL:
                    self.bars[path] = self._bar(_short(path), total, leave=False)
            step = max(done - self.done[path], 0)
            self.done[path] += step
            self.overall.update(step)
            bar = self.bars.get(path)
            if bar is not None:
                bar.update(step)
                if event in self.FINAL or (total > 0 and done >= total):
                    bar.close()
                    del self.bars[path]

    def close(self) -> None:
        with self.lock:
            for bar in self.bars.values():
                bar.close()
            self.bars.clear()
            if self.overall is not None:
                self.overall.close()
                self.overall = None


def _columns(stream: IO[str]) -> int:
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, OSError, ValueError):
        return 0


def _short(path: str, width: int = 30) -> str:
    return path if len(path) <= width else "…" + path[-(width - 1) :]


def table_lines(rows: Sequence[Sequence[Any]], headers: Sequence[str] | None = None) -> list[str]:
    cells = [[_cell(c) for c in row] for row in rows]
    if headers:
        cells.insert(0, [h.upper() for h in headers])
    if not cells:
        return []
    widths = [max(len(row[i]) for row in cells if i < len(row)) for i in range(len(cells[0]))]
    return [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False)).rstrip() for row in cells
    ]


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, dict):
        return ",".join(f"{k}={v}" for k, v in value.items()) or "-"
    if isinstance(value, list | tuple):
        return ",".join(str(v) for v in value) or "-"
    return str(value)
