"""Shared plumbing for the benchmarks: JSON-line output, test data, child processes, servers.

Every figure is printed as one JSON object per line on stdout and appended to the results file
that run.py opens (bench-results/<timestamp>.jsonl). Servers run as real processes in their own
process groups and are always torn down, with their temporary folders, even on failure.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import requests

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = ROOT / ".venv" / "bin"
PYTHON = str(VENV_BIN / "python") if (VENV_BIN / "python").exists() else sys.executable
GUNICORN = str(VENV_BIN / "gunicorn")
MIB = 1 << 20
PATTERN_SIZE = 8 * MIB
REGION = "us-east-1"
BENCH_DB_NAME = "smr_bench"
BENCH_NAMESPACE = "bench"

# --- output ----------------------------------------------------------------------------------

_results_path: Path | None = None
_records: list[dict[str, Any]] = []


def set_results_file(path: Path | None) -> None:
    global _results_path
    _results_path = path
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)


def emit(record: dict[str, Any]) -> dict[str, Any]:
    """Print one JSON line and append it to the results file."""
    line = json.dumps(record, sort_keys=False)
    print(line, flush=True)
    if _results_path is not None:
        with _results_path.open("a") as out:
            out.write(line + "\n")
    _records.append(record)
    return record


def records() -> list[dict[str, Any]]:
    return list(_records)


def log(message: str) -> None:
    """Progress goes to stderr so stdout stays pure JSON lines."""
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def rate(size_bytes: int, seconds: float) -> float:
    return round(size_bytes / MIB / seconds, 1) if seconds > 0 else float("inf")


def ratio_record(name: str, value: float, target: float, *, at_most: bool = False, **extra):
    ok = value <= target if at_most else value >= target
    return emit(
        {
            "bench": name,
            "ratio": round(value, 3),
            "target": f"{'<=' if at_most else '>='}{target}",
            "ok": ok,
            **extra,
        }
    )


# --- test data -------------------------------------------------------------------------------


class Pattern:
    """`size` bytes made of one random 8 MiB buffer repeated: never the whole thing in memory."""

    _digests: dict[tuple[int, int], str] = {}  # cache keyed by (id(buffer), size)

    def __init__(self, seed: bytes | None = None) -> None:
        self.buffer = seed if seed is not None else os.urandom(PATTERN_SIZE)
        self.view = memoryview(self.buffer)

    def chunks(self, size: int, chunk: int = PATTERN_SIZE) -> Iterator[memoryview]:
        """Views into the pattern buffer, `chunk` bytes each (chunk divides PATTERN_SIZE)."""
        assert PATTERN_SIZE % chunk == 0
        left = size
        offset = 0
        while left > 0:
            n = min(chunk, left, PATTERN_SIZE - offset)
            yield self.view[offset : offset + n]
            left -= n
            offset = (offset + n) % PATTERN_SIZE

    def sha256(self, size: int) -> str:
        key = (id(self.buffer), size)
        if key not in self._digests:
            digest = hashlib.sha256()
            for view in self.chunks(size):
                digest.update(view)
            self._digests[key] = digest.hexdigest()
        return self._digests[key]

    def body(self, size: int) -> PatternBody:
        return PatternBody(self, size)

    def reader(self, size: int) -> PatternReader:
        return PatternReader(self, size)


class PatternBody:
    """Iterable with a length: requests sends Content-Length and hands urllib3 our 8 MiB
    views, which go straight to socket.sendall (no read(16 KiB) loop, no copies)."""

    def __init__(self, pattern: Pattern, size: int) -> None:
        self._pattern = pattern
        self._size = size
        # perf_counter() when the last byte went into the socket: what follows until the
        # response is the server finishing up (fsync, multipart complete, DB commit).
        self.sent_at: float | None = None

    def __len__(self) -> int:
        return self._size

    def __iter__(self) -> Iterator[memoryview]:
        yield from self._pattern.chunks(self._size)
        self.sent_at = time.perf_counter()


class PatternReader:
    """A non-seekable, read-only file-like object over the pattern stream (for boto3)."""

    def __init__(self, pattern: Pattern, size: int) -> None:
        self._pattern = pattern
        self._left = size
        self._offset = 0

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            n = self._left
        n = min(n, self._left)
        parts = []
        while n > 0:
            take = min(n, PATTERN_SIZE - self._offset)
            parts.append(self._pattern.view[self._offset : self._offset + take])
            self._offset = (self._offset + take) % PATTERN_SIZE
            self._left -= take
            n -= take
        return b"".join(parts)


class HashingSink:
    """Write-only, non-seekable sink: boto3 hands it the object in order."""

    def __init__(self) -> None:
        self.digest = hashlib.sha256()
        self.size = 0

    def write(self, data) -> int:
        self.digest.update(data)
        self.size += len(data)
        return len(data)


# --- processes -------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_group(argv: list[str], *, env: dict[str, str], log_path: Path) -> subprocess.Popen:
    """Start argv in its own process group, output to log_path."""
    out = log_path.open("ab")
    try:
        return subprocess.Popen(  # fixed argv, no shell
            argv,
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    finally:
        out.close()


def stop_group(proc: subprocess.Popen | None, *, timeout: float = 15) -> None:
    """SIGTERM the process group, then SIGKILL whatever is left of it."""
    if proc is None:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=timeout)
    # Children (gunicorn workers) can outlive the leader: kill the whole group regardless.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)


def tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def wait_http(url: str, proc: subprocess.Popen, log_path: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            requests.get(url, timeout=2)
            return
        # A timeout is a server still starting on a loaded machine: not up yet.
        except (requests.ConnectionError, requests.Timeout):
            if proc.poll() is not None:
                raise RuntimeError(f"{url}: process exited\n{tail(log_path)}") from None
            if time.monotonic() > deadline:
                raise RuntimeError(f"{url}: not up after {timeout}s\n{tail(log_path)}") from None
            time.sleep(0.2)


def run_checked(argv: list[str], *, env: dict[str, str], timeout: float = 300) -> str:
    result = subprocess.run(  # fixed argv, no shell
        argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(
            f"{' '.join(argv)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
        )
    return result.stdout


# --- database --------------------------------------------------------------------------------

_pg_ready: dict[str, bool] = {}
_pg_failed: list[str] = []


def bench_database_url() -> str | None:
    """PostgreSQL database smr_bench next to $DATABASE_URL's, or None to use SQLite
    (no PostgreSQL DATABASE_URL, or preparing smr_bench failed earlier in this run)."""
    url = os.environ.get("DATABASE_URL", "")
    if _pg_failed or not url.startswith(("postgres://", "postgresql://")):
        return None
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit(parts._replace(path="/" + BENCH_DB_NAME))


def ensure_pg_database(url: str, env: dict[str, str]) -> None:
    """Create smr_bench if missing and migrate it, once per process."""
    if _pg_ready.get(url):
        return
    import psycopg

    parts = urllib.parse.urlsplit(url)
    admin = urllib.parse.urlunsplit(parts._replace(path="/postgres"))
    with psycopg.connect(admin, autocommit=True) as conn:
        exists = conn.execute(
            "SELECT 1 FROM pg_database WHERE datname = %s", (BENCH_DB_NAME,)
        ).fetchone()
        if not exists:
            conn.execute(f'CREATE DATABASE "{BENCH_DB_NAME}"')
    run_checked([PYTHON, "manage.py", "migrate", "--no-input", "-v", "0"], env=env)
    _pg_ready[url] = True


# --- servers ---------------------------------------------------------------------------------


def gunicorn_conf() -> str:
    """deploy/gunicorn.conf.py, or $BENCH_GUNICORN_CONF to try a variant (e.g. with hooks)."""
    return os.environ.get("BENCH_GUNICORN_CONF") or "deploy/gunicorn.conf.py"


class ChildProcess:
    """A server child process in its own process group, with a temp folder; close() always
    stops the group and removes the folder."""

    proc: subprocess.Popen | None = None
    tmp: Path | None = None

    def close(self) -> None:
        try:
            stop_group(self.proc)
        finally:
            self.proc = None
            if self.tmp is not None:
                shutil.rmtree(self.tmp, ignore_errors=True)
                self.tmp = None


class Registry(ChildProcess):
    """A real registry: gunicorn with deploy/gunicorn.conf.py, a fresh SMR_VAR_DIR, a token."""

    def __init__(self, *, store_env: dict[str, str] | None = None, workers: int | None = None):
        self.store_env = store_env or {}
        self.workers = workers
        self.tmp: Path | None = None
        self.proc: subprocess.Popen | None = None
        self.base = ""
        self.token = ""
        self.db = ""
        self.env: dict[str, str] = {}

    def __enter__(self) -> Registry:
        self.tmp = Path(tempfile.mkdtemp(prefix="smr-bench-"))
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        if exc_type is not None and self.tmp is not None:
            log(f"server log (last lines):\n{tail(self.tmp / 'gunicorn.log')}")
        self.close()

    def _env(self) -> dict[str, str]:
        assert self.tmp is not None
        env = dict(os.environ)
        env.pop("DJANGO_SETTINGS_MODULE", None)
        env.update(
            {
                "SMR_VAR_DIR": str(self.tmp / "var"),
                "SECRET_KEY": "bench-" + uuid.uuid4().hex,
                "SMR_STORAGE": "fs",
                "SMR_OBJECTS_DIR": str(self.tmp / "objects"),
                "SMR_KEY_PROVIDER": "local",
                "LOG_LEVEL": "WARNING",
                "PYTHONUNBUFFERED": "1",
            }
        )
        pg = bench_database_url()
        env["DATABASE_URL"] = pg or self.sqlite_url()
        self.db = "postgresql" if pg else "sqlite"
        if self.workers is not None:
            env["WEB_CONCURRENCY"] = str(self.workers)
        env.update(self.store_env)
        return env

    def sqlite_url(self) -> str:
        assert self.tmp is not None
        return f"sqlite:///{self.tmp / 'registry.sqlite3'}"

    def _start(self) -> None:
        assert self.tmp is not None
        env = self._env()
        (self.tmp / "var").mkdir()
        if self.db == "postgresql":
            try:
                ensure_pg_database(env["DATABASE_URL"], env)
            except Exception as exc:
                # The transfer figures barely touch the database: rather than lose the run,
                # measure on SQLite and say so (every figure carries its "db").
                reason = str(exc).strip().splitlines()[-1][:300]
                _pg_failed.append(reason)
                emit(
                    {
                        "bench": "note",
                        "db": "sqlite",
                        "message": f"PostgreSQL smr_bench unusable, using SQLite: {reason}",
                    }
                )
                env["DATABASE_URL"] = self.sqlite_url()
                self.db = "sqlite"
        if self.db == "sqlite":
            run_checked([PYTHON, "manage.py", "migrate", "--no-input", "-v", "0"], env=env)
        self.token = (
            run_checked(
                [
                    PYTHON,
                    "manage.py",
                    "issue_token",
                    "bench",
                    "--namespace",
                    BENCH_NAMESPACE,
                    "--role",
                    "admin",
                    "--scopes",
                    "read,write,admin",
                    "--name",
                    "bench",
                ],
                env=env,
            )
            .strip()
            .splitlines()[-1]
        )
        # Generate the keyring before the workers start, so they never race to create it.
        run_checked(
            [
                PYTHON,
                "manage.py",
                "shell",
                "-c",
                "from registry.keyconfig import local_keyring; local_keyring()",
            ],
            env=env,
        )
        self.env = env  # what the server runs with, for manage.py calls beside it
        port = free_port()
        self.log_path = self.tmp / "gunicorn.log"
        self.proc = start_group(
            [
                GUNICORN,
                "registry.wsgi:application",
                "-c",
                gunicorn_conf(),
                "--bind",
                f"127.0.0.1:{port}",
            ],
            env=env,
            log_path=self.log_path,
        )
        self.base = f"http://127.0.0.1:{port}"
        wait_http(f"{self.base}/healthz", self.proc, self.log_path)

    @property
    def master_pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def headers(self, **extra: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}", **extra}

    def new_version(self, session: requests.Session) -> str:
        """Create a fresh model + draft version; returns its files URL."""
        name = f"m-{uuid.uuid4().hex[:12]}"
        api = f"{self.base}/api/v1/namespaces/{BENCH_NAMESPACE}/models"
        r = session.post(api, json={"name": name}, headers=self.headers(), timeout=30)
        check(r, 201)
        r = session.post(f"{api}/{name}/versions", json={}, headers=self.headers(), timeout=30)
        check(r, 201)
        number = r.json()["number"]
        return f"{api}/{name}/versions/{number}/files"


class MotoServer(ChildProcess):
    """moto's S3 server in its own process group, on a free loopback port."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None
        self.tmp: Path | None = None
        self.url = ""

    def __enter__(self) -> MotoServer:
        self.tmp = Path(tempfile.mkdtemp(prefix="smr-bench-moto-"))
        try:
            port = free_port()
            env = dict(os.environ)
            env.update(moto_credentials())
            log_path = self.tmp / "moto.log"
            self.proc = start_group(
                [PYTHON, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                env=env,
                log_path=log_path,
            )
            self.url = f"http://127.0.0.1:{port}"
            wait_http(f"{self.url}/moto-api/", self.proc, log_path)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def moto_credentials() -> dict[str, str]:
    return {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": REGION,
    }


def check(response: requests.Response, status: int) -> None:
    if response.status_code != status:
        raise RuntimeError(
            f"{response.request.method} {response.url}: expected {status}, got "
            f"{response.status_code}: {response.text[:500]}"
        )


# --- memory ----------------------------------------------------------------------------------


def vm_hwm_mib(pid: int) -> float | None:
    """Peak resident set size of a live process (VmHWM), in MiB."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None


class RssSampler:
    """Samples the RSS of a process's children every `interval` s in a thread; keeps the max."""

    def __init__(self, parent_pid: int, interval: float = 0.05) -> None:
        self.parent = psutil.Process(parent_pid)
        self.interval = interval
        self.peak_bytes = 0
        self.pids: set[int] = set()
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _children(self) -> list[psutil.Process]:
        try:
            return self.parent.children(recursive=True)
        except psutil.Error:
            return []

    def _run(self) -> None:
        while not self._stop.is_set():
            for child in self._children():
                try:
                    rss = child.memory_info().rss
                except psutil.Error:
                    continue
                self.pids.add(child.pid)
                self.peak_bytes = max(self.peak_bytes, rss)
            self.samples += 1
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def hwm_mib(self) -> float | None:
        """Max VmHWM over the live children (call before the server stops)."""
        values = [v for c in self._children() if (v := vm_hwm_mib(c.pid)) is not None]
        return max(values) if values else None

    @property
    def peak_mib(self) -> float:
        return round(self.peak_bytes / MIB, 1)


# --- peers ------------------------------------------------------------------------------------


def default_peers_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "smr-bench" / "peers"


def peer_venv(name: str, specs: list[str], peers_dir: Path, *, exe: str | None = None) -> Path:
    """A peer's CLI `exe` (default `name`) in its own venv peers_dir/name, with `specs`
    pip-installed: created on first use and kept (never in the project's venv)."""
    venv = peers_dir / name
    cli = venv / "bin" / (exe or name)
    marker = venv / "smr-bench-spec"
    spec = " ".join(specs)
    if cli.exists() and marker.exists() and marker.read_text() == spec:
        return cli
    log(f"installing {spec} into {venv} (kept for later runs)")
    shutil.rmtree(venv, ignore_errors=True)
    venv.parent.mkdir(parents=True, exist_ok=True)
    python = shutil.which("python3") or sys.executable
    env = dict(os.environ)
    run_checked([python, "-m", "venv", str(venv)], env=env)
    run_checked([str(venv / "bin" / "pip"), "install", "-q", *specs], env=env, timeout=1800)
    if not cli.exists():
        raise RuntimeError(f"{name}: no {cli} after pip install")
    marker.write_text(spec)
    return cli
