"""Registry signing keys: one current, rotation keeps old signatures verifiable, the private
key is stored only wrapped under the KEK, and KMS keys sign inside KMS."""

from __future__ import annotations

import hashlib
from io import StringIO

import boto3
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from django.core.management import CommandError, call_command
from django.db import IntegrityError, transaction

from registry import keyconfig
from registry.errors import IntegrityFailure
from registry.models import AuditEvent, SigningKey
from registry.signing import (
    bundle_build,
    sign,
    signing_key_current,
    signing_key_rotate,
    signing_keys_all,
    signing_keys_rewrap_all,
)
from tests.conftest import REGION, use_kms
from tests.registry.signing.conftest import cli_verify, digests_of

pytestmark = pytest.mark.django_db


def _verify(key: SigningKey, message: bytes, signature: bytes) -> None:
    public = serialization.load_pem_public_key(key.public_key_pem.encode())
    assert isinstance(public, ec.EllipticCurvePublicKey)
    public.verify(signature, message, ec.ECDSA(hashes.SHA256()))


def test_the_first_use_creates_one_current_key_and_audits_it():
    assert not SigningKey.objects.exists()
    key = signing_key_current()
    assert signing_key_current() == key
    assert SigningKey.objects.count() == 1
    assert key.provider == "local" and key.retired_at is None
    # The key id is the hint model_signing writes: SHA-256 of the public key's PEM.
    assert key.key_id == hashlib.sha256(key.public_key_pem.encode()).hexdigest()
    event = AuditEvent.objects.get(action="signing_key.create")
    assert event.details["key_id"] == key.key_id
    assert event.details["retired"] == []


def test_the_private_key_is_stored_only_wrapped_and_bound_to_its_key_id():
    key = signing_key_current()
    row = SigningKey.objects.get(pk=key.pk)
    assert row.private_key_kek_id.startswith("local:")
    assert len(bytes(row.private_key_wrapped)) == 12 + 32 + 16  # nonce, scalar, GCM tag
    assert b"PRIVATE KEY" not in bytes(row.private_key_wrapped)
    assert "PRIVATE" not in row.public_key_pem

    message = b"payload"
    _verify(key, message, sign(message, key=key))

    # A wrapped key copied onto another key's row does not unwrap there (context binding).
    other = signing_key_rotate(kind="local")
    SigningKey.objects.filter(pk=other.pk).update(
        private_key_wrapped=row.private_key_wrapped, private_key_kek_id=row.private_key_kek_id
    )
    with pytest.raises(IntegrityFailure):
        sign(message, key=SigningKey.objects.get(pk=other.pk))


def test_the_database_refuses_a_second_current_key():
    key = signing_key_current()
    with pytest.raises(IntegrityError), transaction.atomic():
        SigningKey.objects.create(
            key_id="f" * 64,
            public_key_pem=key.public_key_pem,
            provider="local",
            private_key_wrapped=b"x",
            private_key_kek_id="local:k1",
        )
    # Control: a retired one is fine.
    SigningKey.objects.filter(pk=key.pk).update(retired_at=key.created_at)
    SigningKey.objects.create(
        key_id="f" * 64,
        public_key_pem=key.public_key_pem,
        provider="local",
        private_key_wrapped=b"x",
        private_key_kek_id="local:k1",
    )


def test_rotation_keeps_old_bundles_verifiable_and_new_bundles_use_the_new_key(model_dir, tmp_path):
    old = signing_key_current()
    files = digests_of(model_dir)
    before = bundle_build(files, "acme/bert@1")

    new = signing_key_rotate()
    assert new.key_id != old.key_id
    assert signing_key_current() == new
    old.refresh_from_db()
    assert old.retired_at is not None
    assert [k.key_id for k in signing_keys_all()] == [new.key_id, old.key_id]
    event = AuditEvent.objects.filter(action="signing_key.create").latest("seq")
    assert event.details["key_id"] == new.key_id
    assert event.details["retired"] == [old.key_id]

    after = bundle_build(files, "acme/bert@2")
    assert after["verificationMaterial"]["publicKey"]["hint"] == new.key_id
    assert before["verificationMaterial"]["publicKey"]["hint"] == old.key_id

    assert cli_verify(model_dir, before, old.public_key_pem, tmp_path / "a").returncode == 0
    assert cli_verify(model_dir, after, new.public_key_pem, tmp_path / "b").returncode == 0
    # Control: each bundle fails under the other key.
    assert cli_verify(model_dir, before, new.public_key_pem, tmp_path / "c").returncode != 0
    assert cli_verify(model_dir, after, old.public_key_pem, tmp_path / "d").returncode != 0


def test_kek_rotation_rewraps_local_signing_keys_without_changing_them():
    key = signing_key_current()
    ring = keyconfig.local_keyring()
    old_kek = key.private_key_kek_id
    new_kek = ring.add_key()
    assert signing_keys_rewrap_all(target=ring) == (1, 1)
    key.refresh_from_db()
    assert key.private_key_kek_id == new_kek != old_kek
    _verify(key, b"m", sign(b"m", key=key))
    assert signing_keys_rewrap_all(target=ring) == (0, 1)
    assert AuditEvent.objects.filter(action="key.rewrap", target__contains=key.key_id).count() == 1


def test_rotate_signing_key_command_prints_the_new_key_id_and_is_audited():
    old = signing_key_current()
    out = StringIO()
    call_command("rotate_signing_key", stdout=out)
    key_id = out.getvalue().strip()
    assert key_id == signing_key_current().key_id != old.key_id
    event = AuditEvent.objects.filter(action="signing_key.create").latest("seq")
    assert event.details["key_id"] == key_id
    assert event.actor_kind == "system"
    with pytest.raises(CommandError):
        call_command("rotate_signing_key", "--kind", "local", "--kms-key-id", "alias/x")
    assert signing_key_current().key_id == key_id


# --- KMS --------------------------------------------------------------------------------------


@pytest.fixture
def kms(settings, moto_endpoint, kms_key_id):
    use_kms(settings, moto_endpoint, kms_key_id)
    return boto3.client("kms", endpoint_url=moto_endpoint, region_name=REGION)


def _kms_public_pem(kms, key_id: str) -> bytes:
    der = kms.get_public_key(KeyId=key_id)["PublicKey"]
    return serialization.load_der_public_key(der).public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def test_with_kms_the_key_lives_in_kms_and_bundles_verify_with_its_public_key(
    kms, model_dir, tmp_path
):
    key = signing_key_current()
    assert key.provider == "kms"
    assert key.kms_key_id.startswith("arn:aws:kms:")
    assert bytes(key.private_key_wrapped) == b"" and key.private_key_kek_id == ""
    meta = kms.describe_key(KeyId=key.kms_key_id)["KeyMetadata"]
    assert (meta["KeySpec"], meta["KeyUsage"]) == ("ECC_NIST_P256", "SIGN_VERIFY")

    bundle = bundle_build(digests_of(model_dir), "acme/bert@3")
    public_pem = _kms_public_pem(kms, key.kms_key_id)  # straight from KMS, not our row
    ok = cli_verify(model_dir, bundle, public_pem, tmp_path / "ok")
    assert ok.returncode == 0, ok.stdout + ok.stderr

    (model_dir / "config.json").write_bytes(b'{"hidden_size": 9}\n')
    assert cli_verify(model_dir, bundle, public_pem, tmp_path / "bad").returncode != 0


def test_kms_rotation_can_adopt_an_existing_kms_key(kms, model_dir, tmp_path):
    old = signing_key_current()
    arn = kms.create_key(KeySpec="ECC_NIST_P256", KeyUsage="SIGN_VERIFY")["KeyMetadata"]["Arn"]
    out = StringIO()
    call_command("rotate_signing_key", "--kms-key-id", arn, stdout=out)
    key = signing_key_current()
    assert out.getvalue().strip() == key.key_id != old.key_id
    assert key.kms_key_id == arn
    bundle = bundle_build(digests_of(model_dir), "acme/bert@4")
    result = cli_verify(model_dir, bundle, _kms_public_pem(kms, arn), tmp_path / "s")
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_kms_key_that_cannot_sign_p256_is_refused(kms, kms_key_id):
    with pytest.raises(CommandError, match="ECC_NIST_P256"):
        call_command("rotate_signing_key", "--kms-key-id", kms_key_id)  # a symmetric KEK
    assert not SigningKey.objects.exists()


def test_a_kms_signature_that_does_not_match_the_recorded_key_is_never_returned(kms):
    key = signing_key_current()
    other = kms.create_key(KeySpec="ECC_NIST_P256", KeyUsage="SIGN_VERIFY")["KeyMetadata"]["Arn"]
    SigningKey.objects.filter(pk=key.pk).update(kms_key_id=other)
    with pytest.raises(IntegrityFailure):
        sign(b"payload", key=SigningKey.objects.get(pk=key.pk))


def test_a_large_kms_payload_is_signed_by_digest_or_refused_never_wrong(kms, tmp_path):
    """Past 4 KiB KMS signs the SHA-256 digest (MessageType=DIGEST). moto does not implement
    DIGEST (it hashes the digest again), so here sign() must refuse the signature it gets
    rather than hand out a bundle that does not verify."""
    signing_key_current()
    files = [
        (f"shards/part-{i:05}.bin", hashlib.sha256(bytes([i % 256])).hexdigest(), 1)
        for i in range(200)
    ]
    try:
        bundle = bundle_build(files, "acme/many@1")
    except IntegrityFailure:
        return
    from registry.signing import bundle_verify

    bundle_verify(bundle, files, signing_key_current().public_key_pem)


@pytest.mark.django_db(transaction=True)
def test_concurrent_first_uses_agree_on_one_key():
    from concurrent.futures import ThreadPoolExecutor
    from threading import Barrier

    from django.db import connection

    barrier = Barrier(4)

    def first_use() -> str:
        try:
            barrier.wait(timeout=10)
            return signing_key_current().key_id
        finally:
            connection.close()

    with ThreadPoolExecutor(4) as pool:
        ids = list(pool.map(lambda _: first_use(), range(4)))
    assert len(set(ids)) == 1
    assert SigningKey.objects.count() == 1
    assert AuditEvent.objects.filter(action="signing_key.create").count() == 1
