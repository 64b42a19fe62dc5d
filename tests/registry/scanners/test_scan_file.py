"""`manage.py scan_file`: exit 0 clean, 1 findings, 2 could not analyse; --json for machines."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from django.core.management import call_command

from tests.registry.scanners import corpus

FIXTURES = Path(__file__).parent / "fixtures"


def run(*args: str) -> tuple[int, str]:
    out = io.StringIO()
    with pytest.raises(SystemExit) as exit_info:
        call_command("scan_file", *args, stdout=out)
    return int(exit_info.value.code or 0), out.getvalue()


def test_clean_folder_exits_0(tmp_path: Path) -> None:
    for name in ("linear_state_dict.pt", "array.npy", "digits_pipeline.joblib"):
        (tmp_path / "sub").mkdir(exist_ok=True)
        (tmp_path / "sub" / name).write_bytes((FIXTURES / name).read_bytes())
    (tmp_path / "README.md").write_text("# a model\n")
    status, text = run(str(tmp_path))
    assert status == 0, text
    assert "linear_state_dict.pt: zip, pytorch: no finding(s)" in text


def test_findings_exit_1_and_json_names_them(tmp_path: Path) -> None:
    (tmp_path / "model.pt").write_bytes(corpus.torch_zip(corpus.OS_SYSTEM))
    (tmp_path / "ok.npy").write_bytes((FIXTURES / "array.npy").read_bytes())
    status, text = run("--json", str(tmp_path))
    assert status == 1
    document = json.loads(text)
    by_path = {Path(f["path"]).name: f for f in document["files"]}
    assert by_path["ok.npy"]["findings"] == []
    finding = by_path["model.pt"]["findings"][0]
    assert finding["rule"] == "pickle.global.dangerous"
    assert finding["severity"] == "critical"
    assert finding["member"] == "archive/data.pkl"
    assert finding["reference"] == "os.system"


def test_unanalysable_exits_2_even_beside_findings(tmp_path: Path) -> None:
    (tmp_path / "a.pkl").write_bytes(corpus.OS_SYSTEM)
    (tmp_path / "b.pkl").write_bytes(corpus.UNKNOWN_OPCODE)
    status, text = run(str(tmp_path / "a.pkl"), str(tmp_path / "b.pkl"))
    assert status == 2
    assert "pickle.opcode.unanalysable" in text


def test_missing_path_is_an_error_that_says_what_to_give(tmp_path: Path) -> None:
    from django.core.management.base import CommandError

    with pytest.raises(CommandError, match="no such file or folder"):
        call_command("scan_file", str(tmp_path / "nope"))
