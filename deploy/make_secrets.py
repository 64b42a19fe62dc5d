#!/usr/bin/env python3
"""Generate the secret files deploy/compose.yaml mounts (local/dev use only).

    python3 deploy/make_secrets.py            # writes deploy/secrets/*, keeps existing files
    python3 deploy/make_secrets.py --out DIR  # somewhere else

Existing files are never overwritten: the keyring is the only copy of the keys that protect
every stored artifact, and the database password must keep matching the initialised volume.
Standard library only, so it runs with any python3 on the host.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import secrets
import sys
from datetime import UTC, datetime
from pathlib import Path

DB_USER = "smr"
DB_NAME = "smr"
MINIO_ROOT_USER = "smr-minio-admin"


def keyring_document() -> str:
    # Format of registry.crypto.keys.LocalKeyring: version 1, primary "k1", 32-byte keys.
    entry = {
        "key": base64.b64encode(secrets.token_bytes(32)).decode("ascii"),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    doc = {"version": 1, "primary": "k1", "keys": {"k1": entry}}
    return json.dumps(doc, indent=2, sort_keys=True) + "\n"


def write(path: Path, content: str) -> bool:
    if path.exists():
        return False
    # 0644 inside a 0700 directory: other host users cannot reach it, while the container user
    # (uid 10001) can read the bind-mounted file (non-swarm compose ignores secret uid/mode).
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(content)
    os.chmod(path, 0o644)
    return True


def generate(out: Path) -> list[str]:
    out.mkdir(parents=True, exist_ok=True)
    os.chmod(out, 0o700)
    pg_password_file = out / "postgres_password"
    if pg_password_file.exists():
        pg_password = pg_password_file.read_text().strip()
    else:
        pg_password = secrets.token_urlsafe(24)  # URL-safe: embedded in DATABASE_URL as-is
    files = {
        "secret_key": secrets.token_urlsafe(50),
        "postgres_password": pg_password,
        "database_url": f"postgres://{DB_USER}:{pg_password}@postgres:5432/{DB_NAME}",
        "minio_root_user": MINIO_ROOT_USER,
        "minio_root_password": secrets.token_urlsafe(24),
        "s3_secret_access_key": secrets.token_urlsafe(30),
        "keyring.json": keyring_document(),
    }
    written = []
    for name, content in files.items():
        if write(out / name, content if content.endswith("\n") else content + "\n"):
            written.append(name)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "secrets")
    args = parser.parse_args(argv)
    written = generate(args.out)
    for name in written:
        print(f"wrote {args.out / name}")
    if "keyring.json" in written:
        print(
            "A new keyring was generated: back it up. Losing it makes every artifact "
            "encrypted under it unrecoverable.",
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
