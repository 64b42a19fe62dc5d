"""Run every benchmark module; print JSON lines and append them to bench-results/<ts>.jsonl.

    DATABASE_URL=postgres://postgres@127.0.0.1:5432/smr .venv/bin/python benchmarks/run.py
        [--size-mib 1024] [--big-mib 4096] [--only NAME ...] [--repeat 3] [--strict]

Benchmarks run one after the other (never in parallel: the figures share the machine's cores).
bench_rest.py (rest_fs, rest_s3, rss) runs in this process; every other bench_*.py module
(crypto, audit, ...) runs as a subprocess, with --size-mib when it accepts it, and its JSON
lines are passed through with "source"; if bench_crypto.py is missing a line says it was
skipped. Exit status: 1 if a benchmark failed, 2 with --strict if a target was missed, else 0.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent))

import bench_rest  # noqa: E402
import common  # noqa: E402

# Modules run in this process; every other benchmarks/bench_*.py runs as a subprocess.
IN_PROCESS = {"bench_rest.py"}
# Expected even when absent, so a run says it skipped them rather than staying silent.
EXPECTED = ["bench_crypto.py"]
MODULE_TIMEOUT = 3600


def module_name(path: Path) -> str:
    return path.stem.removeprefix("bench_")


def external_modules() -> list[Path]:
    found = {p.name for p in HERE.glob("bench_*.py")} - IN_PROCESS
    return [HERE / name for name in sorted(found | set(EXPECTED))]


def accepts(path: Path, option: str) -> bool:
    """Whether the module's --help mentions `option` (modules differ in what they take)."""
    result = subprocess.run(  # fixed argv, no shell
        [common.PYTHON, str(path), "--help"],
        cwd=common.ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return option in result.stdout


def run_module(path: Path, args: argparse.Namespace) -> None:
    """Run a benchmark module as a subprocess at the same size, passing its JSON lines through."""
    name = module_name(path)
    if not path.exists():
        common.emit({"bench": name, "skipped": True, "reason": f"{path.name} not found"})
        return
    argv = [common.PYTHON, str(path)]
    if accepts(path, "--size-mib"):
        argv += ["--size-mib", str(args.size_mib)]
    common.log(" ".join(argv))
    # A private TMPDIR, removed afterwards, so whatever the module leaves in it goes too.
    tmp = Path(tempfile.mkdtemp(prefix=f"smr-bench-{name}-"))
    env = {**os.environ, "TMPDIR": str(tmp)}
    try:
        _run_streaming(path, name, argv, env)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _run_streaming(path: Path, name: str, argv: list[str], env: dict[str, str]) -> None:
    proc = subprocess.Popen(  # fixed argv, no shell
        argv,
        cwd=common.ROOT,
        env=env,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                common.log(f"{path.name}: {line}")  # not a figure: keep stdout JSON-only
                continue
            if not isinstance(record, dict):
                record = {"bench": name, "value": record}
            record.setdefault("source", path.name)
            common.emit(record)
        code = proc.wait(timeout=MODULE_TIMEOUT)
    finally:
        if proc.poll() is None:  # interrupted or timed out: do not leave it running
            common.stop_group(proc)
    if code != 0:
        raise RuntimeError(f"{path.name} exited with status {code}")


def _module_runner(path: Path):
    return lambda args: run_module(path, args)


BENCHMARKS = {
    **{module_name(p): _module_runner(p) for p in external_modules()},
    **bench_rest.BENCHMARKS,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size-mib", type=int, default=1024, help="transfer size (MiB)")
    parser.add_argument(
        "--big-mib", type=int, default=4096, help="large transfer size for the RSS test (MiB)"
    )
    parser.add_argument(
        "--only", action="append", choices=sorted(BENCHMARKS), help="run only NAME (repeatable)"
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=3,
        help="rest_fs: measure N times (fresh servers), report medians (default 3)",
    )
    parser.add_argument(
        "--s3-repeat",
        type=int,
        default=1,
        help="rest_s3: the same (default 1: boto3's download_fileobj is slow on moto)",
    )
    parser.add_argument(
        "--strict", action="store_true", help="exit with status 2 if any target is missed"
    )
    parser.add_argument(
        "--results-dir",
        type=Path,
        default=common.ROOT / "bench-results",
        help="where <timestamp>.jsonl is written",
    )
    args = parser.parse_args(argv)
    # A plain SIGTERM would skip the finally blocks that stop servers and remove temp dirs.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    results = args.results_dir / f"{stamp}.jsonl"
    common.set_results_file(results)
    common.log(f"results: {results}")
    common.emit(
        {
            "bench": "meta",
            "started": stamp,
            "size_mib": args.size_mib,
            "big_mib": args.big_mib,
            "repeat": args.repeat,
            "s3_repeat": args.s3_repeat,
            "cpus": len(os.sched_getaffinity(0)),
            "python": platform.python_version(),
            "machine": platform.machine(),
            "database": "postgresql" if common.bench_database_url() else "sqlite",
        }
    )
    failed: list[str] = []
    for name, fn in BENCHMARKS.items():
        if args.only and name not in args.only:
            continue
        common.log(f"== {name}")
        started = time.perf_counter()
        try:
            fn(args)
        except Exception as exc:
            failed.append(name)
            common.emit({"bench": name, "error": f"{type(exc).__name__}: {exc}"})
        common.log(f"== {name} done in {time.perf_counter() - started:.1f}s")

    missed = [r["bench"] for r in common.records() if r.get("ok") is False]
    checked = [r["bench"] for r in common.records() if "ok" in r]
    common.emit(
        {
            "bench": "summary",
            "targets_checked": len(checked),
            "targets_missed": missed,
            "errors": failed,
            "results_file": str(results),
        }
    )
    if failed:
        return 1
    if missed and args.strict:
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
