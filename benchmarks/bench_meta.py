"""Metadata calls against MLflow's tracking server, side by side in one run.

    .venv/bin/python benchmarks/bench_meta.py [--versions 1000] [--gets 500] [--lists 30]
        [--no-postgres] [--peers-dir DIR]

Servers: ours (gunicorn, deploy/gunicorn.conf.py, WEB_CONCURRENCY=2) on SQLite, and MLflow's
tracking server (`mlflow server --workers 2`, gunicorn) on SQLite; when $DATABASE_URL is a
PostgreSQL URL, ours on PostgreSQL (database smr_bench) too, for information. MLflow lives in
its own venv under --peers-dir (default ~/.cache/smr-bench/peers/mlflow, created on first use
and kept), never in the project's venv.

One raw-HTTP keep-alive client (http.client, one connection per server) calls the servers in
turn in the same loop, so every server sees the same machine load:
  create    N versions of one model on each (ours: POST .../versions {}; MLflow:
            model-versions/create {name, source})
  get       M reads of a random existing version
  list_all  K reads of all N versions (ours: ?limit=1000, following `next`; MLflow:
            model-versions/search?filter=name='m'&max_results=1000, following next_page_token)
  set_alias A moves of alias `champion` between two versions (ours: PUT .../aliases/champion
            {version} by a reviewer, an audited write, onto versions approved the real way
            beforehand: a file uploaded, submitted, scanned by the service a worker runs
            (manage.py shell beside the server), approved by that reviewer; MLflow:
            registered-models/alias {name, alias, version})
Reported per operation and server: median and p95 latency (ms), ops/s (calls / total time);
`meta_<op>_vs_mlflow`: ours (SQLite) ops/s / MLflow ops/s, target >= 2; `meta_list_all_p95`:
ours (SQLite) p95, target <= 50 ms. After the run, the numbers of version.create and alias.set
audit events in our database are checked against N and A (every write audited).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
import uuid
from pathlib import Path
from typing import Any

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))

import common
from common import BENCH_NAMESPACE, ChildProcess, Registry, emit, log

MLFLOW_SPEC = "mlflow==3.17.*"
TARGET_RATIO = 2.0
LIST_P95_TARGET_MS = 50.0
# A fresh name per run: the PostgreSQL database smr_bench is kept between runs.
MODEL = f"bench-meta-{uuid.uuid4().hex[:8]}"
ALIAS_MODEL = f"{MODEL}-aliased"


# --- the client --------------------------------------------------------------------------------


class Client:
    """One keep-alive HTTP/1.1 connection to one server (http.client: TCP_NODELAY, no pool).

    A server that closes after a response (Connection: close) is reconnected on the next
    call; `connects` counts the connections made, so a figure shows whether keep-alive held.
    """

    def __init__(self, base: str, headers: dict[str, str] | None = None) -> None:
        parts = urllib.parse.urlsplit(base)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 80
        self.headers = {"Accept": "application/json", **(headers or {})}
        self.conn = http.client.HTTPConnection(self.host, self.port, timeout=60)
        self.connects = 0

    def call(self, method: str, path: str, body: Any = None, expect: int = 200) -> Any:
        if body is None:
            return self.call_raw(method, path, None, expect=expect)
        return self.call_raw(method, path, json.dumps(body).encode(), "application/json", expect)

    def call_raw(
        self,
        method: str,
        path: str,
        data: bytes | None,
        content_type: str = "application/octet-stream",
        expect: int = 200,
    ) -> Any:
        headers = dict(self.headers)
        if data is not None:
            headers["Content-Type"] = content_type
        if self.conn.sock is None:
            self.conn.connect()
            self.connects += 1
        self.conn.request(method, path, body=data, headers=headers)
        response = self.conn.getresponse()
        payload = response.read()
        if response.will_close:
            self.conn.close()
        if response.status != expect:
            raise RuntimeError(f"{method} {path}: {response.status} {payload[:500]!r}")
        return json.loads(payload) if payload else None

    def close(self) -> None:
        self.conn.close()


# --- MLflow ------------------------------------------------------------------------------------


def mlflow_venv(peers_dir: Path) -> Path:
    """MLflow in its own venv under peers_dir, created on first use and kept."""
    return common.peer_venv("mlflow", [MLFLOW_SPEC], peers_dir)


def mlflow_version(exe: Path) -> str:
    code = "import importlib.metadata as m; print(m.version('mlflow'))"
    out = subprocess.run(  # fixed argv, no shell
        [str(exe.parent / "python"), "-c", code],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    return out.stdout.strip()


class MlflowServer(ChildProcess):
    """`mlflow server` on SQLite with 2 gunicorn workers, in its own process group."""

    def __init__(self, exe: Path, workers: int = 2) -> None:
        self.exe = exe
        self.workers = workers
        self.base = ""

    def __enter__(self) -> MlflowServer:
        self.tmp = Path(tempfile.mkdtemp(prefix="smr-bench-mlflow-"))
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        if exc_type is not None and self.tmp is not None:
            log(f"mlflow log (last lines):\n{common.tail(self.tmp / 'mlflow.log')}")
        self.close()

    def _start(self) -> None:
        assert self.tmp is not None
        port = common.free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
        env.update({"PYTHONUNBUFFERED": "1", "MLFLOW_DISABLE_TELEMETRY": "true"})
        env["DO_NOT_TRACK"] = "true"
        argv = [
            str(self.exe),
            "server",
            "--backend-store-uri",
            f"sqlite:///{self.tmp / 'mlflow.db'}",
            "--default-artifact-root",
            str(self.tmp / "artifacts"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            str(self.workers),
        ]
        argv += mlflow_server_extra(self.exe)
        log(" ".join(argv))
        self.log_path = self.tmp / "mlflow.log"
        self.proc = common.start_group(argv, env=env, log_path=self.log_path)
        self.base = f"http://127.0.0.1:{port}"
        wait_up(f"{self.base}/health", self.proc, self.log_path, timeout=180)


def wait_up(url: str, proc: subprocess.Popen, log_path: Path, timeout: float) -> None:
    """Like common.wait_http, but a read timeout (MLflow migrating its database) is retried."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            requests.get(url, timeout=10)
            return
        except requests.RequestException:
            if proc.poll() is not None:
                raise RuntimeError(f"{url}: process exited\n{common.tail(log_path)}") from None
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"{url}: not up after {timeout}s\n{common.tail(log_path)}"
                ) from None
            time.sleep(0.5)


def mlflow_server_extra(exe: Path) -> list[str]:
    """Options that make `mlflow server` run under gunicorn (not uvicorn) where it has both."""
    out = subprocess.run(  # fixed argv, no shell
        [str(exe), "server", "--help"], capture_output=True, text=True, check=False, timeout=120
    ).stdout
    extra: list[str] = []
    if "--gunicorn-opts" in out:
        # uvicorn with several workers pays ~40 ms of Nagle delay per keep-alive request
        # (DESIGN §11): the figures are for gunicorn, as the peer was measured.
        extra += ["--gunicorn-opts", "--log-level warning"]
    return extra


# --- the calls ---------------------------------------------------------------------------------


class Target:
    """A server under test and how each operation is called on it."""

    name = ""
    client: Client

    def setup(self) -> None:
        raise NotImplementedError

    def create(self) -> int:
        raise NotImplementedError

    def get(self, number: int) -> None:
        raise NotImplementedError

    def list_all(self) -> int:
        raise NotImplementedError

    def alias_setup(self) -> None:
        raise NotImplementedError

    def set_alias(self, number: int) -> None:
        raise NotImplementedError

    def warm(self) -> None:
        raise NotImplementedError


class Ours(Target):
    def __init__(self, name: str, reg: Registry) -> None:
        self.name = name
        self.reg = reg
        self.client = Client(reg.base, {"Authorization": f"Bearer {reg.token}"})
        self.api = f"/api/v1/namespaces/{BENCH_NAMESPACE}/models"
        self.versions = f"{self.api}/{MODEL}/versions"

    def setup(self) -> None:
        self.client.call("POST", self.api, {"name": MODEL}, expect=201)

    def warm(self) -> None:
        self.client.call("GET", f"{self.api}/{MODEL}")
        self.client.call("GET", f"{self.versions}?limit=10")

    def create(self) -> int:
        return int(self.client.call("POST", self.versions, {}, expect=201)["number"])

    def get(self, number: int) -> None:
        self.client.call("GET", f"{self.versions}/{number}")

    def alias_setup(self) -> None:
        """Versions 1 and 2 of a second model, approved as in production (see the docstring)."""
        models = self.api
        reviewer = self.reg.env.copy()
        argv = [common.PYTHON, "manage.py", "issue_token", "bench-reviewer", "--namespace"]
        argv += [BENCH_NAMESPACE, "--role", "reviewer", "--scopes", "read,review"]
        token = common.run_checked(argv, env=reviewer).strip().splitlines()[-1]
        review = Client(self.reg.base, {"Authorization": f"Bearer {token}"})
        self.client.call("POST", models, {"name": ALIAS_MODEL}, expect=201)
        self.aliased = f"{models}/{ALIAS_MODEL}"
        jobs = []
        for number in (1, 2):
            self.client.call("POST", f"{self.aliased}/versions", {}, expect=201)
            version = f"{self.aliased}/versions/{number}"
            self.client.call_raw("PUT", f"{version}/files/config.json", b'{"n": 1}', expect=201)
            jobs.append(self.client.call("POST", f"{version}/submit", expect=202)["job"]["id"])
        code = (
            "from registry.services import scanning\n"
            f"for job in {jobs!r}:\n"
            "    print(scanning.version_scan(job_id=job))"
        )
        out = common.run_checked(
            [common.PYTHON, "manage.py", "shell", "-c", code], env=self.reg.env
        )
        # The last two lines: Django's shell may first say what it imported.
        if out.split()[-2:] != ["pending_review", "pending_review"]:
            raise RuntimeError(f"scans: {out!r}")
        for number in (1, 2):
            body = {"decision": "approve", "comment": "bench"}
            out = review.call("POST", f"{self.aliased}/versions/{number}/reviews", body, 201)
            if out["version"]["state"] != "approved":
                raise RuntimeError(f"version {number}: {out['version']['state']}")
        # Reviewers move unprotected aliases (the default policy protects `production` only).
        self.reviewer = review

    def set_alias(self, number: int) -> None:
        self.reviewer.call("PUT", f"{self.aliased}/aliases/champion", {"version": number})

    def list_all(self) -> int:
        count = 0
        path: str | None = f"{self.versions}?limit=1000"
        while path:
            page = self.client.call("GET", path)
            count += len(page["results"])
            nxt = page.get("next")
            path = None
            if nxt:
                parts = urllib.parse.urlsplit(nxt)
                path = parts.path + ("?" + parts.query if parts.query else "")
        return count


class Mlflow(Target):
    def __init__(self, server: MlflowServer) -> None:
        self.name = "mlflow"
        self.client = Client(server.base)
        self.search = "/api/2.0/mlflow/model-versions/search?" + urllib.parse.urlencode(
            {"filter": f"name='{MODEL}'", "max_results": 1000}
        )

    def setup(self) -> None:
        self.client.call("POST", "/api/2.0/mlflow/registered-models/create", {"name": MODEL})

    def warm(self) -> None:
        q = urllib.parse.urlencode({"name": MODEL})
        self.client.call("GET", f"/api/2.0/mlflow/registered-models/get?{q}")
        self.client.call("GET", self.search.replace("max_results=1000", "max_results=10"))

    def create(self) -> int:
        body = {"name": MODEL, "source": f"s3://bench/{uuid.uuid4().hex}"}
        out = self.client.call("POST", "/api/2.0/mlflow/model-versions/create", body)
        return int(out["model_version"]["version"])

    def alias_setup(self) -> None:
        pass  # versions 1 and 2 of MODEL (MLflow aliases need no approval)

    def set_alias(self, number: int) -> None:
        body = {"name": MODEL, "alias": "champion", "version": str(number)}
        self.client.call("POST", "/api/2.0/mlflow/registered-models/alias", body)

    def get(self, number: int) -> None:
        q = urllib.parse.urlencode({"name": MODEL, "version": str(number)})
        self.client.call("GET", f"/api/2.0/mlflow/model-versions/get?{q}")

    def list_all(self) -> int:
        count = 0
        token = ""
        while True:
            path = self.search + (f"&page_token={urllib.parse.quote(token)}" if token else "")
            out = self.client.call("GET", path)
            count += len(out.get("model_versions", []))
            token = out.get("next_page_token", "")
            if not token:
                return count


def timed(fn, *args) -> tuple[float, Any]:
    start = time.perf_counter()
    result = fn(*args)
    return time.perf_counter() - start, result


def summary(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    p95 = ordered[min(len(ordered) - 1, max(0, round(0.95 * len(ordered)) - 1))]
    return {
        "median_ms": round(statistics.median(ordered) * 1000, 2),
        "p95_ms": round(p95 * 1000, 2),
        "ops_s": round(len(ordered) / sum(ordered), 1),
        "n": len(ordered),
    }


def run_ops(targets: list[Target], args: argparse.Namespace) -> dict[str, dict[str, list[float]]]:
    """Every operation, the targets called in turn in one loop; returns latencies in s."""
    times: dict[str, dict[str, list[float]]] = {t.name: {} for t in targets}
    for t in targets:
        t.setup()
        for _ in range(5):
            t.warm()
    log(f"create: {args.versions} versions on each of {[t.name for t in targets]}")
    for t in targets:
        times[t.name]["create"] = []
    for i in range(args.versions):
        for t in targets:
            elapsed, number = timed(t.create)
            if number != i + 1:
                raise RuntimeError(f"{t.name}: created version {number}, expected {i + 1}")
            times[t.name]["create"].append(elapsed)
    rng = random.Random(8)
    log(f"get: {args.gets} random versions")
    for t in targets:
        times[t.name]["get"] = []
    for _ in range(args.gets):
        number = rng.randint(1, args.versions)
        for t in targets:
            times[t.name]["get"].append(timed(t.get, number)[0])
    log(f"list_all: {args.lists} times all {args.versions} versions")
    for t in targets:
        times[t.name]["list_all"] = []
    for _ in range(args.lists):
        for t in targets:
            elapsed, count = timed(t.list_all)
            if count != args.versions:
                raise RuntimeError(f"{t.name}: listed {count} versions, expected {args.versions}")
            times[t.name]["list_all"].append(elapsed)
    log(f"set_alias: {args.aliases} moves of `champion` between versions 1 and 2")
    for t in targets:
        t.alias_setup()
        times[t.name]["set_alias"] = []
    for i in range(args.aliases):
        for t in targets:
            times[t.name]["set_alias"].append(timed(t.set_alias, 1 + i % 2)[0])
    return times


def audited_sqlite(reg: Registry, action: str) -> int:
    """Events of `action` in a SQLite registry's audit log (read after the run)."""
    url = reg.sqlite_url()
    with sqlite3.connect(url.removeprefix("sqlite:///")) as db:
        row = db.execute(
            "SELECT count(*) FROM registry_auditevent WHERE action = ?", [action]
        ).fetchone()
    return int(row[0])


class SqliteRegistry(Registry):
    """Our server on its own SQLite file even when $DATABASE_URL is PostgreSQL."""

    def _env(self) -> dict[str, str]:
        env = super()._env()
        env["DATABASE_URL"] = self.sqlite_url()
        self.db = "sqlite"
        return env


# --- main --------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--versions", type=int, default=1000, help="versions created (N)")
    parser.add_argument("--gets", type=int, default=500, help="version reads (M)")
    parser.add_argument("--lists", type=int, default=30, help="list-all reads (K)")
    parser.add_argument("--aliases", type=int, default=300, help="alias moves (A)")
    parser.add_argument(
        "--no-postgres", action="store_true", help="skip the PostgreSQL figure (info only)"
    )
    parser.add_argument(
        "--peers-dir",
        type=Path,
        default=common.default_peers_dir(),
    )
    args = parser.parse_args(argv)
    if args.versions > 1000:
        parser.error("--versions: at most 1000 (one page of ?limit=1000 / max_results=1000)")

    # common.wait_http retries only refused connections; on a loaded machine the first
    # /healthz of a starting server can also time out: retry that too (this process only).
    common.wait_http = lambda url, proc, log_path, timeout=60: wait_up(url, proc, log_path, timeout)
    exe = mlflow_venv(args.peers_dir)
    version = mlflow_version(exe)
    use_pg = not args.no_postgres and common.bench_database_url() is not None
    emit(
        {
            "bench": "meta_setup",
            "mlflow": version,
            "versions": args.versions,
            "gets": args.gets,
            "lists": args.lists,
            "aliases": args.aliases,
            "servers": ["ours_sqlite", *(["ours_postgresql"] if use_pg else []), "mlflow"],
            "workers": 2,
        }
    )
    with SqliteRegistry(workers=2) as ours, MlflowServer(exe) as peer:
        targets: list[Target] = [Ours("ours_sqlite", ours), Mlflow(peer)]
        if use_pg:
            with Registry(workers=2) as pg:
                if pg.db == "postgresql":
                    targets.insert(1, Ours("ours_postgresql", pg))
                times = run_ops(targets, args)
        else:
            times = run_ops(targets, args)
        audited = {
            "version.create": audited_sqlite(ours, "version.create"),
            "alias.set": audited_sqlite(ours, "alias.set"),
        }
        connects = {t.name: t.client.connects for t in targets}
        for t in targets:
            t.client.close()
    report(times, args, connects, audited)
    return 0


def report(
    times: dict[str, dict[str, list[float]]],
    args: argparse.Namespace,
    connects: dict[str, int],
    audited: dict[str, int],
) -> None:
    figures = {name: {op: summary(s) for op, s in ops.items()} for name, ops in times.items()}
    calls = {name: sum(len(s) for s in ops.values()) for name, ops in times.items()}
    for name, ops in figures.items():
        for op, fig in ops.items():
            emit(
                {
                    "bench": f"meta_{op}",
                    "server": name,
                    **fig,
                    "db": "postgresql" if name == "ours_postgresql" else "sqlite",
                    "connections": connects[name],
                    "calls": calls[name],
                }
            )
    peer = figures["mlflow"]
    for op in ["create", "get", "list_all", "set_alias"]:
        ratio = figures["ours_sqlite"][op]["ops_s"] / peer[op]["ops_s"]
        common.ratio_record(f"meta_{op}_vs_mlflow", ratio, TARGET_RATIO, db="sqlite")
        if "ours_postgresql" in figures:
            pg_ratio = figures["ours_postgresql"][op]["ops_s"] / peer[op]["ops_s"]
            emit(
                {
                    "bench": f"meta_{op}_vs_mlflow_postgresql",
                    "ratio": round(pg_ratio, 3),
                    "target": None,
                    "ok": None,
                    "note": "ours on PostgreSQL vs MLflow on SQLite, info only",
                }
            )
    p95 = figures["ours_sqlite"]["list_all"]["p95_ms"]
    emit(
        {
            "bench": "meta_list_all_p95",
            "p95_ms": p95,
            "target": f"<={LIST_P95_TARGET_MS}",
            "ok": p95 <= LIST_P95_TARGET_MS,
            "db": "sqlite",
        }
    )
    for action, expected in [("version.create", args.versions), ("alias.set", args.aliases)]:
        emit(
            {
                "bench": "meta_writes_audited",
                "action": action,
                "events": audited[action],
                "writes": expected,
                "target": f">={expected}",
                "ok": audited[action] >= expected,
            }
        )


if __name__ == "__main__":
    sys.exit(main())
