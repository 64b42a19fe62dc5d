"""The local cache of pulled files, laid out like huggingface_hub's:

    $XDG_CACHE_HOME/smr/blobs/sha256/<hex>                  one file per content
    $XDG_CACHE_HOME/smr/blobs/sha256/<hex>.ok               its size, mtime, inode when verified
    $XDG_CACHE_HOME/smr/blobs/sha256/<hex>.partial[.json]   a download under way (resumable)
    $XDG_CACHE_HOME/smr/snapshots/<ns>/<model>/<version>/…  relative symlinks to blobs

A blob enters the cache only once its SHA-256 matched, under its digest's name, so versions
that share a file share its blob and a second pull downloads nothing twice.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

from smr import config

HEX = re.compile(r"^[0-9a-f]{64}$")
HASH_CHUNK = 1 << 20
PARTIAL = ".partial"


def root() -> Path:
    return config.cache_dir()


def blobs_dir() -> Path:
    return root() / "blobs" / "sha256"


def snapshots_dir() -> Path:
    return root() / "snapshots"


def blob_path(sha256: str) -> Path:
    if not HEX.match(sha256):
        raise ValueError(f"not a SHA-256 hex digest: {sha256!r}")
    return blobs_dir() / sha256


def _stamp_path(sha256: str) -> Path:
    return blobs_dir() / f"{sha256}.ok"


def _stamp(stat: os.stat_result) -> dict[str, int]:
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "ino": stat.st_ino}


def blob_verified(sha256: str) -> None:
    """Record that the blob's bytes matched its name, with its size, mtime and inode: while
    they stay the same, the blob is trusted without hashing it again (as git trusts its
    index). A blob is also reachable through the snapshot's links and the hard links of
    `smr pull ... DEST`, so an edit there changes the stamp and the blob is checked again."""
    path = _stamp_path(sha256)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(_stamp(blob_path(sha256).stat())))
    os.replace(tmp, path)


def blob_trusted(sha256: str, size: int) -> bool:
    """Whether the blob is there, of `size` bytes, unchanged since it was last verified."""
    try:
        stat = blob_path(sha256).stat()
        recorded = json.loads(_stamp_path(sha256).read_text())
    except (OSError, ValueError):
        return False
    return stat.st_size == size and recorded == _stamp(stat)


def blob_exists(sha256: str, size: int) -> bool:
    try:
        return blob_path(sha256).stat().st_size == size
    except OSError:
        return False


def blob_remove(sha256: str) -> None:
    for path in (blob_path(sha256), _stamp_path(sha256)):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def snapshot_path(namespace: str, model: str, number: int) -> Path:
    return snapshots_dir() / namespace / model / str(number)


def link_into_snapshot(snapshot: Path, relpath: str, sha256: str) -> Path:
    """Point snapshot/relpath at the blob (a relative symlink, replaced atomically)."""
    target = snapshot / relpath
    target.parent.mkdir(parents=True, exist_ok=True)
    link = os.path.relpath(blob_path(sha256), target.parent)
    tmp = target.parent / f".smr-link-{os.getpid()}-{target.name}"
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    os.symlink(link, tmp)
    os.replace(tmp, target)
    return target


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _blobs() -> list[Path]:
    folder = blobs_dir()
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if HEX.match(p.name) and p.is_file())


def _snapshots() -> list[tuple[str, Path]]:
    """(ns/model:version, folder) of every snapshot."""
    out: list[tuple[str, Path]] = []
    base = snapshots_dir()
    if not base.is_dir():
        return out
    for ns in sorted(p for p in base.iterdir() if p.is_dir()):
        for model in sorted(p for p in ns.iterdir() if p.is_dir()):
            for version in sorted(p for p in model.iterdir() if p.is_dir()):
                out.append((f"{ns.name}/{model.name}:{version.name}", version))
    return out


def _links(snapshot: Path) -> list[Path]:
    return sorted(p for p in snapshot.rglob("*") if p.is_symlink())


def _linked_blobs() -> set[str]:
    linked = set()
    for _, snapshot in _snapshots():
        for link in _links(snapshot):
            name = Path(os.readlink(link)).name
            if HEX.match(name):
                linked.add(name)
    return linked


def cache_ls() -> dict[str, Any]:
    """The cache's snapshots (files, bytes) and blobs (count, bytes), and partial downloads."""
    snapshots = []
    for name, folder in _snapshots():
        links = _links(folder)
        present = [p for p in links if p.exists()]
        snapshots.append(
            {
                "ref": name,
                "path": str(folder),
                "files": len(links),
                "missing": len(links) - len(present),
                "bytes": sum(p.stat().st_size for p in present),
            }
        )
    blobs = _blobs()
    folder = blobs_dir()
    partials = sorted(folder.glob(f"*{PARTIAL}")) if folder.is_dir() else []
    return {
        "path": str(root()),
        "snapshots": snapshots,
        "blobs": {"count": len(blobs), "bytes": sum(p.stat().st_size for p in blobs)},
        "partial": [{"sha256": p.name[:64], "bytes": p.stat().st_size} for p in partials],
    }


def cache_verify(*, remove: bool = True) -> dict[str, Any]:
    """Re-hash every blob against its name. Corrupt ones are listed under `bad` and (unless
    `remove` is False) deleted, so the next pull downloads them again."""
    checked, bad = 0, []
    for blob in _blobs():
        checked += 1
        actual = _sha256(blob)
        if actual == blob.name:
            blob_verified(blob.name)
        else:
            bad.append({"sha256": blob.name, "actual": actual, "path": str(blob)})
            if remove:
                blob_remove(blob.name)
    return {"checked": checked, "ok": checked - len(bad), "bad": bad, "removed": remove and bad}


def cache_prune(*, older_than_days: float | None = None) -> dict[str, Any]:
    """Delete snapshots not used for `older_than_days` (when given) and partial downloads as
    old, broken snapshot links, then every blob no snapshot links to."""
    removed_snapshots = []
    if older_than_days is not None:
        cutoff = time.time() - older_than_days * 86400
        for name, folder in _snapshots():
            if folder.stat().st_mtime < cutoff:
                shutil.rmtree(folder)
                removed_snapshots.append(name)
        folder = blobs_dir()
        for partial in folder.glob(f"*{PARTIAL}*") if folder.is_dir() else []:
            if partial.stat().st_mtime < cutoff:
                partial.unlink()
    broken = 0
    for _, snapshot in _snapshots():
        for link in _links(snapshot):
            if not link.exists():
                link.unlink()
                broken += 1
    linked = _linked_blobs()
    removed, freed = [], 0
    for blob in _blobs():
        if blob.name not in linked:
            freed += blob.stat().st_size
            blob_remove(blob.name)
            removed.append(blob.name)
    folder = blobs_dir()
    for stamp in folder.glob("*.ok") if folder.is_dir() else []:
        if not (folder / stamp.name.removesuffix(".ok")).exists():
            stamp.unlink()
    return {
        "removed_blobs": removed,
        "freed_bytes": freed,
        "removed_snapshots": removed_snapshots,
        "removed_links": broken,
    }
