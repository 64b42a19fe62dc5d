"""File-system helpers shared by the keyring and the object store (no Django here)."""

from __future__ import annotations

import os
from pathlib import Path


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Flush a directory's entries to disk, so a rename or link made in it survives a crash.

    Without this, a crash right after os.replace/os.link can lose the new directory entry even
    though the file's own data was fsynced. Raises OSError like os.fsync does; callers decide
    whether a failure matters.
    """
    fd = os.open(Path(path), os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
