"""Artifact path rules: relative POSIX paths that are safe on every filesystem and in URLs.

A path is stored in Unicode NFC, so the NFC and NFD spellings of one name (macOS sends NFD,
most others NFC) are one file. What a client could turn into something else when it writes
the file out is refused: invisible or direction-changing characters, segments that some
filesystem or best-fit code page reads as '.' or '..', and segment ends Windows drops.
"""

from __future__ import annotations

import re
import unicodedata

from django.core.exceptions import ValidationError

from registry.errors import InvalidPath

MAX_PATH_BYTES = 1024

# Cc: C0/C1 controls; Cf: bidi overrides and isolates, zero-width characters, BOM, soft
# hyphen; Cs: lone surrogates (only reachable through JSON); Zl/Zp: U+2028/U+2029.
_REFUSED_CATEGORIES = {"Cc", "Cf", "Cs", "Zl", "Zp"}
# U+FFFD means something upstream failed to decode the name; the real name is lost.
_REPLACEMENT = "\ufffd"
# Best-fit code pages and some clients turn these into '/' or '\' (the "WorstFit" family).
_SLASH_LOOKALIKES = set("\uff0f\uff3c\u2215\u2216\u2044\u29f8\u29f9\ufe68\u2571\u2572")
_DOT_WORDS = ("FULL STOP", "DOT", "ELLIPSIS", "TELEIA")
# Django's WSGI handler turns URL bytes that are not UTF-8 into the text '%FF' (uppercase
# escapes of bytes 80-FF), and the original bytes are gone by the time a view runs. Refusing
# such escapes in every path keeps `.../files/%ff` from naming a file literally called '%FF',
# on any server, and keeps paths uploaded by JSON reachable by URL.
_HIGH_BYTE_ESCAPE = re.compile(r"%[89A-Fa-f][0-9A-Fa-f]")


def _dot_like(char: str) -> bool:
    """'.' or a punctuation, symbol or mark some client may render or fold into one."""
    if char == "." or set(unicodedata.normalize("NFKC", char)) <= {"."}:
        return True
    if unicodedata.category(char)[0] not in "PSM":
        return False  # letters with a dot (i, ż) are fine
    name = unicodedata.name(char, "")
    return any(word in name for word in _DOT_WORDS)


def validate_visible_text(text: str) -> None:
    """Django validator: refuse control, bidi, zero-width and line-separator characters."""
    if any(unicodedata.category(c) in _REFUSED_CATEGORIES for c in text):
        raise ValidationError(
            "Contains a control or invisible formatting character (newline, bidi override, "
            "zero-width space, ...).",
            code="invisible_character",
        )


def validate_artifact_path(path: str) -> str:
    """Return the NFC form of `path` if it is an acceptable artifact path, else raise
    InvalidPath saying why. Callers must store and look up the returned value."""
    if not path:
        raise InvalidPath("The path is empty.", path=path)
    if any(unicodedata.category(c) == "Cs" for c in path):
        raise InvalidPath("The path is not valid UTF-8 (it holds a lone surrogate).")
    path = unicodedata.normalize("NFC", path)
    if len(path.encode("utf-8")) > MAX_PATH_BYTES:
        raise InvalidPath(f"The path is longer than {MAX_PATH_BYTES} bytes.")
    if any(unicodedata.category(c) in _REFUSED_CATEGORIES for c in path):
        raise InvalidPath(
            "The path contains a control or invisible formatting character (NUL, newline, "
            "bidi override, zero-width space, line separator, ...)."
        )
    if _HIGH_BYTE_ESCAPE.search(path):
        raise InvalidPath(
            "The path is not valid UTF-8, or holds a percent-escape of a non-ASCII byte "
            "(%80-%FF). Send the UTF-8 bytes of the name percent-encoded once.",
            path=path,
        )
    if _REPLACEMENT in path:
        raise InvalidPath("The path contains U+FFFD: it was not decoded correctly.", path=path)
    if "\\" in path or _SLASH_LOOKALIKES.intersection(path):
        raise InvalidPath(
            "Use '/' to separate directories; backslashes and slash look-alikes are not allowed.",
            path=path,
        )
    if path.startswith("/"):
        raise InvalidPath("The path must be relative (no leading '/').", path=path)
    for segment in path.split("/"):
        if segment == "":
            raise InvalidPath("The path has an empty segment ('//' or a trailing '/').", path=path)
        if all(_dot_like(c) for c in segment):
            raise InvalidPath(
                "A segment made only of dots (or dot-like characters) is not allowed.", path=path
            )
        if segment != segment.strip():
            raise InvalidPath("A segment may not start or end with whitespace.", path=path)
        if _dot_like(segment[-1]):
            raise InvalidPath(
                "A segment may not end with '.' or a dot-like character (Windows drops "
                "trailing dots).",
                path=path,
            )
    return path
