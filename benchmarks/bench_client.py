"""`smr push` and `smr pull` against curl moving the same files, and the client's peak memory.

    DATABASE_URL=postgres://... .venv/bin/python benchmarks/bench_client.py
        [--total-mib 2048] [--files 4] [--rss-small-mib 512] [--rss-big-mib 2048] [--repeat 3]

One registry (common.Registry: gunicorn with deploy/gunicorn.conf.py, the fs store, a token of
namespace `bench`) serves every run. A folder of --files files totalling --total-mib of
generated data is written once (one random 8 MiB buffer repeated, never whole in memory).

push: `smr push bench/<new model> FOLDER` (a new draft version; files of 64 MiB and more go
through resumable sessions, 4 workers, every file hashed first and sent with its digest)
against `curl -T` of each file in turn into a draft made beforehand (untimed), with `Expect:`
off so curl does not wait for a 100 Continue. pull: `smr pull REF` with an empty cache each
time (parallel ranged GETs into the cache, every SHA-256 checked; it prints the snapshot
path) against `curl -o` of each file in turn, and `smr pull REF DEST` (the same, then each
file hard-linked into DEST under a temporary name and renamed once all verified) likewise.
Runs alternate (smr, curl, smr, ...) and medians of --repeat are compared. The version is a
draft (no registry signature): the signature check of an approved version is one bundle and
a key, a constant few milliseconds.
Each smr figure carries the client's CPU seconds (user + system, from wait4).

Memory: the peak RSS (`ru_maxrss` from wait4) of `smr push` and `smr pull REF DEST` of a
version of one file of --rss-small-mib, and of one of --rss-big-mib.

Figures: `client_push_smr`, `client_push_curl`, `client_push_vs_curl` (curl s / smr s, target
>= 1.0), `client_pull_smr`, `client_pull_curl`, `client_pull_smr_dest`, `client_pull_vs_curl`
and `client_pull_to_dest_vs_curl` (target >= 1.5 each), `client_rss_<N>mib` and
`client_rss_big_vs_small` (peak at big / at small, target <= 1.2).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))

import common
import requests
from common import (
    BENCH_NAMESPACE,
    MIB,
    VENV_BIN,
    Pattern,
    Registry,
    check,
    emit,
    log,
    rate,
    ratio_record,
)

SMR = str(VENV_BIN / "smr")
PUSH_TARGET = 1.0
PULL_TARGET = 1.5
RSS_TARGET = 1.2
API = "/api/v1"


def write_folder(folder: Path, total: int, files: int, pattern: Pattern) -> list[Path]:
    folder.mkdir(parents=True)
    paths = []
    each = total // files
    for i in range(files):
        size = each if i < files - 1 else total - each * (files - 1)
        path = folder / f"model-{i + 1:05d}-of-{files:05d}.bin"
        with path.open("wb") as handle:
            for view in pattern.chunks(size):
                handle.write(view)
        paths.append(path)
    return paths


class Bench:
    def __init__(self, registry: Registry, tmp: Path) -> None:
        self.registry = registry
        self.tmp = tmp
        self.session = requests.Session()
        self.session.headers["Authorization"] = f"Bearer {registry.token}"
        # curl reads its headers from a file (-H @file): the token stays out of argv.
        self.curl_headers = tmp / "curl-headers"
        self.curl_headers.write_text(f"Authorization: Bearer {registry.token}\nExpect:\n")
        self.curl_headers.chmod(0o600)
        self.cpu: list[float] = []

    def url(self, path: str) -> str:
        return f"{self.registry.base}{API}{path}"

    def env(self, home: Path) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SMR_", "XDG_"))}
        env.update(
            SMR_URL=self.registry.base,
            SMR_TOKEN=self.registry.token,
            XDG_CONFIG_HOME=str(home / "config"),
            XDG_CACHE_HOME=str(home / "cache"),
            XDG_STATE_HOME=str(home / "state"),
        )
        return env

    def smr(self, args: list[str], home: Path) -> tuple[float, int, dict]:
        """Run smr; (seconds, peak RSS in KiB, its JSON output). Its CPU seconds (user +
        system) are added to `self.cpu`."""
        out = self.tmp / "smr.out"
        err = self.tmp / "smr.err"
        start = time.perf_counter()
        with out.open("w") as stdout, err.open("w") as stderr:
            proc = subprocess.Popen(  # fixed argv, no shell
                [SMR, "--json", "-q", *args], env=self.env(home), stdout=stdout, stderr=stderr
            )
            _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
        self.cpu.append(usage.ru_utime + usage.ru_stime)
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            raise RuntimeError(f"smr {' '.join(args)}: exit {proc.returncode}\n{err.read_text()}")
        return seconds, usage.ru_maxrss, json.loads(out.read_text())

    def curl(self, argv: list[str]) -> None:
        subprocess.run(  # fixed argv, no shell
            ["curl", "-sS", "-f", "-H", f"@{self.curl_headers}", *argv],
            check=True,
            capture_output=True,
            timeout=3600,
        )

    def new_model(self) -> str:
        name = f"m-{uuid.uuid4().hex[:10]}"
        response = self.session.post(
            self.url(f"/namespaces/{BENCH_NAMESPACE}/models"), json={"name": name}, timeout=30
        )
        check(response, 201)
        return name

    def drop_files(self, model: str, number: int) -> None:
        """Delete a measured draft's files: the server's disk holds one copy at a time."""
        base = f"/namespaces/{BENCH_NAMESPACE}/models/{model}/versions/{number}"
        files = self.session.get(self.url(f"{base}/files"), params={"limit": 1000}, timeout=60)
        check(files, 200)
        for f in files.json()["results"]:
            check(self.session.delete(self.url(f"{base}/files/{f['path']}"), timeout=60), 204)

    def push_smr(self, folder: Path) -> tuple[float, int, str]:
        model = self.new_model()
        home = self.tmp / f"home-{uuid.uuid4().hex[:8]}"
        seconds, rss, body = self.smr(["push", f"{BENCH_NAMESPACE}/{model}", str(folder)], home)
        shutil.rmtree(home, ignore_errors=True)
        return seconds, rss, f"{BENCH_NAMESPACE}/{model}:{body['version']}"

    def push_curl(self, paths: list[Path]) -> float:
        model = self.new_model()
        base = f"/namespaces/{BENCH_NAMESPACE}/models/{model}/versions"
        created = self.session.post(self.url(base), json={}, timeout=30)
        check(created, 201)
        files = self.url(f"{base}/{created.json()['number']}/files")
        start = time.perf_counter()
        for path in paths:
            self.curl(["-T", str(path), "-o", "/dev/null", f"{files}/{path.name}"])
        seconds = time.perf_counter() - start
        self.drop_files(model, created.json()["number"])
        return seconds

    def pull_smr(self, ref: str, *, dest: bool) -> tuple[float, int]:
        home = self.tmp / f"home-{uuid.uuid4().hex[:8]}"
        target = self.tmp / "smr-dest"
        args = ["pull", ref, str(target)] if dest else ["pull", ref]
        seconds, rss, _ = self.smr(args, home)
        shutil.rmtree(home, ignore_errors=True)
        shutil.rmtree(target, ignore_errors=True)
        return seconds, rss

    def pull_curl(self, ref: str, paths: list[Path]) -> float:
        model, number = ref.split("/", 1)[1].split(":")
        files = self.url(f"/namespaces/{BENCH_NAMESPACE}/models/{model}/versions/{number}/files")
        target = self.tmp / "curl-dest"
        target.mkdir()
        start = time.perf_counter()
        for path in paths:
            self.curl(["-o", str(target / path.name), f"{files}/{path.name}"])
        seconds = time.perf_counter() - start
        for path in paths:
            if (target / path.name).stat().st_size != path.stat().st_size:
                raise RuntimeError(f"curl fetched a short {path.name}")
        shutil.rmtree(target)
        return seconds


def measure_transfers(bench: Bench, paths: list[Path], folder: Path, repeat: int) -> None:
    total = sum(p.stat().st_size for p in paths)
    runs: dict[str, list[float]] = {}
    cpu: dict[str, list[float]] = {}

    def timed(name: str, seconds: float, *, smr: bool = True) -> None:
        runs.setdefault(name, []).append(seconds)
        if smr:
            cpu.setdefault(name, []).append(bench.cpu[-1])

    kept = ""
    for i in range(repeat):
        log(f"push {i + 1}/{repeat}: smr, then curl -T")
        seconds, _, ref = bench.push_smr(folder)
        timed("client_push_smr", seconds)
        if kept:
            model, number = ref.split("/", 1)[1].split(":")
            bench.drop_files(model, int(number))
        else:
            kept = ref  # the version every pull fetches
        timed("client_push_curl", bench.push_curl(paths), smr=False)
    for i in range(repeat):
        log(f"pull {i + 1}/{repeat}: smr (the cache), curl -o, smr into DEST")
        timed("client_pull_smr", bench.pull_smr(kept, dest=False)[0])
        timed("client_pull_curl", bench.pull_curl(kept, paths), smr=False)
        timed("client_pull_smr_dest", bench.pull_smr(kept, dest=True)[0])
    median = {name: statistics.median(values) for name, values in runs.items()}
    for name, values in runs.items():
        record = {
            "bench": name,
            "seconds": round(median[name], 3),
            "mib_s": rate(total, median[name]),
            "runs_s": [round(r, 3) for r in values],
            "files": len(paths),
            "bytes": total,
            "repeat": repeat,
        }
        if name in cpu:
            record["client_cpu_s"] = round(statistics.median(cpu[name]), 2)
        emit(record)
    ratio_record(
        "client_push_vs_curl", median["client_push_curl"] / median["client_push_smr"], PUSH_TARGET
    )
    # Both forms write each byte once, as curl -o does: DEST gets hard links to the cache's
    # blobs (a copy only where DEST is on another file system).
    for name, smr in (
        ("client_pull_vs_curl", "client_pull_smr"),
        ("client_pull_to_dest_vs_curl", "client_pull_smr_dest"),
    ):
        ratio_record(
            name,
            median["client_pull_curl"] / median[smr],
            PULL_TARGET,
            cpus=len(os.sched_getaffinity(0)),
        )


def measure_rss(bench: Bench, pattern: Pattern, small_mib: int, big_mib: int) -> None:
    peaks = {}
    for mib in (small_mib, big_mib):
        folder = bench.tmp / f"rss-{mib}"
        write_folder(folder, mib * MIB, 1, pattern)
        log(f"peak RSS: smr push and pull of one {mib} MiB file")
        _, push_rss, ref = bench.push_smr(folder)
        _, pull_rss = bench.pull_smr(ref, dest=True)
        shutil.rmtree(folder)
        model, number = ref.split("/", 1)[1].split(":")
        bench.drop_files(model, int(number))
        peak = max(push_rss, pull_rss) / 1024
        peaks[mib] = peak
        emit(
            {
                "bench": f"client_rss_{mib}mib",
                "push_peak_rss_mib": round(push_rss / 1024, 1),
                "pull_peak_rss_mib": round(pull_rss / 1024, 1),
                "peak_rss_mib": round(peak, 1),
            }
        )
    ratio_record(
        "client_rss_big_vs_small", peaks[big_mib] / peaks[small_mib], RSS_TARGET, at_most=True
    )


def start_registry() -> Registry:
    """A started registry. common.wait_http gives each health check 2 s and stops at the first
    timeout; on a busy machine the first request waits for the workers to load Django, which
    is a slow start, not a failure: here a timeout is waited out too (until 120 s)."""
    original = common.wait_http

    def patient(url: str, proc: subprocess.Popen, log_path: Path, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                return original(url, proc, log_path, timeout=max(1.0, deadline - time.monotonic()))
            except requests.Timeout:
                if time.monotonic() > deadline:
                    raise

    common.wait_http = patient
    try:
        return Registry().__enter__()  # stops the server and removes its folder on failure
    finally:
        common.wait_http = original


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--total-mib", type=int, default=2048, help="the version's size")
    parser.add_argument("--files", type=int, default=4)
    parser.add_argument("--rss-small-mib", type=int, default=512)
    parser.add_argument("--rss-big-mib", type=int, default=2048)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--skip-rss", action="store_true")
    args = parser.parse_args(argv)
    if not Path(SMR).exists():
        emit({"bench": "client", "skipped": True, "reason": f"{SMR} not installed"})
        return 0
    if shutil.which("curl") is None:
        emit({"bench": "client", "skipped": True, "reason": "curl not found"})
        return 0
    tmp = Path(tempfile.mkdtemp(prefix="smr-bench-client-"))
    pattern = Pattern()
    try:
        folder = tmp / "model"
        log(f"writing {args.files} files, {args.total_mib} MiB, to {folder}")
        paths = write_folder(folder, args.total_mib * MIB, args.files, pattern)
        registry = start_registry()
        try:
            bench = Bench(registry, tmp)
            measure_transfers(bench, paths, folder, args.repeat)
            shutil.rmtree(folder)
            if not args.skip_rss:
                measure_rss(bench, pattern, args.rss_small_mib, args.rss_big_mib)
        finally:
            registry.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
