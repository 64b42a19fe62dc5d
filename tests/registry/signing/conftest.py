"""Helpers for the signing tests: a model folder on disk, its digests, and the real
`model_signing` CLI (the one from PyPI, in this venv) as the judge of our bundles."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

CLI = Path(sys.executable).with_name("model_signing")

MODEL_FILES = {
    "config.json": b'{"hidden_size": 8}\n',
    "model.safetensors": os.urandom(70_000),
    "tokenizer/vocab.txt": b"a\nb\nc\n",
    # Git metadata, which `model_signing` leaves out by default (HF repositories carry it).
    ".gitattributes": b"*.safetensors filter=lfs\n",
}


def write_folder(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


def digests_of(root: Path) -> list[tuple[str, str, int]]:
    """(path, sha256, size) of every file under root, as the registry records them at upload."""
    out = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        data = path.read_bytes()
        out.append((path.relative_to(root).as_posix(), hashlib.sha256(data).hexdigest(), len(data)))
    return out


def cli_verify(
    folder: Path, bundle: dict[str, Any], public_pem: str | bytes, where: Path
) -> subprocess.CompletedProcess[str]:
    """`model_signing verify key <folder> --signature <bundle> --public_key <pem>`."""
    where.mkdir(parents=True, exist_ok=True)
    sig = where / "registry.sig"
    pub = where / "registry.pub"
    sig.write_text(json.dumps(bundle), encoding="utf-8")
    pub.write_bytes(public_pem.encode() if isinstance(public_pem, str) else public_pem)
    return subprocess.run(
        [str(CLI), "verify", "key", str(folder), "--signature", str(sig), "--public_key", str(pub)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    return write_folder(tmp_path / "model", MODEL_FILES)
