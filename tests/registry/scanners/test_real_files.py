"""Keras and safetensors files written by the real libraries (keras 3 on torch, safetensors).

The files come from `make_fixtures.py keras`: a Dense model saved as `.keras` (zip) and legacy
`.h5`, the same model with a harmless `Lambda(lambda x: x * 2)` (what an attacker ships: the
config carries marshalled bytecode), and a safetensors file. The hand-made configs in
test_formats.py say what we think Keras writes; these say what it does write.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest

from registry.scanners import BytesSource, Severity, scan
from registry.scanners.base import FileSource
from registry.scanners.safetensorsfile import safetensors_summary

FIXTURES = Path(__file__).parent / "fixtures"

BENIGN = {
    "keras_dense.keras": {"zip"},
    "keras_dense.h5": {"keras.h5"},
    "tensors.safetensors": {"safetensors"},
}
LAMBDA = {"keras_lambda.keras": "config.json", "keras_lambda.h5": ""}


@pytest.mark.parametrize("filename", sorted(BENIGN))
def test_real_benign_file_is_clean(filename: str) -> None:
    with FileSource(str(FIXTURES / filename)) as source:
        result = scan(source, name=filename)
    assert [f for f in result.findings if f.severity >= Severity.LOW] == []
    assert BENIGN[filename] <= set(result.formats)


def test_real_keras_zip_members_are_analysed_as_keras() -> None:
    # The zip reports only "zip": prove its config.json really reaches the Keras analyser (so
    # the clean result above is a judgement, not a skip) and that the weights are HDF5.
    with zipfile.ZipFile(FIXTURES / "keras_dense.keras") as archive:
        assert {"config.json", "model.weights.h5"} <= set(archive.namelist())
        config = archive.read("config.json")
        weights = archive.read("model.weights.h5")
    assert b'"Dense"' in config
    result = scan(BytesSource(config), name="config.json")
    assert result.findings == []
    assert "keras.json" in result.formats
    result = scan(BytesSource(weights), name="model.weights.h5")
    assert result.findings == []
    assert "keras.h5" in result.formats


@pytest.mark.parametrize("filename", sorted(LAMBDA))
def test_real_lambda_model_is_critical(filename: str) -> None:
    with FileSource(str(FIXTURES / filename)) as source:
        result = scan(source, name=filename)
    lambdas = [f for f in result.findings if f.rule == "keras.lambda"]
    assert len(lambdas) == 1, result.findings
    finding = lambdas[0]
    assert finding.severity is Severity.CRITICAL
    assert finding.member == LAMBDA[filename]
    # Keras 3 writes the Lambda's bytecode under "code": summarised, never echoed
    assert finding.reference.startswith("marshalled code")


def test_real_safetensors_summary() -> None:
    with FileSource(str(FIXTURES / "tensors.safetensors")) as source:
        summary = safetensors_summary(source)
    assert summary["tensors"] == 2
    assert summary["parameters"] == 15
    assert summary["dtypes"] == {"F32": 1, "I64": 1}
