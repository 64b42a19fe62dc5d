"""Registry bundles built from recorded digests, judged by the real `model_signing` CLI."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from registry.models import SigningKey
from registry.signing import (
    BundleInvalid,
    bundle_build,
    bundle_verify,
    bundle_verify_registry,
    signing_key_current,
    signing_key_rotate,
)
from registry.signing.oms import PREDICATE_TYPE
from tests.registry.signing.conftest import CLI, MODEL_FILES, cli_verify, digests_of, write_folder

pytestmark = pytest.mark.django_db


def _payload(bundle: dict) -> dict:
    return json.loads(base64.b64decode(bundle["dsseEnvelope"]["payload"]))


def test_the_cli_accepts_a_bundle_built_from_digests_and_refuses_one_changed_byte(
    model_dir, tmp_path
):
    key = signing_key_current()
    files = digests_of(model_dir)
    bundle = bundle_build(files, "acme/bert@3")

    ok = cli_verify(model_dir, bundle, key.public_key_pem, tmp_path / "sig")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "Verification succeeded" in ok.stdout

    weights = model_dir / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[12345] ^= 0x01
    weights.write_bytes(bytes(data))
    bad = cli_verify(model_dir, bundle, key.public_key_pem, tmp_path / "sig")
    assert bad.returncode != 0
    assert "model.safetensors" in bad.stdout + bad.stderr


@pytest.mark.parametrize("change", ["missing", "extra"])
def test_the_cli_refuses_a_folder_with_a_file_missing_or_added(model_dir, tmp_path, change):
    key = signing_key_current()
    bundle = bundle_build(digests_of(model_dir), "acme/bert@3")
    if change == "missing":
        (model_dir / "tokenizer" / "vocab.txt").unlink()
    else:
        (model_dir / "extra.bin").write_bytes(b"not signed")
    result = cli_verify(model_dir, bundle, key.public_key_pem, tmp_path / "sig")
    assert result.returncode != 0


def test_the_bundle_is_an_oms_v1_key_bundle_naming_the_registry_key(model_dir):
    key = signing_key_current()
    files = digests_of(model_dir)
    bundle = bundle_build(files, "acme/bert@3")

    assert bundle["mediaType"] == "application/vnd.dev.sigstore.bundle.v0.3+json"
    assert bundle["verificationMaterial"]["publicKey"]["hint"] == key.key_id
    assert bundle["dsseEnvelope"]["payloadType"] == "application/vnd.in-toto+json"
    statement = _payload(bundle)
    assert statement["_type"] == "https://in-toto.io/Statement/v1"
    assert statement["predicateType"] == PREDICATE_TYPE
    assert statement["subject"][0]["name"] == "acme/bert@3"
    resources = {r["name"]: r["digest"] for r in statement["predicate"]["resources"]}
    # .gitattributes is left out and named in ignore_paths, as `model_signing sign key` does;
    # the CLI ignores it in the folder, so signing it would make the bundle unverifiable.
    assert resources == {p: d for p, d, _ in files if p != ".gitattributes"}
    assert ".gitattributes" in statement["predicate"]["serialization"]["ignore_paths"]


def test_signing_reads_no_file_bytes_however_large_the_version(tmp_path):
    """A version of 10 files of 3 GiB each (sparse files on disk) is signed from its digests:
    no path under the folder is opened while the bundle is built."""
    signing_key_current()  # warm: first use creates the key and the keyring
    root = tmp_path / "huge"
    root.mkdir()
    files = []
    for i in range(10):
        path = root / f"shard-{i:02}.safetensors"
        with path.open("wb") as fh:
            fh.truncate(3 << 30)
        files.append((path.name, os.urandom(32).hex(), 3 << 30))
    files.append(("never/written/to/disk.bin", "ab" * 32, 5 << 30))

    opened: list[str] = []
    _watch.append(opened)
    try:
        bundle = bundle_build(files, "acme/huge@1")
    finally:
        _watch.remove(opened)

    assert not [p for p in opened if str(root) in p or "never/written" in p]
    assert len(_payload(bundle)["predicate"]["resources"]) == 11
    bundle_verify(bundle, files, SigningKey.objects.get(retired_at=None).public_key_pem)


_watch: list[list[str]] = []


def _audit_hook(event: str, args: tuple) -> None:
    if event == "open" and _watch:
        _watch[-1].append(str(args[0]))


# Audit hooks cannot be removed; this one records only while a test watches.
sys.addaudithook(_audit_hook)


def test_bundle_verify_checks_signature_key_and_the_exact_file_set(model_dir):
    key = signing_key_current()
    files = digests_of(model_dir)
    bundle = bundle_build(files, "acme/bert@3")
    assert bundle_verify(bundle, files, key.public_key_pem).model_name == "acme/bert@3"
    assert bundle_verify_registry(bundle, files) == key

    changed = [(p, "00" * 32 if p == "config.json" else d, s) for p, d, s in files]
    with pytest.raises(BundleInvalid) as exc:
        bundle_verify(bundle, changed, key.public_key_pem)
    assert exc.value.reason == "files_mismatch"
    assert "config.json" in str(exc.value)

    with pytest.raises(BundleInvalid) as exc:
        bundle_verify(bundle, [*files, ("new.bin", "11" * 32, 1)], key.public_key_pem)
    assert exc.value.reason == "files_mismatch"
    with pytest.raises(BundleInvalid) as exc:
        bundle_verify(bundle, [f for f in files if f[0] != "config.json"], key.public_key_pem)
    assert exc.value.reason == "files_mismatch"
    # Control: dropping only the ignored git file changes nothing.
    bundle_verify(bundle, [f for f in files if f[0] != ".gitattributes"], key.public_key_pem)

    # A payload edited after signing (one digest swapped) fails the DSSE signature.
    statement = _payload(bundle)
    statement["predicate"]["resources"][0]["digest"] = "00" * 32
    forged = json.loads(json.dumps(bundle))
    forged["dsseEnvelope"]["payload"] = base64.b64encode(json.dumps(statement).encode()).decode()
    with pytest.raises(BundleInvalid) as exc:
        bundle_verify(forged, files, key.public_key_pem)
    assert exc.value.reason in {"bad_signature", "malformed"}


def test_bundle_verify_refuses_another_key(model_dir):
    old = signing_key_current()
    files = digests_of(model_dir)
    bundle = bundle_build(files, "acme/bert@3")
    new = signing_key_rotate()
    with pytest.raises(BundleInvalid) as exc:
        bundle_verify(bundle, files, new.public_key_pem)
    assert exc.value.reason == "key_mismatch"
    # Without the hint only the signature can tell, and it does.
    hintless = json.loads(json.dumps(bundle))
    hintless["verificationMaterial"]["publicKey"] = {"hint": None}
    with pytest.raises(BundleInvalid) as exc:
        bundle_verify(hintless, files, new.public_key_pem)
    assert exc.value.reason == "bad_signature"
    bundle_verify(hintless, files, old.public_key_pem)


def test_a_bundle_naming_no_registry_key_is_refused(model_dir):
    signing_key_current()
    files = digests_of(model_dir)
    bundle = bundle_build(files, "acme/bert@3")
    bundle["verificationMaterial"]["publicKey"]["hint"] = "ff" * 32
    with pytest.raises(BundleInvalid) as exc:
        bundle_verify_registry(bundle, files)
    assert exc.value.reason == "unknown_key"


def test_bundle_verify_accepts_a_publisher_bundle_from_the_cli(tmp_path):
    """The same check reads bundles `model_signing sign key` wrote (publisher signatures)."""
    folder = write_folder(tmp_path / "pub", MODEL_FILES)
    private = ec.generate_private_key(ec.SECP256R1())
    key_file = tmp_path / "publisher.pem"
    key_file.write_bytes(
        private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    public_pem = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    sig = tmp_path / "publisher.sig"
    subprocess.run(
        [
            str(CLI),
            "sign",
            "key",
            str(folder),
            "--signature",
            str(sig),
            "--private_key",
            str(key_file),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    bundle = json.loads(sig.read_text())
    files = digests_of(folder)
    assert set(bundle_verify(bundle, files, public_pem).digests) == {
        p for p, _, _ in files if p != ".gitattributes"
    }
    with pytest.raises(BundleInvalid) as exc:
        bundle_verify(bundle, [*files[:-1], (files[-1][0], "00" * 32, 1)], public_pem)
    assert exc.value.reason == "files_mismatch"


def test_a_bundle_written_inside_the_folder_still_verifies(model_dir, tmp_path: Path):
    """Consumers often keep model.sig next to the weights; the CLI ignores the signature."""
    key = signing_key_current()
    bundle = bundle_build(digests_of(model_dir), "acme/bert@3")
    sig = model_dir / "model.sig"
    sig.write_text(json.dumps(bundle))
    pub = tmp_path / "registry.pub"
    pub.write_text(key.public_key_pem)
    result = subprocess.run(
        [
            str(CLI),
            "verify",
            "key",
            str(model_dir),
            "--signature",
            str(sig),
            "--public_key",
            str(pub),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
