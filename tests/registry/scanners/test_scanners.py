"""The pickle and container analysers against the built corpus and real files.

Every malicious sample must be found under the expected rule; every benign file written by the
real libraries must come out clean (the control that keeps the allowlists honest).
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import pytest

from registry.scanners import BytesSource, Limits, ScanContext, Severity, is_unanalysable, scan
from registry.scanners.base import Finding
from tests.registry.scanners import corpus

FIXTURES = Path(__file__).parent / "fixtures"
SAMPLES = corpus.malicious()


def run(data: bytes, name: str, ctx: ScanContext | None = None) -> list[Finding]:
    return scan(BytesSource(data), name=name, ctx=ctx).findings


@pytest.mark.parametrize("sample", SAMPLES, ids=[s.name for s in SAMPLES])
def test_malicious_sample_is_found(sample: corpus.Sample) -> None:
    findings = run(sample.data, sample.filename)
    hits = [f for f in findings if f.rule == sample.rule]
    assert hits, f"{sample.rule} not in {[(f.rule, f.reference) for f in findings]}"
    if sample.reference:
        assert sample.reference in {f.reference for f in hits}
    assert max(f.severity for f in hits) >= sample.severity
    rules = {f.rule for f in findings}
    for rule in sample.also:
        assert rule in rules, f"{rule} not in {rules}"


BENIGN = {
    "linear_state_dict.pt": {"zip", "pytorch"},
    "linear_state_dict_legacy.pt": {"pickle", "pytorch-legacy"},
    "array.npy": {"npy"},
    "arrays.npz": {"zip", "npz"},
    "arrays_compressed.npz": {"zip", "npz"},
    "digits_pipeline.joblib": {"pickle", "joblib"},
    "digits_pipeline_zlib.joblib": {"zlib", "pickle", "joblib"},
    "plain_data_p0.pkl": {"pickle"},
    "plain_data_p2.pkl": {"pickle"},
    "plain_data_p5.pkl": {"pickle"},
}


@pytest.mark.parametrize("filename", sorted(BENIGN))
def test_real_benign_file_is_clean(filename: str) -> None:
    result = scan(BytesSource((FIXTURES / filename).read_bytes()), name=filename)
    assert result.findings == []
    assert BENIGN[filename] <= set(result.formats)


def test_benign_file_under_a_misleading_name_is_still_clean() -> None:
    data = (FIXTURES / "linear_state_dict.pt").read_bytes()
    assert run(data, "notes.txt") == []


def test_control_one_byte_turns_benign_torch_file_malicious() -> None:
    # The same real checkpoint with its allowlisted rebuild function renamed: proves the clean
    # result above comes from judging the references, not from skipping the pickle.
    data = (FIXTURES / "linear_state_dict.pt").read_bytes()
    evil = data.replace(b"torch._utils\n_rebuild_tensor_v2", b"torch._utils\n_rebuild_tensor_v9")
    assert evil != data
    findings = run(evil, "model.pt")
    assert ("pickle.global.not_allowed", "torch._utils._rebuild_tensor_v9") in {
        (f.rule, f.reference) for f in findings
    }


def test_findings_name_nested_members() -> None:
    inner = corpus.torch_zip(corpus.OS_SYSTEM)
    outer = corpus.zip_bytes([corpus.Member("inner.zip", inner)])
    findings = run(outer, "bundle.zip")
    members = {f.member for f in findings if f.rule == "pickle.global.dangerous"}
    assert members == {"inner.zip!archive/data.pkl"}


def test_truncated_payload_is_found_before_the_break_and_is_unanalysable() -> None:
    findings = run(corpus.TRUNCATED, "m.pkl")
    assert any(f.reference == "os.system" for f in findings)
    assert any(is_unanalysable(f) for f in findings)


def test_every_prefix_of_a_pickle_is_a_finding() -> None:
    # A cut anywhere must never look clean: either the payload or the truncation is reported.
    for sample in (corpus.OS_SYSTEM, corpus.STACK_GLOBAL_MEMO, corpus.PROTOCOL0):
        for cut in range(1, len(sample)):
            assert run(sample[:cut], "m.pkl"), (sample, cut)


def test_depth_limit_is_unanalysable() -> None:
    data = corpus.torch_zip(corpus.BENIGN_PICKLE)
    for index in range(3):
        data = corpus.zip_bytes([corpus.Member(f"level{index}.zip", data)])
    ctx = ScanContext(limits=Limits(max_depth=2))
    findings = run(data, "deep.zip", ctx)
    limited = [f for f in findings if f.rule == "archive.depth.limit"]
    assert limited and all(is_unanalysable(f) for f in limited)
    assert run(data, "deep.zip") == []  # within the default depth it is clean


def test_tensor_bytes_that_start_like_a_pickle_are_not_a_false_positive() -> None:
    tensor = b"\x80\x02" + bytes(range(256)) * 4
    assert run(corpus.torch_zip(corpus.BENIGN_PICKLE, tensor=tensor), "model.pt") == []


def test_pickle_hidden_in_a_tensor_member_is_found() -> None:
    data = corpus.torch_zip(corpus.BENIGN_PICKLE, tensor=corpus.OS_SYSTEM)
    assert "os.system" in {f.reference for f in run(data, "model.pt")}


def test_is_unanalysable() -> None:
    def f(rule: str) -> Finding:
        return Finding(rule, Severity.HIGH, "")

    assert is_unanalysable(f("scan.error"))
    assert is_unanalysable(f("pickle.truncated"))
    assert is_unanalysable(f("pickle.opcode.unanalysable"))
    assert is_unanalysable(f("archive.depth.limit"))
    assert not is_unanalysable(f("pickle.global.dangerous"))
    assert not is_unanalysable(f("archive.bomb"))


class CountingSource:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.bytes_read = 0

    @property
    def size(self) -> int:
        return len(self.data)

    def read(self, start: int, end: int) -> bytes:
        chunk = self.data[max(0, start) : max(0, min(end, len(self.data)))]
        self.bytes_read += len(chunk)
        return chunk


def test_torch_checkpoint_is_scanned_reading_under_one_percent() -> None:
    real = (FIXTURES / "linear_state_dict.pt").read_bytes()
    data_pkl = _member(real, "linear_state_dict/data.pkl")
    checkpoint = corpus.zip_bytes(
        [
            corpus.Member("archive/data.pkl", data_pkl),
            corpus.Member("archive/data/0", b"\x00" * (20 << 20)),
            corpus.Member("archive/data/1", b"\x00" * 64),
            corpus.Member("archive/version", b"3\n"),
        ]
    )
    source = CountingSource(checkpoint)
    result = scan(source, name="big.pt")
    assert result.findings == []
    assert "pytorch" in result.formats
    assert source.bytes_read < len(checkpoint) // 100


def _member(archive: bytes, name: str) -> bytes:
    with zipfile.ZipFile(io.BytesIO(archive)) as zf:
        return zf.read(name)


def test_polyglot_scans_both_the_pickle_and_the_zip() -> None:
    data = corpus.zip_bytes(
        [corpus.Member("archive/data.pkl", corpus.SUBPROCESS_POPEN)], prefix=corpus.OS_SYSTEM
    )
    found = {(f.member, f.reference) for f in run(data, "model.pkl")}
    assert ("", "os.system") in found
    assert ("archive/data.pkl", "subprocess.Popen") in found


def test_only_the_first_tensor_members_of_a_torch_archive_are_read() -> None:
    # Reading every tensor's local header would decrypt a segment per tensor; torch reads
    # tensor members as raw storage, so past the first few they are not read at all.
    from registry.scanners.containers import TORCH_TENSORS_CHECKED

    tensors = [corpus.Member(f"archive/data/{i}", bytes(128 << 10)) for i in range(40)]
    data = corpus.zip_bytes([corpus.Member("archive/data.pkl", corpus.BENIGN_PICKLE), *tensors])
    reads: list[tuple[int, int]] = []

    class Recording(BytesSource):
        def read(self, start: int, end: int) -> bytes:
            reads.append((start, end))
            return super().read(start, end)

    assert scan(Recording(data), name="model.pt").findings == []
    offsets = {i.filename: i.header_offset for i in zipfile.ZipFile(io.BytesIO(data)).infolist()}

    def touched(name: str) -> bool:
        return any(a <= offsets[name] < b for a, b in reads)

    assert touched("archive/data.pkl")
    checked = [f"archive/data/{i}" for i in range(TORCH_TENSORS_CHECKED)]
    # (the last tensor lies in the tail that is read to find the central directory)
    skipped = [f"archive/data/{i}" for i in range(TORCH_TENSORS_CHECKED, 39)]
    assert all(touched(n) for n in checked)  # control: the reads are seen
    assert not any(touched(n) for n in skipped)
    # A pickle hidden in the first tensor is still found.
    evil = corpus.zip_bytes(
        [corpus.Member("archive/data.pkl", corpus.BENIGN_PICKLE),
         corpus.Member("archive/data/0", corpus.OS_SYSTEM), *tensors[1:]]
    )  # fmt: skip
    assert "os.system" in {f.reference for f in scan(BytesSource(evil), name="m.pt").findings}


@pytest.mark.parametrize("name", ["model.bin", "weights.dat", "tokenizer.model"])
def test_raw_bytes_under_an_ambiguous_extension_are_not_a_finding(name: str) -> None:
    # Raw tensors are stored as .bin as often as pickles: random bytes there must not quarantine
    # a version as an "unknown opcode" pickle.
    import random

    data = random.Random(7).randbytes(300_000)
    assert [f for f in run(data, name) if f.severity >= Severity.LOW] == []
    # Control: a pickle under the same name is still judged, text protocol or PROTO-started.
    assert "os.system" in {f.reference for f in run(corpus.PROTOCOL0, name)}
    assert "os.system" in {f.reference for f in run(corpus.OS_SYSTEM, name)}
