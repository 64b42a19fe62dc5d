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
import sys
import time
from collections.abc import Callable
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


def rest_upload(reg: Registry, session: requests.Session, files_url: str, size: int) -> float:
    """PUT `size` bytes as a raw streamed body; returns seconds. Verifies the server's digest."""
    data = pattern()
    expected = data.sha256(size)
    url = f"{files_url}/weights.bin"
    start = time.perf_counter()
    r = session.put(
        url,
        data=data.body(size),
        headers=reg.headers(**{"Content-Length": str(size),
                               "Content-Type": "application/octet-stream"}),
        timeout=(10, 900),
    )
    elapsed = time.perf_counter() - start
    check(r, 201)
    body = r.json()
    if body["size"] != size or body["sha256"] != expected:
        raise RuntimeError(f"upload: server stored {body['size']} bytes sha256 {body['sha256']}")
    return elapsed


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


def rest_roundtrip(reg: Registry, size: int) -> tuple[float, float]:
    pattern().sha256(size)  # precompute outside the timings
    with requests.Session() as session:
        files_url = reg.new_version(session)
        log(f"REST upload {size // MIB} MiB -> {reg.base}")
        up = rest_upload(reg, session, files_url, size)
        log(f"REST download {size // MIB} MiB")
        down = rest_download(reg, session, files_url, size)
    return up, down


# --- benchmarks ------------------------------------------------------------------------------


def bench_rest_fs(args: argparse.Namespace) -> None:
    size = args.size_mib * MIB
    pattern().sha256(size)
    log(f"in-process pipeline over {args.size_mib} MiB")
    pipe = pipeline_rate(size)
    emit({"bench": "pipeline_encrypt_sha256", "mib_s": pipe, "size_mib": args.size_mib})
    with Registry() as reg:
        up, down = rest_roundtrip(reg, size)
        db = reg.db
    common = {"size_mib": args.size_mib, "store": "fs", "db": db}
    up_rate, down_rate = rate(size, up), rate(size, down)
    emit({"bench": "rest_fs_upload", "mib_s": up_rate, "seconds": round(up, 2), **common})
    emit({"bench": "rest_fs_download", "mib_s": down_rate, "seconds": round(down, 2), **common})
    ratio_record("rest_fs_vs_pipeline_upload", up_rate / pipe, REST_FS_TARGET)
    ratio_record("rest_fs_vs_pipeline_download", down_rate / pipe, REST_FS_TARGET)


def boto3_roundtrip(endpoint: str, bucket: str, size: int) -> tuple[float, float]:
    """Plain boto3 upload_fileobj / download_fileobj (default TransferConfig); seconds each."""
    data = pattern()
    expected = data.sha256(size)
    client = boto3.session.Session().client(
        "s3",
        endpoint_url=endpoint,
        region_name=REGION,
        **_boto_keys(),
    )
    key = "baseline/weights.bin"
    log(f"boto3 upload_fileobj {size // MIB} MiB -> {endpoint}")
    start = time.perf_counter()
    client.upload_fileobj(data.reader(size), bucket, key)
    up = time.perf_counter() - start
    log(f"boto3 download_fileobj {size // MIB} MiB")
    sink = HashingSink()
    start = time.perf_counter()
    client.download_fileobj(bucket, key, sink)
    down = time.perf_counter() - start
    if sink.size != size or sink.digest.hexdigest() != expected:
        raise RuntimeError(f"boto3 download: got {sink.size} bytes")
    client.delete_object(Bucket=bucket, Key=key)  # keep moto's memory for the REST run
    return up, down


def bench_rest_s3(args: argparse.Namespace) -> None:
    size = args.size_mib * MIB
    pattern().sha256(size)
    bucket = "smr-bench"
    with MotoServer() as moto:
        boto3.session.Session().client(
            "s3", endpoint_url=moto.url, region_name=REGION, **_boto_keys()
        ).create_bucket(Bucket=bucket)
        b_up, b_down = boto3_roundtrip(moto.url, bucket, size)
        store_env = {
            "SMR_STORAGE": "s3",
            "S3_ENDPOINT_URL": moto.url,
            "S3_BUCKET": bucket,
            "S3_REGION": REGION,
            **moto_credentials(),
        }
        with Registry(store_env=store_env) as reg:
            up, down = rest_roundtrip(reg, size)
            db = reg.db
    common = {"size_mib": args.size_mib}
    rates = {
        "boto3_s3_upload": rate(size, b_up),
        "boto3_s3_download": rate(size, b_down),
        "rest_s3_upload": rate(size, up),
        "rest_s3_download": rate(size, down),
    }
    seconds = {
        "boto3_s3_upload": b_up, "boto3_s3_download": b_down,
        "rest_s3_upload": up, "rest_s3_download": down,
    }
    for name, value in rates.items():
        extra = {"store": "s3", "db": db} if name.startswith("rest") else {}
        emit({"bench": name, "mib_s": value, "seconds": round(seconds[name], 2),
              **common, **extra})
    ratio_record(
        "rest_s3_vs_boto3_upload", rates["rest_s3_upload"] / rates["boto3_s3_upload"],
        REST_S3_TARGET,
    )
    ratio_record(
        "rest_s3_vs_boto3_download", rates["rest_s3_download"] / rates["boto3_s3_download"],
        REST_S3_TARGET,
    )


def _boto_keys() -> dict[str, str]:
    return {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}


def rss_for(size_mib: int) -> dict:
    """Fresh single-worker server; peak worker RSS over an upload + download of size_mib."""
    size = size_mib * MIB
    pattern().sha256(size)
    with Registry(workers=1) as reg:
        with RssSampler(reg.master_pid) as sampler:
            baseline = sampler.hwm_mib()  # worker's peak before any transfer
            up, down = rest_roundtrip(reg, size)
            hwm = sampler.hwm_mib()
        if len(sampler.pids) != 1:
            log(f"warning: saw worker pids {sorted(sampler.pids)} (a worker restarted?)")
        return {
            "bench": f"rss_{size_mib}mib",
            "peak_rss_mib": max(hwm or 0.0, sampler.peak_mib),
            "vm_hwm_mib": hwm,
            "sampled_max_rss_mib": sampler.peak_mib,
            "idle_hwm_mib": baseline,
            "samples": sampler.samples,
            "worker_pids": len(sampler.pids),
            "upload_mib_s": rate(size, up),
            "download_mib_s": rate(size, down),
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
