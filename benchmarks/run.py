"""Run every benchmark module; print JSON lines and append them to bench-results/<ts>.jsonl.

    DATABASE_URL=postgres://postgres@127.0.0.1:5432/smr .venv/bin/python benchmarks/run.py \
        [--size-mib 1024] [--big-mib 4096] [--only crypto|rest_fs|rest_s3|rss ...] [--strict]

Benchmarks run one after the other (never in parallel: the figures share the machine's cores).
bench_crypto.py is run as a subprocess at the same --size-mib and its JSON lines are passed
through; if it is not there, a JSON line says it was skipped. Exit status: 1 if a benchmark
failed, 2 with --strict if a target was missed, else 0.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent))

import bench_rest  # noqa: E402
import common  # noqa: E402

CRYPTO_MODULE = HERE / "bench_crypto.py"
CRYPTO_TIMEOUT = 1800


def run_crypto(args: argparse.Namespace) -> None:
    """Run bench_crypto.py as a subprocess at the same size, passing its JSON lines through."""
    if not CRYPTO_MODULE.exists():
        reason = f"{CRYPTO_MODULE.name} not found"
        common.emit({"bench": "crypto", "skipped": True, "reason": reason})
        return
    argv = [common.PYTHON, str(CRYPTO_MODULE), "--size-mib", str(args.size_mib)]
    common.log(" ".join(argv))
    proc = subprocess.Popen(  # fixed argv, no shell
        argv, cwd=common.ROOT, stdout=subprocess.PIPE, text=True, start_new_session=True
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
                common.log(f"bench_crypto: {line}")  # not a figure: keep stdout JSON-only
                continue
            if isinstance(record, dict):
                record.setdefault("source", CRYPTO_MODULE.name)
                common.emit(record)
            else:
                common.emit({"bench": "crypto", "source": CRYPTO_MODULE.name, "value": record})
        code = proc.wait(timeout=CRYPTO_TIMEOUT)
    finally:
        if proc.poll() is None:  # interrupted or timed out: do not leave it running
            common.stop_group(proc)
    if code != 0:
        raise RuntimeError(f"{CRYPTO_MODULE.name} exited with status {code}")


BENCHMARKS = {"crypto": run_crypto, **bench_rest.BENCHMARKS}


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
        "--repeat", type=int, default=1,
        help="rest_fs/rest_s3: measure N times (fresh servers), report medians",
    )
    parser.add_argument(
        "--strict", action="store_true", help="exit with status 2 if any target is missed"
    )
    parser.add_argument(
        "--results-dir", type=Path, default=common.ROOT / "bench-results",
        help="where <timestamp>.jsonl is written",
    )
    args = parser.parse_args(argv)

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
