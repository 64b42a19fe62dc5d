"""REST throughput and server memory, each measured side by side with its baseline in one run.

rest_fs  REST PUT/GET through gunicorn to the folder store vs the in-process pipeline
         (StreamEncryptor: AES-256-GCM STREAM + SHA-256) over the same bytes.
rest_s3  REST PUT/GET through gunicorn to S3 (moto's server) vs plain boto3 upload_fileobj /
         download_fileobj of the same bytes to the same endpoint.
rss      Peak RSS of the single gunicorn worker moving --size-mib vs --big-mib (fresh servers).

Run through benchmarks/run.py (or directly: python benchmarks/bench_rest.py --only rest_fs).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))

import boto3
import requests
from common import (
    MIB,
    REGION,
    HashingSink,
    MotoServer,
    Pattern,
    Registry,
    RssSampler,
    check,
    emit,
    log,
    moto_credentials,
    rate,
    ratio_record,
)

# The server reads request bodies in chunks of this size (registry.services.artifacts.READ_CHUNK).
PIPELINE_CHUNK = 4 * MIB
# Ciphertext reaches the fs store one ~1 MiB STREAM segment at a time.
SEGMENT = 1 * MIB
DOWNLOAD_CHUNK = 1 * MIB
REST_FS_TARGET = 0.5
REST_S3_TARGET = 0.8
RSS_GROWTH_TARGET = 1.2
RSS_ABSOLUTE_TARGET_MIB = 200

_pattern: Pattern | None = None


def pattern() -> Pattern:
    global _pattern
    if _pattern is None:
        _pattern = Pattern()
    return _pattern


# --- measurements ----------------------------------------------------------------------------


def pipeline_rate(size: int) -> float:
    """MiB/s of StreamEncryptor (encrypt + SHA-256) over `size` bytes, output discarded."""
    from registry.crypto.stream import StreamEncryptor

    data = pattern()
    expected = data.sha256(size)
    encryptor = StreamEncryptor(os.urandom(32), b"smr:bench:pipeline")
    out_bytes = 0
    start = time.perf_counter()
    for chunk in data.chunks(size, PIPELINE_CHUNK):
        for out in encryptor.update(chunk):
            out_bytes += len(out)
    for out in encryptor.finalize():
        out_bytes += len(out)
    elapsed = time.perf_counter() - start
    if encryptor.sha256 != expected:
        raise RuntimeError("pipeline: SHA-256 mismatch")
    return rate(size, elapsed)


def rest_upload(
    reg: Registry, session: requests.Session, files_url: str, size: int
) -> tuple[float, float]:
    """PUT `size` bytes as a raw streamed body; returns (seconds, seconds after the last byte
    was sent until the response came). Verifies the server's size and digest."""
    data = pattern()
    expected = data.sha256(size)
    url = f"{files_url}/weights.bin"
    body = data.body(size)
    start = time.perf_counter()
    r = session.put(
        url,
        data=body,
        headers=reg.headers(
            **{"Content-Length": str(size), "Content-Type": "application/octet-stream"}
        ),
        timeout=(10, 900),
    )
    end = time.perf_counter()
    check(r, 201)
    stored = r.json()
    if stored["size"] != size or stored["sha256"] != expected:
        raise RuntimeError(f"upload: server stored {stored['size']} bytes, {stored['sha256']}")
    return end - start, end - (body.sent_at or end)


def rest_download(reg: Registry, session: requests.Session, files_url: str, size: int) -> float:
    """GET the file back streamed, hashing on the client; returns seconds."""
    expected = pattern().sha256(size)
    url = f"{files_url}/weights.bin"
    digest = hashlib.sha256()
    received = 0
    start = time.perf_counter()
    with session.get(url, headers=reg.headers(), stream=True, timeout=(10, 900)) as r:
        check(r, 200)
        for chunk in r.iter_content(DOWNLOAD_CHUNK):
            digest.update(chunk)
            received += len(chunk)
    elapsed = time.perf_counter() - start
    if received != size or digest.hexdigest() != expected:
        raise RuntimeError(f"download: got {received} bytes sha256 {digest.hexdigest()}")
    return elapsed


@dataclass
class Roundtrip:
    up_s: float
    finish_s: float  # of up_s: from the last body byte sent to the response
    down_s: float


def rest_roundtrip(reg: Registry, size: int) -> Roundtrip:
    """Upload then download `size` bytes through the REST API of a running server."""
    pattern().sha256(size)  # precompute outside the timings
    with requests.Session() as session:
        files_url = reg.new_version(session)
        log(f"REST upload {size // MIB} MiB -> {reg.base}")
        up, finish = rest_upload(reg, session, files_url, size)
        log(f"REST download {size // MIB} MiB")
        down = rest_download(reg, session, files_url, size)
    return Roundtrip(up, finish, down)


def fs_write_rate(size: int) -> float:
    """MiB/s of writing the bytes to a file on the temp file system in 1 MiB writes + fsync:
    what the fs store's disk can take at best (the store writes and fsyncs the same way)."""
    folder = Path(tempfile.mkdtemp(prefix="smr-bench-disk-"))
    try:
        fd = os.open(folder / "probe", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            start = time.perf_counter()
            for chunk in pattern().chunks(size, SEGMENT):
                while chunk:
                    chunk = chunk[os.write(fd, chunk) :]
            os.fsync(fd)
            elapsed = time.perf_counter() - start
        finally:
            os.close(fd)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return rate(size, elapsed)


def median(values: list[float]) -> float:
    return round(statistics.median(values), 1)


def figure(name: str, rates: list[float], size_mib: int, **extra) -> float:
    """Emit one figure (the median over the repeats) and return it."""
    value = median(rates)
    record = {"bench": name, "mib_s": value, "size_mib": size_mib, **extra}
    if len(rates) > 1:
        record["runs_mib_s"] = rates
    emit(record)
    return value


# --- benchmarks ------------------------------------------------------------------------------


def bench_rest_fs(args: argparse.Namespace) -> None:
    size = args.size_mib * MIB
    pattern().sha256(size)
    pipe, disk, ups, finishes, downs = [], [], [], [], []
    db = ""
    for run in range(args.repeat):
        log(f"[{run + 1}/{args.repeat}] in-process pipeline over {args.size_mib} MiB")
        pipe.append(pipeline_rate(size))
        log(f"[{run + 1}/{args.repeat}] disk write + fsync of {args.size_mib} MiB")
        disk.append(fs_write_rate(size))
        with Registry() as reg:
            trip = rest_roundtrip(reg, size)
            db = reg.db
        ups.append(rate(size, trip.up_s))
        finishes.append(round(trip.finish_s, 2))
        downs.append(rate(size, trip.down_s))
    mib = args.size_mib
    pipe_rate = figure("pipeline_encrypt_sha256", pipe, mib)
    figure("fs_write_fsync", disk, mib, note="disk baseline, info only")
    common = {"store": "fs", "db": db}
    up = figure("rest_fs_upload", ups, mib, finish_s=median(finishes), **common)
    down = figure("rest_fs_download", downs, mib, **common)
    ratio_record("rest_fs_vs_pipeline_upload", up / pipe_rate, REST_FS_TARGET)
    ratio_record("rest_fs_vs_pipeline_download", down / pipe_rate, REST_FS_TARGET)


def _s3_client(endpoint: str):
    return boto3.session.Session().client(
        "s3",
        endpoint_url=endpoint,
        region_name=REGION,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",  # moto's dummy keys
    )


def boto3_upload(client, bucket: str, key: str, size: int) -> float:
    """Plain boto3 upload_fileobj (default TransferConfig) from a non-seekable stream."""
    start = time.perf_counter()
    client.upload_fileobj(pattern().reader(size), bucket, key)
    return time.perf_counter() - start


def boto3_download(client, bucket: str, key: str, size: int) -> float:
    """Plain boto3 download_fileobj (default TransferConfig) into a hashing sink."""
    sink = HashingSink()
    start = time.perf_counter()
    client.download_fileobj(bucket, key, sink)
    elapsed = time.perf_counter() - start
    if sink.size != size or sink.digest.hexdigest() != pattern().sha256(size):
        raise RuntimeError(f"boto3 download_fileobj: got {sink.size} bytes, wrong digest")
    return elapsed


def boto3_get_stream(client, bucket: str, key: str, size: int) -> float:
    """One GetObject streamed in 1 MiB chunks and hashed: how S3Store.read fetches."""
    digest = hashlib.sha256()
    received = 0
    start = time.perf_counter()
    body = client.get_object(Bucket=bucket, Key=key)["Body"]
    try:
        for chunk in body.iter_chunks(DOWNLOAD_CHUNK):
            digest.update(chunk)
            received += len(chunk)
    finally:
        body.close()
    elapsed = time.perf_counter() - start
    if received != size or digest.hexdigest() != pattern().sha256(size):
        raise RuntimeError(f"boto3 get_object: got {received} bytes, wrong digest")
    return elapsed


def bench_rest_s3(args: argparse.Namespace) -> None:
    size = args.size_mib * MIB
    pattern().sha256(size)
    bucket = "smr-bench"
    b_up, b_down, b_get, ups, finishes, downs = [], [], [], [], [], []
    db = ""
    with MotoServer() as moto:
        client = _s3_client(moto.url)
        client.create_bucket(Bucket=bucket)
        store_env = {
            "SMR_STORAGE": "s3",
            "S3_ENDPOINT_URL": moto.url,
            "S3_BUCKET": bucket,
            "S3_REGION": REGION,
            **moto_credentials(),
        }
        for run in range(args.s3_repeat):
            tag = f"[{run + 1}/{args.s3_repeat}]"
            key = f"baseline/{run}.bin"
            log(f"{tag} boto3 upload_fileobj {args.size_mib} MiB -> {moto.url}")
            b_up.append(rate(size, boto3_upload(client, bucket, key, size)))
            log(f"{tag} boto3 download_fileobj {args.size_mib} MiB")
            b_down.append(rate(size, boto3_download(client, bucket, key, size)))
            log(f"{tag} boto3 get_object (one streamed GET) {args.size_mib} MiB")
            b_get.append(rate(size, boto3_get_stream(client, bucket, key, size)))
            client.delete_object(Bucket=bucket, Key=key)  # keep moto's memory in check
            with Registry(store_env=store_env) as reg:
                trip = rest_roundtrip(reg, size)
                db = reg.db
            ups.append(rate(size, trip.up_s))
            finishes.append(round(trip.finish_s, 2))
            downs.append(rate(size, trip.down_s))
    mib = args.size_mib
    base_up = figure("boto3_s3_upload", b_up, mib, api="upload_fileobj")
    base_down = figure("boto3_s3_download", b_down, mib, api="download_fileobj")
    base_get = figure("boto3_s3_get_stream", b_get, mib, api="get_object", note="info only")
    common = {"store": "s3", "db": db}
    up = figure("rest_s3_upload", ups, mib, finish_s=median(finishes), **common)
    down = figure("rest_s3_download", downs, mib, **common)
    ratio_record("rest_s3_vs_boto3_upload", up / base_up, REST_S3_TARGET)
    ratio_record("rest_s3_vs_boto3_download", down / base_down, REST_S3_TARGET)
    # Not a target: the same comparison against one streamed GET (see README).
    emit(
        {
            "bench": "rest_s3_vs_boto3_get_stream_download",
            "ratio": round(down / base_get, 3),
            "target": None,
            "ok": None,
        }
    )


def rss_for(size_mib: int) -> dict:
    """Fresh single-worker server; peak worker RSS over an upload + download of size_mib."""
    size = size_mib * MIB
    pattern().sha256(size)
    with Registry(workers=1) as reg:
        with RssSampler(reg.master_pid) as sampler:
            idle = sampler.hwm_mib()  # the worker's peak before any transfer
            trip = rest_roundtrip(reg, size)
            hwm = sampler.hwm_mib()
        if len(sampler.pids) != 1:
            log(f"warning: saw worker pids {sorted(sampler.pids)} (a worker restarted?)")
        return {
            "bench": f"rss_{size_mib}mib",
            "peak_rss_mib": max(hwm or 0.0, sampler.peak_mib),
            "vm_hwm_mib": hwm,
            "sampled_max_rss_mib": sampler.peak_mib,
            "idle_hwm_mib": idle,
            "samples": sampler.samples,
            "worker_pids": len(sampler.pids),
            "upload_mib_s": rate(size, trip.up_s),
            "download_mib_s": rate(size, trip.down_s),
            "size_mib": size_mib,
            "store": "fs",
            "db": reg.db,
        }


def bench_rss(args: argparse.Namespace) -> None:
    small = emit(rss_for(args.size_mib))
    big = emit(rss_for(args.big_mib))
    ratio_record(
        "rss_big_vs_small",
        big["peak_rss_mib"] / small["peak_rss_mib"],
        RSS_GROWTH_TARGET,
        at_most=True,
        small_mib=args.size_mib,
        big_mib=args.big_mib,
    )
    peak = max(big["peak_rss_mib"], small["peak_rss_mib"])
    emit(
        {
            "bench": "rss_absolute",
            "peak_rss_mib": peak,
            "target": f"<{RSS_ABSOLUTE_TARGET_MIB}",
            "ok": peak < RSS_ABSOLUTE_TARGET_MIB,
        }
    )


BENCHMARKS: dict[str, Callable[[argparse.Namespace], None]] = {
    "rest_fs": bench_rest_fs,
    "rest_s3": bench_rest_s3,
    "rss": bench_rss,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--big-mib", type=int, default=4096)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--s3-repeat", type=int, default=1)
    parser.add_argument("--only", action="append", choices=sorted(BENCHMARKS))
    args = parser.parse_args(argv)
    failed = False
    for name, fn in BENCHMARKS.items():
        if args.only and name not in args.only:
            continue
        try:
            fn(args)
        except Exception as exc:
            failed = True
            emit({"bench": name, "error": f"{type(exc).__name__}: {exc}"})
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
