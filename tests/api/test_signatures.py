"""The registry signs what it approves, and a consumer checks it offline with the standard tool.

Approve a version of several files over HTTP; the sign job (the service a worker runs) stores
the registry's OMS bundle; download every file and the `.sig`, fetch the public key from
/signing-keys, and the real `model_signing verify key` accepts the folder, and refuses it once
one byte changes. An approved version whose recorded digests no longer match its signature is
not served (audited).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from rest_framework.test import APIClient

from registry.models import (
    Artifact,
    AuditAction,
    AuditEvent,
    Job,
    JobKind,
    ModelVersion,
    Signature,
    SignatureKind,
)
from registry.services import catalog, scanning, signatures
from registry.signing.keys import signing_key_rotate
from tests.registry.signing.conftest import CLI, cli_verify

API = "/api/v1"
VERSIONS = f"{API}/namespaces/acme/models/bert/versions"
FILES = {
    "config.json": b'{"hidden_size": 8}\n',
    "weights/layer0.dat": bytes(range(256)) * 64,
    "tokenizer.txt": b"a\nb\n",
}


def approve(actors, number: int) -> ModelVersion:
    alice = actors.client("alice")
    for path, data in FILES.items():
        response = alice.put(
            f"{VERSIONS}/{number}/files/{path}", data, content_type="application/octet-stream"
        )
        assert response.status_code == 201, response.content
    job = alice.post(f"{VERSIONS}/{number}/submit").json()["job"]["id"]
    assert scanning.version_scan(job_id=job) == "pending_review"
    response = actors.client("bob").post(
        f"{VERSIONS}/{number}/reviews", {"decision": "approve"}, format="json"
    )
    assert response.json()["version"]["state"] == "approved", response.content
    version = ModelVersion.objects.get(model__name="bert", number=number)
    sign_job = Job.objects.get(version=version, kind=JobKind.SIGN)
    assert signatures.version_sign(job_id=sign_job.pk) is not None
    return version


def pull(actors, number: int, dest):
    """Every file of the version and its registry bundle, as a consumer downloads them."""
    carol = actors.client("carol")  # a viewer
    for path in FILES:
        response = carol.get(f"{VERSIONS}/{number}/files/{path}")
        assert response.status_code == 200, response.content
        target = dest / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(b"".join(response.streaming_content))
    listed = carol.get(f"{VERSIONS}/{number}/signatures").json()["results"]
    (registry,) = [s for s in listed if s["kind"] == "registry"]
    sig = carol.get(f"{VERSIONS}/{number}/signatures/{registry['id']}.sig")
    assert sig.status_code == 200 and sig["Content-Disposition"].endswith('.sig"')
    assert sig.json() == registry["bundle"]
    return registry


def public_pem(client, key_id: str) -> str:
    keys = client.get(f"{API}/signing-keys").json()
    return next(k["public_key_pem"] for k in keys if k["key_id"] == key_id)


def test_a_downloaded_version_verifies_with_model_signing(actors, draft, tmp_path):
    approve(actors, 1)
    folder = tmp_path / "pulled"
    registry = pull(actors, 1, folder)
    assert (registry["result"], registry["key_id"]) == ("valid", registry["key_id"])
    pem = public_pem(actors.client("carol"), registry["key_id"])
    done = cli_verify(folder, registry["bundle"], pem, tmp_path / "sig")
    assert done.returncode == 0, done.stdout + done.stderr
    # One byte of one file changes: the standard tool refuses the folder.
    target = folder / "weights/layer0.dat"
    data = bytearray(target.read_bytes())
    data[-1] ^= 1
    target.write_bytes(bytes(data))
    done = cli_verify(folder, registry["bundle"], pem, tmp_path / "sig2")
    assert done.returncode != 0


def test_signing_keys_are_public_and_old_bundles_verify_after_rotation(actors, draft, tmp_path):
    approve(actors, 1)
    old = Signature.objects.get(kind=SignatureKind.REGISTRY)
    new_key = signing_key_rotate()
    catalog.version_create(model=draft.model, creator=actors.users["alice"])
    approve(actors, 2)
    new = Signature.objects.get(kind=SignatureKind.REGISTRY, version__number=2)
    assert new.key_id == new_key.key_id != old.key_id
    keys = APIClient().get(f"{API}/signing-keys").json()  # anonymous
    assert {k["key_id"]: k["current"] for k in keys} == {old.key_id: False, new.key_id: True}
    folder = tmp_path / "v1"
    pull(actors, 1, folder)
    pem = next(k["public_key_pem"] for k in keys if k["key_id"] == old.key_id)
    assert cli_verify(folder, old.bundle, pem, tmp_path / "s").returncode == 0


def test_a_version_whose_digests_no_longer_match_its_signature_is_not_served(actors, draft):
    approve(actors, 1)
    carol = actors.client("carol")
    assert carol.get(f"{VERSIONS}/1/files/config.json").status_code == 200  # the control
    # Someone with database access points a file at other bytes (digest and all).
    Artifact.objects.filter(path="config.json").update(sha256="0" * 64)
    response = carol.get(f"{VERSIONS}/1/files/config.json")
    assert (response.status_code, response.json()["code"]) == (409, "signature_mismatch")
    event = AuditEvent.objects.filter(action=AuditAction.SIGNATURE_MISMATCH).get()
    assert event.target == "acme/bert/v1" and event.details["reason"] == "files_mismatch"


def test_signing_twice_keeps_one_registry_signature(actors, draft):
    version = approve(actors, 1)
    job = Job.objects.get(version=version, kind=JobKind.SIGN)
    assert signatures.version_sign(job_id=job.pk) is None  # the job is finished
    assert Signature.objects.filter(version=version).count() == 1


def test_unapproved_versions_have_no_registry_signature(actors, draft):
    response = actors.client("alice").get(f"{VERSIONS}/1/signatures")
    assert response.status_code == 200 and response.json()["results"] == []


# --- Publisher signatures --------------------------------------------------------------------

PUBLISHER_KEYS = f"{API}/namespaces/acme/publisher-keys"


def publisher_key(where: Path) -> tuple[Path, str]:
    """A P-256 key pair of a publisher: the private key's file and the public PEM."""
    key = ec.generate_private_key(ec.SECP256R1())
    private = where / f"publisher-{os.urandom(4).hex()}.pem"
    private.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return private, public.decode()


def cli_sign(folder: Path, private: Path, where: Path) -> dict:
    """`model_signing sign key` over the folder, as a publisher runs it."""
    sig = where / f"{folder.name}-{private.stem}.sig"
    argv = [str(CLI), "sign", "key", str(folder), "--private_key", str(private)]
    done = subprocess.run(  # fixed argv, no shell
        [*argv, "--signature", str(sig)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(sig.read_text())


def upload_only(actors, number: int, files: dict[str, bytes]) -> None:
    alice = actors.client("alice")
    for path, data in files.items():
        response = alice.put(
            f"{VERSIONS}/{number}/files/{path}", data, content_type="application/octet-stream"
        )
        assert response.status_code == 201, response.content


@pytest.fixture
def publisher(actors, draft, tmp_path):
    """alice's folder signed with a key acme trusts (registered by root, audited)."""
    folder = tmp_path / "model"
    for path, data in FILES.items():
        (folder / path).parent.mkdir(parents=True, exist_ok=True)
        (folder / path).write_bytes(data)
    private, public = publisher_key(tmp_path)
    root = actors.client("root")
    response = root.post(PUBLISHER_KEYS, {"public_key_pem": public, "name": "ci"}, format="json")
    assert response.status_code == 201, response.content
    assert (
        root.post(PUBLISHER_KEYS, {"public_key_pem": public}, format="json").json()["code"]
        == "publisher_key_exists"
    )
    assert AuditEvent.objects.filter(action=AuditAction.PUBLISHER_KEY_ADD).count() == 1
    return {"bundle": cli_sign(folder, private, tmp_path), "key_id": response.json()["key_id"]}


def record(actors, number: int, bundle: dict):
    response = actors.client("alice").post(
        f"{VERSIONS}/{number}/signatures", {"bundle": bundle}, format="json"
    )
    assert response.status_code == 201, response.content
    return response.json()


def test_a_publisher_bundle_over_the_uploaded_files_is_valid(actors, publisher):
    upload_only(actors, 1, FILES)
    out = record(actors, 1, publisher["bundle"])
    assert (out["kind"], out["result"], out["key_id"]) == (
        "publisher",
        "valid",
        publisher["key_id"],
    )
    event = AuditEvent.objects.get(action=AuditAction.SIGNATURE_RECORD)
    assert event.details["result"] == "valid"


@pytest.mark.parametrize("change", ["one file changed", "a file missing", "an extra file"])
def test_a_bundle_over_other_files_is_invalid_with_the_reason(actors, publisher, change):
    files = dict(FILES)
    if change == "one file changed":
        files["config.json"] = b'{"hidden_size": 9}\n'
    elif change == "a file missing":
        del files["tokenizer.txt"]
    else:
        files["extra.txt"] = b"not signed"
    upload_only(actors, 1, files)
    out = record(actors, 1, publisher["bundle"])
    assert out["result"] == "invalid" and out["reason"].startswith("files_mismatch"), out
    named = {"one file changed": "config.json", "a file missing": "tokenizer.txt"}
    assert named.get(change, "extra.txt") in out["reason"]


def test_a_bundle_by_an_untrusted_key_is_unknown_key(actors, publisher, tmp_path):
    upload_only(actors, 1, FILES)
    private, _public = publisher_key(tmp_path)  # never registered
    folder = tmp_path / "model"
    out = record(actors, 1, cli_sign(folder, private, tmp_path))
    assert out["result"] == "unknown_key"
    # A bundle that is no OMS bundle at all is refused, and nothing is recorded.
    response = actors.client("alice").post(
        f"{VERSIONS}/1/signatures", {"bundle": {"mediaType": "x"}}, format="json"
    )
    assert (response.status_code, response.json()["code"]) == (400, "invalid_input")
    junk = {"verificationMaterial": {"publicKey": {"hint": "ab" * 32}}}  # names a key, no more
    response = actors.client("alice").post(
        f"{VERSIONS}/1/signatures", {"bundle": junk}, format="json"
    )
    assert (response.status_code, response.json()["code"]) == (400, "invalid_input")
    assert Signature.objects.filter(kind=SignatureKind.PUBLISHER).count() == 1


def test_the_policy_can_require_a_valid_publisher_signature(actors, publisher):
    root = actors.client("root")
    gates = {"required_gates": ["scan_clean", "publisher_signature"]}
    assert root.patch(f"{API}/namespaces/acme/policy", gates, format="json").status_code == 200
    upload_only(actors, 1, FILES)
    job = actors.client("alice").post(f"{VERSIONS}/1/submit").json()["job"]["id"]
    assert scanning.version_scan(job_id=job) == "pending_review"
    bob = actors.client("bob")
    refused = bob.post(f"{VERSIONS}/1/reviews", {"decision": "approve"}, format="json")
    assert (refused.status_code, refused.json()["code"]) == (409, "gate_publisher_signature")
    record(actors, 1, publisher["bundle"])
    approved = bob.post(f"{VERSIONS}/1/reviews", {"decision": "approve"}, format="json")
    assert approved.json()["version"]["state"] == "approved", approved.content


def test_publisher_keys_are_managed_by_admins(actors, publisher, tmp_path):
    _private, public = publisher_key(tmp_path)
    alice = actors.client("alice")
    assert alice.post(PUBLISHER_KEYS, {"public_key_pem": public}, format="json").status_code == 403
    assert [k["key_id"] for k in alice.get(PUBLISHER_KEYS).json()["results"]] == [
        publisher["key_id"]
    ]
    bad = actors.client("root").post(PUBLISHER_KEYS, {"public_key_pem": "nope"}, format="json")
    assert (bad.status_code, bad.json()["code"]) == (400, "invalid_input")
    assert actors.client("mallory").get(PUBLISHER_KEYS).status_code == 404
    root = actors.client("root")
    assert root.delete(f"{PUBLISHER_KEYS}/{publisher['key_id']}").status_code == 204
    assert root.delete(f"{PUBLISHER_KEYS}/{publisher['key_id']}").status_code == 404


def test_signing_reads_no_artifact_bytes(actors, draft):
    """The sign job works from recorded digests: with every object of the version gone from
    the store (any read would fail), and sizes recorded as several GiB, it still signs."""
    from registry import storage

    upload_only(actors, 1, FILES)
    job = actors.client("alice").post(f"{VERSIONS}/1/submit").json()["job"]["id"]
    assert scanning.version_scan(job_id=job) == "pending_review"
    actors.client("bob").post(f"{VERSIONS}/1/reviews", {"decision": "approve"}, format="json")
    store = storage.get_object_store()
    for artifact in Artifact.objects.all():
        store.delete(artifact.object_key)
        assert not store.exists(artifact.object_key)
    Artifact.objects.update(size=3 * 1024**3)
    version = ModelVersion.objects.get(number=1)
    sign_job = Job.objects.get(version=version, kind=JobKind.SIGN)
    signature = signatures.version_sign(job_id=sign_job.pk)
    assert signature is not None and signature.result == "valid"
