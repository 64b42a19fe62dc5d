"""Artifact path rules (registry/paths.py), without HTTP."""

from __future__ import annotations

import unicodedata

import pytest

from registry.errors import InvalidPath
from registry.paths import validate_artifact_path

NFC = "caf\u00e9/r\u00e9sum\u00e9.bin"
NFD = unicodedata.normalize("NFD", NFC)


def test_nfd_and_nfc_spellings_are_one_path():
    assert NFC != NFD
    assert validate_artifact_path(NFD) == NFC
    assert validate_artifact_path(NFC) == NFC


def test_length_limit_counts_the_normalised_path():
    # 512 NFD "é" are 1536 bytes; their NFC form is 1024 bytes, which is allowed.
    assert validate_artifact_path("\u0065\u0301" * 512) == "\u00e9" * 512


@pytest.mark.parametrize(
    "path",
    [
        "weights/model.safetensors",
        ".gitattributes",
        "a/.hidden/b",
        "tokenizer/vocab (1).json",
        "a..b",
        "..a",
        "日本語/モデル.bin",
        "emoji/\U0001f916.bin",
        "100%.bin",
        "50%off/%41.txt",  # '%' before ASCII escapes is not ambiguous
    ],
)
def test_ordinary_paths_are_accepted(path):
    assert validate_artifact_path(path) == path


@pytest.mark.parametrize(
    "path",
    [
        "invoice\u202etxt.exe",  # RIGHT-TO-LEFT OVERRIDE
        "a\u2066b",  # LEFT-TO-RIGHT ISOLATE
        "a\u200bb",  # ZERO WIDTH SPACE
        "a\u200db",  # ZERO WIDTH JOINER
        "\ufeffa",  # BYTE ORDER MARK
        "a\u00adb",  # SOFT HYPHEN
        "a\u2028b",  # LINE SEPARATOR
        "a\u2029b",  # PARAGRAPH SEPARATOR
        "a\u0085b",  # NEXT LINE (C1 control)
        "a\x7fb",
        "a\x00b",
        "a\tb",
        "a\ud800b",  # lone surrogate (only reachable through JSON)
        "a\ufffdb",  # REPLACEMENT CHARACTER: something upstream failed to decode
    ],
    ids=[
        "rlo",
        "lri",
        "zwsp",
        "zwj",
        "bom",
        "shy",
        "line-sep",
        "para-sep",
        "nel",
        "del",
        "nul",
        "tab",
        "surrogate",
        "replacement",
    ],
)
def test_control_and_format_characters_are_refused(path):
    with pytest.raises(InvalidPath):
        validate_artifact_path(path)


@pytest.mark.parametrize(
    "path",
    [
        "..",
        "a/../b",
        ".",
        "...",
        "a/..../b",
        "\u2024\u2024/etc/passwd",  # ONE DOT LEADER x2
        "\u2025/x",  # TWO DOT LEADER
        "a/\u2026/b",  # HORIZONTAL ELLIPSIS
        "\uff0e\uff0e/x",  # FULLWIDTH FULL STOP
        "\u3002\u3002/x",  # IDEOGRAPHIC FULL STOP
        "\uff61\uff61/x",  # HALFWIDTH IDEOGRAPHIC FULL STOP
        "\ufe52\ufe52/x",  # SMALL FULL STOP
        ".\uff0e/x",  # mixed
        "a\uff0fb",  # FULLWIDTH SOLIDUS: '/' after a best-fit conversion
        "a\uff3cb",  # FULLWIDTH REVERSE SOLIDUS
        "a\u2215b",  # DIVISION SLASH
    ],
)
def test_dot_and_slash_look_alikes_are_refused(path):
    with pytest.raises(InvalidPath):
        validate_artifact_path(path)


@pytest.mark.parametrize(
    "path",
    [" a", "a ", "dir /b", "a/ b", "a\u00a0", "\u3000a", "a.", "dir./b", "a/b.."],
    ids=[
        "lead-space",
        "trail-space",
        "dir-trail-space",
        "lead-space-2",
        "trail-nbsp",
        "lead-ideo-space",
        "trail-dot",
        "dir-trail-dot",
        "trail-dots",
    ],
)
def test_segments_windows_would_rename_are_refused(path):
    with pytest.raises(InvalidPath):
        validate_artifact_path(path)


def test_inner_spaces_are_fine():
    assert validate_artifact_path("my model/final weights.bin") == "my model/final weights.bin"


@pytest.mark.parametrize("path", ["", "/abs", "a\\b", "a//b", "a/", "x" * 1025], ids=str)
def test_existing_rules_still_hold(path):
    with pytest.raises(InvalidPath):
        validate_artifact_path(path)


@pytest.mark.parametrize("path", ["%FF%FE", "a%e9.bin", "dir/%C3%A9", "%80"])
def test_escapes_of_non_ascii_bytes_are_refused(path):
    """What Django makes of URL bytes that are not UTF-8 ('%ff' arrives as the text '%FF')."""
    with pytest.raises(InvalidPath):
        validate_artifact_path(path)
