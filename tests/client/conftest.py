"""Shared fixtures of the client tests: a live registry (gunicorn in a child process, on the test
database), acme's actors with their tokens, and the real `smr` command run in a subprocess.

    def test_x(registry_server, tokens, smr_env):
        env = smr_env(tokens["alice"])          # SMR_URL, SMR_TOKEN, XDG_* dirs of its own
        result = run_smr(["ls", "acme/bert"], env)

`run_smr`, `popen_smr` and the version helpers (`approve`, ...) are plain functions: import
them from tests.client.conftest. Nothing here mocks the server.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.conftest import Actors
from tests.support.server import Server, database_url

API = "/api/v1"
# The console script the client's pyproject installs; `python -m smr.cli` where it is missing.
SMR_SCRIPT = Path(sys.executable).parent / "smr"


@pytest.fixture
def actors(transactional_db) -> Actors:
    """acme's root (admin), alice (contributor), bob (reviewer), carol (viewer), dave
    (auditor); mallory administers evil. Committed rows: the server process sees them."""
    return Actors()


@pytest.fixture
def tokens(actors: Actors) -> dict[str, str]:
    """username -> a token with every scope (read, write, review, admin)."""
    return dict(actors.tokens)


@pytest.fixture
def registry_server(actors: Actors, tmp_path: Path) -> Iterator[Server]:
    """The registry under gunicorn on a free loopback port (`.url`), on the test database.

    It shares this process's object folder and keyring (tmp_path/objects, tmp_path/keys), so a
    test can run a version's scan and sign jobs in-process (`approve`). Rate limits are raised:
    a push of many parts must not meet the upload throttle.
    """
    from django.db import connection

    env = {
        "DATABASE_URL": database_url(connection.settings_dict),
        "SMR_RATE_UPLOAD": "100000/min",
    }
    server = Server(tmp_path, env, threads=8)
    try:
        _start(server)
        yield server
    finally:
        server.stop()


def _start(server: Server) -> None:
    # Server.start waits 2 s per health check; on a loaded machine the first request (Django's
    # lazy start-up) can take longer, which is a slow start, not a failure.
    deadline = time.monotonic() + 120
    try:
        server.start()
        return
    except requests.Timeout:
        pass
    while True:
        try:
            requests.get(f"{server.url}/healthz", timeout=10)
            return
        except requests.RequestException:
            if time.monotonic() > deadline or (server.proc and server.proc.poll() is not None):
                raise RuntimeError(f"server did not start:\n{server.tail()}") from None
            time.sleep(0.5)


def make_env(url: str, token: str | None, home: Path) -> dict[str, str]:
    """The environment of an `smr` subprocess: the registry, the token (SMR_TOKEN, never argv)
    and config, cache and state folders under `home` (nothing from the real home)."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SMR_", "XDG_", "DJANGO_")) and k != "DATABASE_URL"
    }
    env.update(
        {
            "HOME": str(home),
            "SMR_URL": url,
            "XDG_CONFIG_HOME": str(home / "config"),
            "XDG_CACHE_HOME": str(home / "cache"),
            "XDG_STATE_HOME": str(home / "state"),
            "PYTHONUNBUFFERED": "1",
        }
    )
    if token is not None:
        env["SMR_TOKEN"] = token
    for name in ("config", "cache", "state"):
        (home / name).mkdir(parents=True, exist_ok=True)
    return env


@pytest.fixture
def smr_env(registry_server: Server, tmp_path: Path) -> Callable[..., dict[str, str]]:
    """`smr_env(token, home=None)`: the env dict of an `smr` run against `registry_server`.

    Without `home`, every call gets tmp_path/"smr-home" (one user's config, cache and state
    across runs, as on a real machine); pass another folder to act as a second machine.
    """

    def build(token: str | None, home: Path | None = None) -> dict[str, str]:
        return make_env(registry_server.url, token, home or tmp_path / "smr-home")

    return build


def smr_argv(args: Sequence[str]) -> list[str]:
    if SMR_SCRIPT.exists():
        return [str(SMR_SCRIPT), *args]
    return [sys.executable, "-m", "smr.cli", *args]


def run_smr(
    args: Sequence[str],
    env: dict[str, str],
    input: str | bytes | None = None,
    *,
    timeout: float = 300,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run the real `smr` with `args`; stdout and stderr captured as text."""
    return subprocess.run(
        smr_argv(args),
        env=env,
        input=input.decode() if isinstance(input, bytes) else input,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        check=False,
    )


def popen_smr(
    args: Sequence[str], env: dict[str, str], *, cwd: Path | None = None
) -> subprocess.Popen[str]:
    """Start `smr` without waiting (to interrupt it): stdout/stderr are pipes."""
    return subprocess.Popen(
        smr_argv(args),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=cwd,
    )


# --- Versions through their states ---------------------------------------------------------


def api(server: Server, token: str, method: str, path: str, **kwargs: Any) -> requests.Response:
    """One API request as the token's user (no client code involved)."""
    return requests.request(
        method,
        f"{server.url}{API}{path}",
        headers={"Authorization": f"Bearer {token}"},
        timeout=120,
        **kwargs,
    )


def model_create(server: Server, token: str, ns: str, model: str) -> None:
    response = api(server, token, "POST", f"/namespaces/{ns}/models", json={"name": model})
    assert response.status_code == 201, response.text


def scan(ns: str, model: str, number: int) -> str:
    """Run the scan job of a submitted version in-process (the worker's service); its state."""
    from registry.models import Job, JobKind, ModelVersion
    from registry.services import scanning

    version = ModelVersion.objects.get(model__namespace__name=ns, model__name=model, number=number)
    job = Job.objects.filter(version=version, kind=JobKind.SCAN).order_by("-created_at").first()
    assert job is not None, f"{ns}/{model}:{number} has no scan job: submit it first"
    return str(scanning.version_scan(job_id=job.pk))


def sign(ns: str, model: str, number: int) -> None:
    """Run the sign job an approval queued, in-process: the registry signature exists after."""
    from registry.models import Job, JobKind, ModelVersion
    from registry.services import signatures

    version = ModelVersion.objects.get(model__namespace__name=ns, model__name=model, number=number)
    job = Job.objects.filter(version=version, kind=JobKind.SIGN).order_by("-created_at").first()
    assert job is not None, f"{ns}/{model}:{number} has no sign job: approve it first"
    assert signatures.version_sign(job_id=job.pk) is not None


def approve(
    server: Server,
    tokens: dict[str, str],
    ns: str,
    model: str,
    number: int,
    *,
    submit_as: str | None = "alice",
    reviewer: str = "bob",
) -> dict[str, Any]:
    """Submit (unless `submit_as` is None: already submitted), scan, approve as `reviewer`
    over HTTP, and sign: the version is approved and carries the registry's signature."""
    base = f"/namespaces/{ns}/models/{model}/versions/{number}"
    if submit_as is not None:
        response = api(server, tokens[submit_as], "POST", f"{base}/submit")
        assert response.status_code == 202, response.text
    assert scan(ns, model, number) == "pending_review"
    response = api(
        server, tokens[reviewer], "POST", f"{base}/reviews", json={"decision": "approve"}
    )
    assert response.status_code in (200, 201), response.text
    version: dict[str, Any] = response.json()["version"]
    assert version["state"] == "approved", version
    sign(ns, model, number)
    return version
