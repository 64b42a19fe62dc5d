"""Embedded mode (`make run`): the files it needs, created on purpose and never at import.

`manage.py demo_setup` calls `embedded_prepare()` before gunicorn and Celery start, so every
process reads the same SECRET_KEY file. The Celery app also creates the broker folders on first
use (`broker_folders_ensure`), for a worker started by hand. Everything is private to the user
that runs the server: folders 0700, files 0600, whatever the umask.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any

BROKER_FOLDER_OPTIONS = ("data_folder_in", "data_folder_out", "control_folder", "processed_folder")


def private_dir_ensure(path: Path) -> None:
    """mkdir -p, with every folder it creates 0700 (mkdir's parents get the umask's mode)."""
    missing = [p for p in (path, *path.parents) if not p.exists()]
    for folder in reversed(missing):
        with contextlib.suppress(FileExistsError):
            folder.mkdir(mode=0o700)


def secret_key_ensure(path: Path) -> bool:
    """Create the SECRET_KEY file (0600) unless it exists; True if this call created it.

    Written to a temporary name and linked into place, so that a process starting at the same
    time sees either no file or the whole key, and two creators cannot overwrite each other.
    """
    if path.exists():
        return False
    private_dir_ensure(path.parent)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_urlsafe(50) + "\n")
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        return True
    finally:
        tmp.unlink()


def broker_folders_ensure(options: Mapping[str, Any]) -> None:
    """Create the folders kombu's filesystem transport needs (it creates none of its parents)."""
    for key in BROKER_FOLDER_OPTIONS:
        if options.get(key):
            private_dir_ensure(Path(options[key]))


def sqlite_file_ensure(database: Mapping[str, Any]) -> None:
    """Create the SQLite file 0600 before migrate would create it world-readable (umask 022).

    An existing file is tightened too (installs from before this existed).
    """
    name = str(database.get("NAME") or "")
    if database.get("ENGINE") != "django.db.backends.sqlite3" or name in {"", ":memory:"}:
        return
    path = Path(name)
    private_dir_ensure(path.parent)
    with contextlib.suppress(FileExistsError):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    # SQLite gives its -wal/-shm/-journal files the database file's mode.
    path.chmod(0o600)


def embedded_prepare() -> None:
    """Everything `make run` needs on disk before any server process starts. Idempotent."""
    from django.conf import settings

    private_dir_ensure(settings.VAR_DIR)
    if not settings.SMR_PRODUCTION:  # production requires SECRET_KEY and never reads the file
        secret_key_ensure(settings.EMBEDDED_SECRET_KEY_FILE)
    for key_file in (settings.SMR_KEYRING_FILE, settings.SMR_AUDIT_SIGNING_KEY_FILE):
        if key_file.parent.is_relative_to(settings.VAR_DIR):
            private_dir_ensure(key_file.parent)  # the keys are generated there on first use
    if settings.CELERY_BROKER_URL == "filesystem://":
        broker_folders_ensure(settings.CELERY_BROKER_TRANSPORT_OPTIONS)
    sqlite_file_ensure(settings.DATABASES["default"])
