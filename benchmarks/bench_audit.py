"""Audit log benchmarks (JSON lines on stdout), on PostgreSQL.

    .venv/bin/python benchmarks/bench_audit.py [--events 1000000] [--appends 2000]

- append throughput with 1 and 8 concurrent writers (real transactions, advisory lock);
- the overhead an audited download adds to an unaudited one of a small file (same process,
  same artifact, interleaved rounds): ratio audited / unaudited;
- `manage.py verify_audit` over N generated events (default 1,000,000) and over N/4: rate and
  the child's peak RSS, whose ratio shows memory stays flat in the log size.

Uses its own database (smr_bench_audit), dropped and recreated each run: the audit table's
triggers make it append-only, so it cannot be emptied any other way.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
DB_NAME = "smr_bench_audit"
BASE_URL = os.environ.get("BENCH_PG_URL", "postgres://postgres@127.0.0.1:5432")


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


def recreate_database() -> None:
    import psycopg

    with psycopg.connect(f"{BASE_URL}/postgres", autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {DB_NAME} WITH (FORCE)")
        conn.execute(f"CREATE DATABASE {DB_NAME}")


def setup_django(var: Path) -> None:
    os.environ["DATABASE_URL"] = f"{BASE_URL}/{DB_NAME}"
    os.environ["SMR_VAR_DIR"] = str(var)
    os.environ["DJANGO_SETTINGS_MODULE"] = "registry.settings"
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0)


def bench_appends(total: int, writers: int) -> float:
    from django.db import connections, transaction

    from registry.services import audit

    per = total // writers
    barrier = threading.Barrier(writers + 1)

    def work(w: int) -> None:
        barrier.wait()
        for i in range(per):
            with transaction.atomic():
                audit.audit_record(action="model.create", namespace="bench", target=f"w{w}/{i}")
        connections.close_all()

    threads = [threading.Thread(target=work, args=(w,)) for w in range(writers)]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    return per * writers / (time.perf_counter() - start)


def bench_download_overhead(rounds: int) -> tuple[float, float]:
    """Median seconds per small-file read: audited (artifact_open) vs the same without audit."""
    from django.contrib.auth import get_user_model

    from registry import storage
    from registry.crypto import stream
    from registry.services import catalog
    from registry.services.artifacts import (
        artifact_open,
        artifact_unwrap_dek,
        artifact_upload,
        associated_data,
    )

    user = get_user_model().objects.create(username=f"bench{time.time_ns()}")
    ns = catalog.namespace_create(name=f"b{time.time_ns() % 10**9}", creator=user)
    model = catalog.model_create(namespace=ns, name="m", creator=user)
    version = catalog.version_create(model=model, creator=user)
    data = os.urandom(4096)
    artifact = artifact_upload(
        version=version, path="small.bin", chunks=[data], expected_sha256=None,
        expected_size=len(data), creator=user,
    )  # fmt: skip
    store = storage.get_object_store()

    def unaudited() -> bytes:
        dek = artifact_unwrap_dek(artifact)
        return b"".join(
            stream.decrypt_range(
                dek, associated_data(artifact.id), artifact.size, 0, artifact.size,
                lambda a, b: store.read(artifact.object_key, a, b),
            )
        )  # fmt: skip

    def audited() -> bytes:
        return b"".join(artifact_open(artifact=artifact))

    assert unaudited() == audited() == data
    a_times, u_times = [], []
    for _ in range(rounds):  # interleaved so machine noise hits both alike
        t = time.perf_counter()
        audited()
        a_times.append(time.perf_counter() - t)
        t = time.perf_counter()
        unaudited()
        u_times.append(time.perf_counter() - t)
    return statistics.median(a_times), statistics.median(u_times)


def generate_chain(upto: int) -> None:
    """Append valid events directly with COPY until the log holds `upto` (fast, single writer)."""
    from django.db import connection

    from registry.auditchain import GENESIS, canonical_bytes, entry_hash
    from registry.models import AuditEvent
    from registry.services.audit import record_of

    head = AuditEvent.objects.order_by("-seq").values_list("seq", "entry_hash").first()
    seq, prev = head if head else (0, GENESIS)
    base = datetime(2026, 1, 1, tzinfo=UTC)
    cols = (
        "seq, created_at, actor_kind, actor_user, actor_token, action, namespace, target, "
        "target_sha256, request_id, client_ip, outcome, details, canonical, prev_hash, entry_hash"
    )
    with (
        connection.cursor() as cursor,
        cursor.connection.cursor().copy(f"COPY registry_auditevent ({cols}) FROM STDIN") as copy,
    ):
        while seq < upto:
            seq += 1
            created = base + timedelta(microseconds=seq * 1000)
            fields = {
                "actor_kind": "user", "actor_user": "alice", "actor_token": "0123456789ab",
                "action": "artifact.download", "namespace": "bench",
                "target": f"bench/model/v1/weights-{seq % 97}.safetensors",
                "target_sha256": f"{seq:064x}", "request_id": f"{seq:032x}",
                "client_ip": "127.0.0.1", "outcome": "success",
            }  # fmt: skip
            details = {"range": None, "bytes": 4096, "key_op": "unwrap", "kek_id": "local:k1"}
            canonical = canonical_bytes(
                record_of(seq=seq, created_at=created, details=details, **fields)
            )
            h = entry_hash(prev, seq, canonical)
            copy.write_row(
                (seq, created, *fields.values(), json.dumps(details), canonical, prev, h)
            )
            prev = h
    connection.commit() if not connection.get_autocommit() else None


def verify_child(var: Path) -> tuple[float, float]:
    """Run manage.py verify_audit in a child; return (seconds, peak RSS MiB of the child)."""
    env = {**os.environ}
    argv = [sys.executable, str(ROOT / "manage.py"), "verify_audit", "--json"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    start = time.perf_counter()
    out = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    if out.returncode != 0:
        raise RuntimeError(f"verify_audit failed: {out.stdout} {out.stderr[-2000:]}")
    # ru_maxrss of children is the max over all waited children: measure in separate runs.
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return seconds, max(peak, before) / 1024


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--appends", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=300)
    args = parser.parse_args()

    recreate_database()
    var = Path(tempfile.mkdtemp(prefix="smr-bench-audit-"))
    setup_django(var)

    one = bench_appends(args.appends, 1)
    eight = bench_appends(args.appends, 8)
    emit({"bench": "audit_append", "writers": 1, "events_s": round(one)})
    emit({"bench": "audit_append", "writers": 8, "events_s": round(eight)})

    audited, unaudited = bench_download_overhead(args.rounds)
    emit(
        {
            "bench": "audited_download_overhead",
            "file_bytes": 4096,
            "audited_ms": round(audited * 1000, 3),
            "unaudited_ms": round(unaudited * 1000, 3),
            "ratio": round(audited / unaudited, 2),
            "added_ms": round((audited - unaudited) * 1000, 3),
        }
    )

    from registry.services import audit

    quarter = args.events // 4
    generate_chain(quarter)
    audit.audit_checkpoint_create()
    sec_q, rss_q = verify_child(var)
    from registry.models import AuditEvent

    n_q = AuditEvent.objects.count()
    emit({"bench": "verify_audit", "events": n_q, "seconds": round(sec_q, 1),
          "events_s": round(n_q / sec_q), "peak_rss_mib": round(rss_q, 1)})  # fmt: skip
    generate_chain(args.events)
    audit.audit_checkpoint_create()
    sec_full, rss_full = verify_child(var)
    n_full = AuditEvent.objects.count()
    emit({"bench": "verify_audit", "events": n_full, "seconds": round(sec_full, 1),
          "events_s": round(n_full / sec_full), "peak_rss_mib": round(rss_full, 1)})  # fmt: skip
    emit(
        {
            "bench": "verify_audit_rss_flat",
            "ratio": round(rss_full / rss_q, 3),
            "target": "<=1.2",
            "ok": rss_full / rss_q <= 1.2,
        }
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
