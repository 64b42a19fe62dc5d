"""The registry signs what it approves, and a consumer checks it offline with the standard tool.

Approve a version of several files over HTTP; the sign job (the service a worker runs) stores
the registry's OMS bundle; download every file and the `.sig`, fetch the public key from
/signing-keys, and the real `model_signing verify key` accepts the folder, and refuses it once
one byte changes. An approved version whose recorded digests no longer match its signature is
not served (audited).
"""

from __future__ import annotations

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
from tests.registry.signing.conftest import cli_verify

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
