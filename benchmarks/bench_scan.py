"""Scanner benchmarks (JSON lines on stdout), three figures measured side by side in one run.

    .venv/bin/python benchmarks/bench_scan.py [--size-mib 2048] [--scan-mib 256] [--repeat 3]
        [--submits 20] [--part throughput --part decrypt --part worker] [--peers-dir DIR]

1. Throughput against picklescan and modelscan on the same files, built here: a PyTorch zip
   checkpoint (Llama-like layout, data.pkl written opcode by opcode, stored tensor members), a
   plain pickle of numpy arrays and a vocabulary, a .npy, the committed scikit-learn joblib
   fixture, and two malicious files (os.system("echo ...") as a pickle and as a checkpoint's
   data.pkl). `ratio`: every tool as a fresh process per file, the peers' CLIs and ours as
   OURS_CHILD (interpreter + registry.scanners, no Django), start-up included for all.
   `ratio_net`: the peer's time less its start-up (timed on a 4-byte pickle) against our
   in-process scan (what a worker pays), where the peer's net time is above the noise. The
   peers live in their own venvs under --peers-dir (default ~/.cache/smr-bench/peers, kept
   between runs: creating them takes about 15 s), never in the project's.
2. Bytes decrypted to scan a PyTorch zip checkpoint of --size-mib (2048 unless --size-mib is
   given below 1024, run.py's default): uploaded with `artifact_upload` (the zip is generated
   as it streams, never held in memory), submitted, scanned by `scanning.version_scan` in this
   process; the ScanReport's `bytes_read` / size. Once with a Llama-like layout (146 tensors)
   and once with 4 tensors, since every tensor member costs a segment.
3. Worker overhead: submit-to-pending_review latency of a 1 KiB version through gunicorn and a
   real Celery worker consuming the `scan` queue on Redis (db 13): POST .../submit, then GET
   /api/v1/jobs/{id} every 10 ms until it finished.

Uses its own PostgreSQL database (smr_bench_scan, dropped and recreated each run: the audit
table is append-only) and Redis db 13 (flushed). Servers and the worker run in their own
process groups and are torn down, with the temporary folders, even on failure or SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import uuid
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(ROOT))

import common  # noqa: E402
from common import MIB, emit, log  # noqa: E402

DB_NAME = "smr_bench_scan"
BASE_URL = os.environ.get("BENCH_PG_URL", "postgres://postgres@127.0.0.1:5432")
BROKER = os.environ.get("BENCH_SCAN_BROKER", "redis://127.0.0.1:6379/13")
# What goes into each peer's venv, and its command line. picklescan imports numpy for .npy
# files without declaring it; modelscan 0.8 calls numpy.lib.format._check_version, which
# numpy 2 removed (every .npy would be an error).
PEERS: dict[str, tuple[list[str], Callable[[str, Path], list[str]]]] = {
    "picklescan": (["picklescan", "numpy"], lambda exe, path: [exe, "--path", str(path)]),
    "modelscan": (["modelscan", "numpy<2"], lambda exe, path: [exe, "-p", str(path)]),
}
FIXTURES = ROOT / "tests" / "registry" / "scanners" / "fixtures"
PEER_TIMEOUT = 600
NET_NOISE_S = 0.02
STUCK_S = 60  # a 1 KiB scan job still unfinished after this long is counted as stuck


# --- pickles, opcode by opcode ------------------------------------------------------------------


def _str(s: str) -> bytes:
    data = s.encode()
    return b"X" + struct.pack("<I", len(data)) + data  # BINUNICODE


def _int(n: int) -> bytes:
    if 0 <= n < 256:
        return b"K" + bytes([n])  # BININT1
    if 0 <= n < 65536:
        return b"M" + struct.pack("<H", n)  # BININT2
    if -(2**31) <= n < 2**31:
        return b"J" + struct.pack("<i", n)  # BININT
    body = n.to_bytes((n.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(body)]) + body  # LONG1


def _global(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def torch_data_pkl(tensors: list[tuple[str, int]], storage: str) -> bytes:
    """What torch.save writes as data.pkl for a state dict of 1-D tensors (protocol 2): an
    OrderedDict of _rebuild_tensor_v2(persistent storage key, offset, shape, stride, ...),
    checked against the committed fixture linear_state_dict.pt."""
    out = [b"\x80\x02", _global("collections", "OrderedDict"), b"q\x00)R(", b""]
    seen_rebuild = seen_storage = False
    for batch in range(0, len(tensors), 1000):  # the pickler batches SETITEMS by 1000
        if batch:
            out.append(b"(")
        for index, (name, numel) in enumerate(tensors[batch : batch + 1000], start=batch):
            out.append(_str(name))
            out.append(b"h\x01" if seen_rebuild else _global("torch._utils", "_rebuild_tensor_v2"))
            if not seen_rebuild:
                out.append(b"q\x01")
                seen_rebuild = True
            out.append(b"((" + _str("storage"))
            out.append(b"h\x02" if seen_storage else _global("torch", storage) + b"q\x02")
            seen_storage = True
            out.append(_str(str(index)) + _str("cpu") + _int(numel) + b"tQ")
            # offset, shape, stride, requires_grad, backward hooks (an empty OrderedDict)
            out.append(_int(0) + _int(numel) + b"\x85" + _int(1) + b"\x85\x89h\x00)Rt")
            out.append(b"R")
        out.append(b"u")
    # state._metadata = {"": {"version": 1}}, set through BUILD as torch does
    out.append(b"}" + _str("_metadata") + b"h\x00)R" + _str("") + b"}" + _str("version"))
    out.append(_int(1) + b"sssb.")
    return b"".join(out)


def plain_pickle(array_bytes: int, vocab: int) -> bytes:
    """A plain pickle (protocol 4) of {"vocab": {token: id}, "arrays": [ndarray, ...]}: what
    people save with pickle.dump, opcode-heavy (the vocabulary) and byte-heavy (the arrays,
    pickled as numpy 2 does: _reconstruct + BUILD with the raw bytes)."""
    out = [b"\x80\x04}(", _str("vocab"), b"}("]
    for i in range(vocab):
        if i and i % 1000 == 0:
            out.append(b"u(")
        out.append(_str(f"tok{i:07d}") + _int(i))
    out.append(b"u" + _str("arrays") + b"](")
    chunk = 8 * MIB
    blob = os.urandom(chunk)
    left = array_bytes
    while left > 0:
        n = min(chunk, left) // 4 * 4 or 4
        left -= n
        out.append(
            _global("numpy._core.multiarray", "_reconstruct")
            + _global("numpy", "ndarray")
            + _int(0)
            + b"\x85C\x01b\x87R("  # ((0,), b"b") -> REDUCE, then MARK for the BUILD state
            + _int(1)
            + _int(n // 4)
            + b"\x85"
            + _global("numpy", "dtype")
            + b"\x8c\x02f4\x89\x88\x87R("  # dtype("f4", False, True), then its state
            + _int(3)
            + b"\x8c\x01<NNN"
            + _int(-1)
            + _int(-1)
            + _int(0)
            + b"tb\x89"
            + b"\x8e"  # BINBYTES8
            + struct.pack("<Q", n)
            + blob[:n]
            + b"tb"
        )
    out.append(b"eu.")  # APPENDS the arrays, SETITEMS the two keys
    return b"".join(out)


def malicious_pickle() -> bytes:
    """os.system("echo ...") through GLOBAL + REDUCE: every scanner must flag this one."""
    return b"\x80\x02" + _global("os", "system") + _str("echo smr-bench-scan") + b"\x85R."


def tiny_pickle() -> bytes:
    return b"\x80\x02}."  # {}: start-up cost only


def npy_header(nbytes: int) -> bytes:
    header = f"{{'descr': '<f4', 'fortran_order': False, 'shape': ({nbytes // 4},), }}"
    header = header.ljust(128 - 10 - 1) + "\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode()


# --- zips, streamed -----------------------------------------------------------------------------


@dataclass
class Member:
    name: str
    size: int
    crc: int
    chunks: Callable[[], Iterable[bytes]]


def bytes_member(name: str, data: bytes) -> Member:
    return Member(name, len(data), zlib.crc32(data), lambda: [data])


_crcs: dict[int, int] = {}


def pattern_member(name: str, size: int, pattern: common.Pattern) -> Member:
    """Tensor bytes from the repeated random pattern (every member starts at its offset 0,
    so members of one size share a CRC, computed once)."""
    if size not in _crcs:
        crc = 0
        for view in pattern.chunks(size):
            crc = zlib.crc32(view, crc)
        _crcs[size] = crc
    return Member(name, size, _crcs[size], lambda: pattern.chunks(size))


def stored_zip(members: list[Member], *, data: bool = True) -> Iterator[bytes]:
    """A zip of stored members as torch writes it (data aligned to 64 bytes through an "FB"
    padding extra field, zip64 only where a size or offset needs it), yielded as it goes;
    without `data`, everything but the members' bytes (to know the size beforehand)."""
    central = []
    offset = 0
    for m in members:
        name = m.name.encode()
        big = m.size >= 0xFFFFFFFF
        zip64 = struct.pack("<HHQQ", 1, 16, m.size, m.size) if big else b""
        used = offset + 30 + len(name) + len(zip64) + 4
        pad = b"Z" * (-used % 64)
        extra = zip64 + struct.pack("<HH", 0x4246, len(pad)) + pad
        size32 = 0xFFFFFFFF if big else m.size
        local = struct.pack(
            "<IHHHHHIIIHH",
            0x04034B50,
            45 if big else 20,
            0,
            0,
            0,
            0x21,
            m.crc,
            size32,
            size32,
            len(name),
            len(extra),
        )
        yield local + name + extra
        if data:
            written = 0
            for chunk in m.chunks():
                written += len(chunk)
                yield chunk
            assert written == m.size, (m.name, written, m.size)
        central.append((m, name, offset))
        offset += len(local) + len(name) + len(extra) + m.size
    cd_start = offset
    for m, name, at in central:
        values = []
        if m.size >= 0xFFFFFFFF:
            values += [m.size, m.size]
        if at >= 0xFFFFFFFF:
            values.append(at)
        extra = struct.pack(f"<HH{len(values)}Q", 1, 8 * len(values), *values) if values else b""
        size32 = 0xFFFFFFFF if m.size >= 0xFFFFFFFF else m.size
        record = struct.pack(
            "<IHHHHHHIIIHHHHHII",
            0x02014B50,
            45,
            45 if values else 20,
            0,
            0,
            0,
            0x21,
            m.crc,
            size32,
            size32,
            len(name),
            len(extra),
            0,
            0,
            0,
            0,
            min(at, 0xFFFFFFFF),
        )
        yield record + name + extra
        offset += len(record) + len(name) + len(extra)
    cd_size = offset - cd_start
    count = len(members)
    if count >= 0xFFFF or cd_start >= 0xFFFFFFFF or cd_size >= 0xFFFFFFFF:
        yield struct.pack(
            "<IQHHIIQQQQ", 0x06064B50, 44, 45, 45, 0, 0, count, count, cd_size, cd_start
        )
        yield struct.pack("<IIQI", 0x07064B50, 0, offset, 1)
    yield struct.pack(
        "<IHHHHIIH",
        0x06054B50,
        0,
        0,
        min(count, 0xFFFF),
        min(count, 0xFFFF),
        min(cd_size, 0xFFFFFFFF),
        min(cd_start, 0xFFFFFFFF),
        0,
    )


def zip_size(members: list[Member]) -> int:
    return sum(len(c) for c in stored_zip(members, data=False)) + sum(m.size for m in members)


# The tensors of a Llama-3.2-1B-like model: 16 layers of q, k, v, o, gate, up, down and two
# norms, the (tied) embedding and a final norm: 146 tensors, sizes in parameters.
def llama_layout() -> list[tuple[str, int]]:
    d, kv, ff, vocab, layers = 2048, 512, 8192, 128256, 16
    out = [("model.embed_tokens.weight", vocab * d)]
    for i in range(layers):
        p = f"model.layers.{i}."
        out += [
            (p + "self_attn.q_proj.weight", d * d),
            (p + "self_attn.k_proj.weight", d * kv),
            (p + "self_attn.v_proj.weight", d * kv),
            (p + "self_attn.o_proj.weight", d * d),
            (p + "mlp.gate_proj.weight", d * ff),
            (p + "mlp.up_proj.weight", d * ff),
            (p + "mlp.down_proj.weight", ff * d),
            (p + "input_layernorm.weight", d),
            (p + "post_attention_layernorm.weight", d),
        ]
    out.append(("model.norm.weight", d))
    return out


def checkpoint_members(
    total: int, pattern: common.Pattern, *, layout: list[tuple[str, int]], malicious: bool = False
) -> list[Member]:
    """A torch.save-style zip of bf16 tensors whose sizes follow `layout`, scaled so the
    tensor bytes add up to about `total`."""
    params = sum(n for _, n in layout)
    scale = total / (2 * params)
    tensors = [(name, max(32, int(n * scale) // 32 * 32)) for name, n in layout]
    root = "checkpoint/"
    data_pkl = malicious_pickle() if malicious else torch_data_pkl(tensors, "BFloat16Storage")
    members = [
        bytes_member(root + "data.pkl", data_pkl),
        bytes_member(root + ".format_version", b"1"),
        bytes_member(root + ".storage_alignment", b"64"),
        bytes_member(root + "byteorder", b"little"),
    ]
    members += [
        pattern_member(f"{root}data/{i}", numel * 2, pattern)
        for i, (_, numel) in enumerate(tensors)
    ]
    members += [
        bytes_member(root + "version", b"3\n"),
        bytes_member(root + ".data/serialization_id", uuid.uuid4().hex.encode().ljust(40, b"0")),
    ]
    return members


def write_stream(path: Path, chunks: Iterable[bytes]) -> int:
    size = 0
    with path.open("wb") as out:
        for chunk in chunks:
            out.write(chunk)
            size += len(chunk)
    return size


# --- 1. throughput against the peers ------------------------------------------------------------


class CountingSource:
    """Counts the bytes an analyser reads through a Source."""

    def __init__(self, source) -> None:
        self._source = source
        self.bytes_read = 0

    @property
    def size(self) -> int:
        return self._source.size

    def read(self, start: int, end: int) -> bytes:
        data = self._source.read(start, end)
        self.bytes_read += len(data)
        return data


def quarantined(findings: Iterable[tuple[str, int]]) -> bool:
    """How the registry judges (rule, severity) findings: quarantine at or above the default
    namespace threshold (medium), or when anything could not be analysed."""
    from registry import scanners

    return any(
        severity >= scanners.Severity.MEDIUM
        or scanners.is_unanalysable(scanners.Finding(rule, scanners.Severity(severity), ""))
        for rule, severity in findings
    )


def scan_local(path: Path, repeat: int) -> dict:
    """Scan one file with registry.scanners in this process (what a worker pays): the median
    of `repeat` timed scans, then one more through a counter for the bytes read."""
    from registry import scanners
    from registry.scanners.base import FileSource

    times = []
    for _ in range(repeat):
        with FileSource(str(path)) as source:
            start = time.perf_counter()
            scanners.scan(source, name=path.name)
            times.append(time.perf_counter() - start)
    with FileSource(str(path)) as file:
        counted = CountingSource(file)
        result = scanners.scan(counted, name=path.name)
    return {
        "flagged": quarantined((f.rule, f.severity) for f in result.findings),
        "seconds": statistics.median(times),
        "bytes_read": counted.bytes_read,
        "rules": sorted({f.rule for f in result.findings}),
    }


# Our scanner as a fresh process, like the peers' CLIs: the interpreter, registry.scanners and
# its ranged FileSource, nothing else (this module's imports would add ~0.1 s; manage.py
# scan_file adds Django's start-up, reported apart as scan_startup_scan_file).
OURS_CHILD = """\
import json, os, sys
from registry import scanners
from registry.scanners.base import FileSource
with FileSource(sys.argv[1]) as source:
    result = scanners.scan(source, name=os.path.basename(sys.argv[1]))
print(json.dumps([[f.rule, int(f.severity)] for f in result.findings]))
"""


def build_scan_files(folder: Path, scan_mib: int, pattern: common.Pattern) -> list[dict]:
    """The throughput set: (path, kind, malicious) for each file."""
    files = []

    def add(name: str, kind: str, size_or_data: int | bytes, malicious: bool = False) -> None:
        path = folder / name
        if isinstance(size_or_data, bytes):
            path.write_bytes(size_or_data)
        files.append({"path": path, "kind": kind, "malicious": malicious})

    total = scan_mib * MIB
    members = checkpoint_members(total, pattern, layout=llama_layout())
    write_stream(folder / "checkpoint.pt", stored_zip(members))
    add("checkpoint.pt", "pytorch_zip", 0)
    vocab = max(10_000, scan_mib * 2000)
    add("arrays_vocab.pkl", "plain_pickle", plain_pickle(max(MIB, total // 8), vocab=vocab))
    with (folder / "array.npy").open("wb") as out:
        out.write(npy_header(total))
        for view in pattern.chunks(total):
            out.write(view)
    add("array.npy", "npy", 0)
    shutil.copyfile(FIXTURES / "digits_pipeline.joblib", folder / "estimator.joblib")
    add("estimator.joblib", "joblib_fixture", 0)
    add("malicious.pkl", "malicious_pickle", malicious_pickle(), malicious=True)
    # Detection samples stay under 1 MiB: their times are start-up only and carry no target.
    bad = checkpoint_members(256 << 10, pattern, layout=llama_layout()[:4], malicious=True)
    write_stream(folder / "malicious.pt", stored_zip(bad))
    add("malicious.pt", "malicious_pytorch_zip", 0, malicious=True)
    for f in files:
        f["size"] = f["path"].stat().st_size
    return files


def peer_venv(name: str, peers_dir: Path) -> Path:
    """The peer's CLI in its own venv under peers_dir, created on first use and kept."""
    return common.peer_venv(name, PEERS[name][0], peers_dir)


def peer_version(exe: Path) -> str:
    code = f"import importlib.metadata as m; print(m.version({exe.name!r}))"
    argv = [str(exe.parent / "python"), "-c", code]
    out = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=60)
    return out.stdout.strip()


def run_tool(argv: list[str]) -> tuple[float, int, str]:
    """Wall time, exit status and output of one CLI run in a fresh process."""
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    start = time.perf_counter()
    out = subprocess.run(
        argv, cwd=ROOT, env=env, capture_output=True, text=True, check=False, timeout=PEER_TIMEOUT
    )
    return time.perf_counter() - start, out.returncode, out.stdout + out.stderr


def verdict_of(tool: str, code: int, output: str) -> str:
    """flagged, clean, error (the tool failed on the file) or skipped (not analysed)."""
    if tool == "ours":
        if code != 0:
            return "error"
        return "flagged" if quarantined(json.loads(output.strip().splitlines()[-1])) else "clean"
    if tool == "picklescan":  # 0 clean, 1 dangerous globals found, 2 scan error
        return {0: "clean", 1: "flagged"}.get(code, "error")
    # modelscan: 0 no issues, 1 issues found, 2 errors, 3 nothing scanned (an error or a skip)
    if code == 3:
        return "error" if "error" in output.lower() else "skipped"
    return {0: "clean", 1: "flagged"}.get(code, "error")


def scan_file_startup(tiny: Path, tmp: Path, repeat: int) -> None:
    """`manage.py scan_file` on the tiny pickle: what an operator's CLI call costs (info)."""
    argv = [common.PYTHON, "manage.py", "scan_file", str(tiny)]
    env = {**registry_env(tmp / "scan-file-var"), "PYTHONDONTWRITEBYTECODE": "1"}
    runs = []
    for _ in range(repeat + 1):
        start = time.perf_counter()
        out = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
        runs.append(time.perf_counter() - start)
    if out.returncode != 0:
        emit({"bench": "scan_startup_scan_file", "error": (out.stdout + out.stderr)[-500:]})
        return
    emit({"bench": "scan_startup_scan_file", "seconds": round(statistics.median(runs[1:]), 3)})


def ours_argv(path: Path) -> list[str]:
    return [common.PYTHON, "-c", OURS_CHILD, str(path)]


def bench_throughput(args: argparse.Namespace, tmp: Path, pattern: common.Pattern) -> None:
    folder = tmp / "files"
    folder.mkdir()
    files = build_scan_files(folder, args.scan_mib, pattern)
    tiny = folder / "tiny.pkl"
    tiny.write_bytes(tiny_pickle())
    tools: dict[str, Callable[[Path], list[str]]] = {"ours": ours_argv}
    versions = {}
    for name, (_, argv_of) in PEERS.items():
        try:
            exe = peer_venv(name, args.peers_dir)
        except Exception as exc:
            emit({"bench": f"scan_peer_{name}", "skipped": True, "reason": str(exc)[-500:]})
            continue
        tools[name] = lambda path, exe=exe, argv_of=argv_of: argv_of(str(exe), path)
        versions[name] = peer_version(exe)
    peers = [t for t in tools if t != "ours"]
    listing = [
        {"file": f["path"].name, "kind": f["kind"], "size_mib": round(f["size"] / MIB, 3)}
        for f in files
    ]
    emit(
        {
            "bench": "scan_files",
            "peers": versions,
            "peers_dir": str(args.peers_dir),
            "files": listing,
        }
    )

    # Each tool's start-up: interpreter, imports, a 4-byte pickle (page cache warmed first).
    startup = {}
    for tool, argv_of in tools.items():
        run_tool(argv_of(tiny))
        startup[tool] = statistics.median(run_tool(argv_of(tiny))[0] for _ in range(args.repeat))
        emit({"bench": f"scan_startup_{tool}", "seconds": round(startup[tool], 3)})
    scan_file_startup(tiny, tmp, args.repeat)

    results: dict[str, dict[str, dict]] = {}
    for f in files:
        path = f["path"]
        row: dict[str, dict] = {}
        results[path.name] = row
        # Interleaved rounds (our in-process scan included), so machine noise hits all alike.
        times: dict[str, list[float]] = {tool: [] for tool in tools}
        inproc = []
        for _ in range(args.repeat):
            row["inproc"] = scan_local(path, 1)
            inproc.append(row["inproc"]["seconds"])
            for tool, argv_of in tools.items():
                seconds, code, output = run_tool(argv_of(path))
                times[tool].append(seconds)
                row[tool] = {"verdict": verdict_of(tool, code, output), "tail": output[-300:]}
        for tool in tools:
            row[tool]["seconds"] = statistics.median(times[tool])
        row["inproc"]["seconds"] = statistics.median(inproc)

    for f in files:
        name, size = f["path"].name, f["size"]
        row = results[name]
        ours, inproc = row["ours"]["seconds"], row["inproc"]["seconds"]
        # Below 1 MiB the times are the tools' start-up, not their scanning: no target there.
        sized = size >= MIB
        for peer in peers:
            theirs = row[peer]["seconds"]
            ratio = theirs / ours  # = our MiB/s / the peer's MiB/s
            peer_net = theirs - startup[peer]
            # A net time within start-up noise says nothing about scanning speed.
            ratio_net = round(peer_net / inproc, 2) if sized and peer_net >= NET_NOISE_S else None
            emit(
                {
                    "bench": f"scan_vs_{peer}_{f['kind']}",
                    "file": name,
                    "size_mib": round(size / MIB, 3),
                    "ours_s": round(ours, 4),
                    "peer_s": round(theirs, 4),
                    "ours_mib_s": common.rate(size, ours),
                    "peer_mib_s": common.rate(size, theirs),
                    "ours_inprocess_s": round(inproc, 5),
                    "ours_inprocess_mib_s": common.rate(size, inproc),
                    "peer_net_s": round(peer_net, 4),
                    "ratio_net": ratio_net,
                    "ours_bytes_read": row["inproc"]["bytes_read"],
                    "ours_verdict": row["ours"]["verdict"],
                    "peer_verdict": row[peer]["verdict"],
                    "ratio": round(ratio, 3),
                    "target": ">=1" if sized else None,
                    "ok": ratio >= 1 if sized else None,
                }
            )
    # Detection parity: every malicious file flagged, every benign one judged clean.
    for tool in ["ours", *peers]:
        verdicts = {f["path"].name: results[f["path"].name][tool]["verdict"] for f in files}
        malicious = [f["path"].name for f in files if f["malicious"]]
        missed = [n for n in malicious if verdicts[n] != "flagged"]
        wrong = [n for n, v in verdicts.items() if n not in malicious and v != "clean"]
        record = {
            "bench": f"scan_detection_{tool}",
            "malicious_flagged": f"{len(malicious) - len(missed)}/{len(malicious)}",
            "benign_not_clean": wrong,
            "verdicts": verdicts,
        }
        if tool == "ours":
            record["rules"] = {n: r["inproc"]["rules"] for n, r in results.items()}
            record.update(
                target="all malicious flagged, all benign clean", ok=not (missed or wrong)
            )
        else:
            record["output_tails"] = {
                n: results[n][tool]["tail"]
                for n, v in verdicts.items()
                if v in ("error", "skipped")
            }
        emit(record)
    sized_files = [f for f in files if f["size"] >= MIB]
    total = sum(f["size"] for f in sized_files)
    ours_total = sum(results[f["path"].name]["ours"]["seconds"] for f in sized_files)
    for peer in peers:
        theirs_total = sum(results[f["path"].name][peer]["seconds"] for f in sized_files)
        emit(
            {
                "bench": f"scan_vs_{peer}_all_files",
                "files": len(sized_files),
                "size_mib": round(total / MIB, 1),
                "ours_s": round(ours_total, 3),
                "peer_s": round(theirs_total, 3),
                "ours_mib_s": common.rate(total, ours_total),
                "peer_mib_s": common.rate(total, theirs_total),
                "ratio": round(theirs_total / ours_total, 3),
                "target": ">=1",
                "ok": theirs_total >= ours_total,
            }
        )


# --- Django, in this process --------------------------------------------------------------------


def registry_env(var: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("DJANGO_SETTINGS_MODULE", None)
    env.update(
        {
            "DATABASE_URL": f"{BASE_URL}/{DB_NAME}",
            "SMR_VAR_DIR": str(var),
            "SECRET_KEY": "bench-" + uuid.uuid4().hex,
            "SMR_STORAGE": "fs",
            "SMR_OBJECTS_DIR": str(var / "objects"),
            "SMR_KEY_PROVIDER": "local",
            "CELERY_BROKER_URL": BROKER,
            "LOG_LEVEL": "WARNING",
            "PYTHONUNBUFFERED": "1",
        }
    )
    return env


_django_ready = False


def setup_django(var: Path) -> None:
    """Recreate smr_bench_scan, migrate it, configure Django on it here (once)."""
    global _django_ready
    if _django_ready:
        return
    import psycopg

    with psycopg.connect(f"{BASE_URL}/postgres", autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {DB_NAME} WITH (FORCE)")
        conn.execute(f"CREATE DATABASE {DB_NAME}")
    os.environ.update(registry_env(var))
    os.environ["DJANGO_SETTINGS_MODULE"] = "registry.settings"
    import django

    django.setup()
    from django.core.management import call_command

    from registry.keyconfig import local_keyring

    call_command("migrate", verbosity=0)
    local_keyring()  # before any server or worker starts, so none races to create it
    _django_ready = True


# --- 2. bytes decrypted to scan a checkpoint ----------------------------------------------------


def bench_decrypt(args: argparse.Namespace, tmp: Path, pattern: common.Pattern) -> None:
    setup_django(tmp / "var")
    from django.contrib.auth.models import User

    from registry.crypto import stream
    from registry.models import ScanReport
    from registry.services import catalog, scanning
    from registry.services.artifacts import artifact_upload

    mib = args.checkpoint_mib
    user = User.objects.create(username=f"alice-{uuid.uuid4().hex[:8]}")
    ns = catalog.namespace_create(name=f"scan-{uuid.uuid4().hex[:8]}", creator=user)
    model = catalog.model_create(namespace=ns, name="llm", creator=user)
    layouts = {
        "llama_146_tensors": llama_layout(),
        "4_tensors": [(f"w{i}", 1) for i in range(4)],
    }
    for label, layout in layouts.items():
        members = checkpoint_members(mib * MIB, pattern, layout=layout)
        size = zip_size(members)
        version = catalog.version_create(model=model, creator=user)
        started = time.perf_counter()
        artifact = artifact_upload(
            version=version,
            path="model.pt",
            chunks=stored_zip(members),
            expected_sha256=None,
            expected_size=size,
            creator=user,
        )
        upload_s = time.perf_counter() - started
        version, job = catalog.version_submit(version=version, submitter=user)
        started = time.perf_counter()
        state = scanning.version_scan(job_id=job.pk)
        scan_s = time.perf_counter() - started
        report = ScanReport.objects.get(job=job, artifact=artifact)
        fraction = report.bytes_read / size
        suffix = "" if label.startswith("llama") else f"_{label}"
        emit(
            {
                "bench": "scan_bytes_decrypted" + suffix,
                "layout": label,
                "tensors": len(layout),
                "size_mib": round(size / MIB, 1),
                "bytes_decrypted": report.bytes_read,
                "segments": -(-report.bytes_read // stream.SEGMENT_PLAINTEXT),
                "segment_mib": round(stream.SEGMENT_SIZE / MIB, 3),
                "scan_s": round(scan_s, 3),
                "upload_s": round(upload_s, 1),
                "state": state,
                "verdict": report.verdict,
                "rules": sorted({f["rule"] for f in report.findings}),
                "fraction": round(fraction, 5),
                "target": "<=0.01",
                "ok": fraction <= 0.01,
            }
        )


# --- 3. worker overhead -------------------------------------------------------------------------


class Servers:
    """gunicorn and a Celery worker on the `scan` queue, each in its own process group."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.web: subprocess.Popen | None = None
        self.worker: subprocess.Popen | None = None
        self.base = ""
        self.token = ""

    def __enter__(self) -> Servers:
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is not None:
            log(f"gunicorn log:\n{common.tail(self.tmp / 'gunicorn.log')}")
            log(f"worker log:\n{common.tail(self.tmp / 'worker.log', 80)}")
        self.close()

    def close(self) -> None:
        try:
            common.stop_group(self.worker)
        finally:
            common.stop_group(self.web)
            self.worker = self.web = None

    def _start(self) -> None:
        import redis
        import requests

        redis.Redis.from_url(BROKER).flushdb()  # nothing left from an earlier run or part 2
        env = registry_env(Path(os.environ["SMR_VAR_DIR"]))
        env["SECRET_KEY"] = os.environ["SECRET_KEY"]
        self.token = (
            common.run_checked(
                [
                    common.PYTHON,
                    "manage.py",
                    "issue_token",
                    "bob-bench",
                    "--namespace",
                    "bench-worker",
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
        port = common.free_port()
        self.web = common.start_group(
            [
                common.GUNICORN,
                "registry.wsgi:application",
                "-c",
                common.gunicorn_conf(),
                "--bind",
                f"127.0.0.1:{port}",
            ],
            env=env,
            log_path=self.tmp / "gunicorn.log",
        )
        self.worker = common.start_group(
            [
                str(common.VENV_BIN / "celery"),
                "-A",
                "workers.app",
                "worker",
                "-Q",
                "scan",
                "--concurrency",
                "1",
                "--loglevel",
                "warning",
                "--without-gossip",
                "--without-mingle",
                "--without-heartbeat",
            ],
            env=env,
            log_path=self.tmp / "worker.log",
        )
        self.base = f"http://127.0.0.1:{port}"
        # A loaded machine can take longer than wait_http's 2 s read timeout to answer at first.
        for attempt in range(5):
            try:
                common.wait_http(f"{self.base}/healthz", self.web, self.tmp / "gunicorn.log")
                break
            except requests.Timeout:
                if attempt == 4:
                    raise

    def headers(self, **extra: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}", **extra}


def submit_once(servers: Servers, session, model_url: str, body: bytes) -> dict:
    r = session.post(f"{model_url}/versions", json={}, headers=servers.headers(), timeout=30)
    common.check(r, 201)
    version_url = f"{model_url}/versions/{r.json()['number']}"
    r = session.put(
        f"{version_url}/files/weights.npy",
        data=body,
        headers=servers.headers(**{"Content-Type": "application/octet-stream"}),
        timeout=30,
    )
    common.check(r, 201)
    start = time.perf_counter()
    r = session.post(f"{version_url}/submit", headers=servers.headers(), timeout=30)
    common.check(r, 202)
    accepted = time.perf_counter() - start
    job_url = f"{servers.base}/api/v1/jobs/{r.json()['job']['id']}"
    deadline = start + STUCK_S
    while True:
        r = session.get(job_url, headers=servers.headers(), timeout=30)
        common.check(r, 200)
        job = r.json()
        if job["state"] in ("succeeded", "failed", "cancelled"):
            break
        if servers.worker is not None and servers.worker.poll() is not None:
            raise RuntimeError("the Celery worker exited")
        if time.perf_counter() > deadline:
            # Counted and reported rather than fatal: a lost message is itself a finding.
            log(f"job {job['id']} still {job['state']} after {STUCK_S} s: {job}")
            return {"stuck": True, "state": f"stuck_{job['state']}", "job": job}
        time.sleep(0.01)
    seconds = time.perf_counter() - start
    from datetime import datetime

    def at(key: str) -> float:
        return datetime.fromisoformat(job[key].replace("Z", "+00:00")).timestamp()

    return {
        "stuck": False,
        "seconds": seconds,
        "accepted_s": accepted,
        "state": (job.get("result") or {}).get("state") or job["state"],
        "queue_s": at("started_at") - at("created_at"),
        "run_s": at("finished_at") - at("started_at"),
    }


def bench_worker(args: argparse.Namespace, tmp: Path) -> None:
    import requests

    setup_django(tmp / "var")
    body = npy_header(1024 - 128) + os.urandom(1024 - 128)  # a 1 KiB float32 .npy
    assert len(body) == 1024
    with Servers(tmp) as servers, requests.Session() as session:
        api = f"{servers.base}/api/v1/namespaces/bench-worker/models"
        r = session.post(api, json={"name": "tiny"}, headers=servers.headers(), timeout=30)
        common.check(r, 201)
        model_url = f"{api}/tiny"
        for _ in range(2):  # warm-up: worker imports, first connections
            submit_once(servers, session, model_url, body)
        every = [submit_once(servers, session, model_url, body) for _ in range(args.submits)]
        if any(r["stuck"] for r in every):
            log(f"worker log:\n{common.tail(tmp / 'worker.log', 80)}")
    runs = [r for r in every if not r["stuck"]]
    if not runs:
        raise RuntimeError(f"no scan job finished within {STUCK_S} s")
    seconds = sorted(r["seconds"] for r in runs)
    median = statistics.median(seconds)
    states = sorted({r["state"] for r in every})
    emit(
        {
            "bench": "scan_worker_latency",
            "file_bytes": len(body),
            "submits": len(every),
            "stuck": len(every) - len(runs),
            "median_s": round(median, 4),
            "p95_s": round(seconds[max(0, int(len(seconds) * 0.95) - 1)], 4),
            "max_s": round(seconds[-1], 4),
            "submit_202_median_s": round(statistics.median(r["accepted_s"] for r in runs), 4),
            "queue_median_s": round(statistics.median(r["queue_s"] for r in runs), 4),
            "run_median_s": round(statistics.median(r["run_s"] for r in runs), 4),
            "final_states": states,
            "broker": BROKER.rsplit("@", 1)[-1],
            "note": "POST submit until GET /jobs/{id} shows it finished (polled every 10 ms)",
            "target": "<1",
            "ok": median < 1 and states == ["pending_review"],
        }
    )


# --- main ---------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--size-mib",
        type=int,
        default=None,
        help="checkpoint size for the bytes-decrypted figure (2048 unless given below 1024)",
    )
    parser.add_argument("--scan-mib", type=int, default=256, help="throughput files' size")
    parser.add_argument("--repeat", type=int, default=3, help="runs per tool and file (median)")
    parser.add_argument("--submits", type=int, default=20, help="worker latency samples")
    parser.add_argument(
        "--part",
        action="append",
        choices=["throughput", "decrypt", "worker"],
        help="run only this part (repeatable)",
    )
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    parser.add_argument(
        "--peers-dir",
        type=Path,
        default=cache / "smr-bench" / "peers",
        help="where picklescan's and modelscan's venvs are kept (default %(default)s)",
    )
    args = parser.parse_args()
    args.checkpoint_mib = 2048 if args.size_mib is None or args.size_mib >= 1024 else args.size_mib
    # A plain SIGTERM would skip the finally blocks that stop servers and remove temp dirs.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    parts = args.part or ["throughput", "decrypt", "worker"]
    tmp = Path(tempfile.mkdtemp(prefix="smr-bench-scan-"))
    pattern = common.Pattern()
    failed = []
    try:
        for part, run in (
            ("throughput", lambda: bench_throughput(args, tmp, pattern)),
            ("decrypt", lambda: bench_decrypt(args, tmp, pattern)),
            ("worker", lambda: bench_worker(args, tmp)),
        ):
            if part not in parts:
                continue
            log(f"scan: {part}")
            started = time.perf_counter()
            try:
                run()
            except Exception as exc:
                failed.append(part)
                emit({"bench": f"scan_{part}", "error": f"{type(exc).__name__}: {exc}"[-2000:]})
            log(f"scan: {part} done in {time.perf_counter() - started:.1f}s")
    finally:
        with contextlib.suppress(Exception):
            from django.db import connections

            connections.close_all()
        shutil.rmtree(tmp, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
