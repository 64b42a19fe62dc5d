"""The registry under gunicorn in a child process, for tests that need a real server."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[2]


def database_url(settings_dict: dict, *, host: str | None = None, port: int | None = None) -> str:
    """A DATABASE_URL for the test database, optionally reached through another host:port."""
    user = settings_dict["USER"]
    password = f":{settings_dict['PASSWORD']}" if settings_dict.get("PASSWORD") else ""
    where = (
        f"{host or settings_dict['HOST'] or '127.0.0.1'}:{port or settings_dict['PORT'] or 5432}"
    )
    return f"postgres://{user}{password}@{where}/{settings_dict['NAME']}"


class Server:
    """gunicorn on a free loopback port; stop() ends its whole process group."""

    def __init__(self, tmp: Path, env: dict[str, str], *, threads: int = 4) -> None:
        from tests.conftest import free_port

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tmp / "server.log"
        self.env = dict(os.environ)
        self.env.pop("DJANGO_SETTINGS_MODULE", None)
        self.env.update(
            {
                "SMR_VAR_DIR": str(tmp / "var"),
                "SMR_OBJECTS_DIR": str(tmp / "objects"),
                "SMR_KEYRING_FILE": str(tmp / "keys" / "keyring.json"),
                "SMR_AUDIT_SIGNING_KEY_FILE": str(tmp / "keys" / "audit-ed25519.pem"),
                "SECRET_KEY": "test-server-" + os.urandom(16).hex(),
                "LOG_LEVEL": "WARNING",
                "PYTHONUNBUFFERED": "1",
            }
        )
        self.env.update(env)
        self.threads = threads
        self.proc: subprocess.Popen | None = None

    def start(self) -> Server:
        argv = [sys.executable, "-m", "gunicorn", "registry.wsgi:application"]
        argv += [
            "--bind",
            f"127.0.0.1:{self.port}",
            "--workers",
            "1",
            "--threads",
            str(self.threads),
        ]
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                argv,
                cwd=ROOT,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + 60
        while True:
            try:
                requests.get(f"{self.url}/healthz", timeout=2)
                return self
            # A timeout is a server still starting on a loaded machine: not up yet.
            except (requests.ConnectionError, requests.Timeout):
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"server did not start:\n{self.tail()}") from None
                time.sleep(0.2)

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=15)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=15)
        self.proc = None

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
