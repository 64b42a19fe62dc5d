"""Artifact path rules: relative POSIX paths that are safe on every filesystem and in URLs."""

from __future__ import annotations

from registry.errors import InvalidPath

MAX_PATH_BYTES = 1024


def validate_artifact_path(path: str) -> str:
    """Return `path` if it is an acceptable artifact path, else raise InvalidPath saying why."""
    if not path:
        raise InvalidPath("The path is empty.", path=path)
    if len(path.encode("utf-8", "surrogatepass")) > MAX_PATH_BYTES:
        raise InvalidPath(f"The path is longer than {MAX_PATH_BYTES} bytes.")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in path):
        raise InvalidPath("The path contains a control character (NUL, newline, ...).")
    if "\\" in path:
        raise InvalidPath(
            "Use '/' to separate directories; backslashes are not allowed.", path=path
        )
    if path.startswith("/"):
        raise InvalidPath("The path must be relative (no leading '/').", path=path)
    for segment in path.split("/"):
        if segment == "":
            raise InvalidPath("The path has an empty segment ('//' or a trailing '/').", path=path)
        if segment in {".", ".."}:
            raise InvalidPath("'.' and '..' segments are not allowed.", path=path)
    try:
        path.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidPath("The path is not valid UTF-8.") from exc
    return path
