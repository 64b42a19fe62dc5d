"""The registry's signing keys: create, rotate, sign, re-wrap.

A `local` key is an ECDSA P-256 key made here; only its 32-byte private scalar, wrapped by
the key provider under the KEK (bound to the key id), is stored. A `kms` key is an asymmetric
ECC_NIST_P256 SIGN_VERIFY key in AWS KMS; its private half never leaves KMS. Either way the
public key is kept in the row, and every signature is checked against it before it is used.

KMS and key-provider calls happen outside transactions: a key is made first, then recorded.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any, NoReturn

import boto3
import botocore.exceptions
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from django.conf import settings
from django.db import transaction
from django.utils import timezone

from registry.crypto import keys
from registry.errors import IntegrityFailure
from registry.keyconfig import get_key_provider, provider_for
from registry.models import AuditAction, SigningKey, SigningKeyProvider
from registry.services.audit import advisory_lock, audit_record
from registry.services.envelope import key_provider_call
from registry.signing import oms

logger = logging.getLogger(__name__)

ALGORITHM = "ecdsa-p256-sha256"
KMS_KEY_SPEC = "ECC_NIST_P256"
KMS_SIGNING_ALGORITHM = "ECDSA_SHA_256"
# KMS signs a RAW message of up to 4096 bytes; beyond that it takes the SHA-256 digest.
KMS_RAW_MAX = 4096
SIGNING_KEY_LOCK = int.from_bytes(b"SMRSIGNK", "big") - (1 << 63)

_KMS_UNAVAILABLE_CODES = frozenset(
    {
        "ThrottlingException",
        "Throttling",
        "RequestLimitExceeded",
        "TooManyRequestsException",
        "LimitExceededException",
        "KMSInternalException",
        "DependencyTimeoutException",
        "KeyUnavailableException",
        "ServiceUnavailableException",
        "InternalFailure",
    }
)


def wrap_context(key_id: str) -> dict[str, str]:
    """The encryption context of a local key's wrapped scalar: it unwraps for this key only."""
    return {"smr:signing-key": key_id, "smr:use": "registry-signing-key"}


def default_kind() -> str:
    """`kms` when the registry's KEKs live in KMS, else `local`."""
    if settings.SMR_KEY_PROVIDER == "aws-kms":
        return SigningKeyProvider.KMS
    return SigningKeyProvider.LOCAL


# --- KMS ---------------------------------------------------------------------------------------


def _kms_client() -> Any:
    return boto3.client(
        "kms",
        endpoint_url=settings.KMS_ENDPOINT_URL,
        region_name=settings.KMS_REGION,
        config=keys.default_kms_config(),
    )


def _kms_error(op: str, exc: Exception) -> NoReturn:
    if isinstance(exc, botocore.exceptions.ClientError):
        err = exc.response.get("Error", {})
        code = err.get("Code", "Unknown")
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        msg = f"KMS {op} failed ({code}): {err.get('Message', '')}".rstrip(": ")
        if code in _KMS_UNAVAILABLE_CODES or status >= 500 or status == 429:
            raise keys.KeyUnavailableError(msg) from exc
        raise keys.KeyProviderError(msg) from exc
    if isinstance(exc, botocore.exceptions.ConnectionError | botocore.exceptions.HTTPClientError):
        raise keys.KeyUnavailableError(f"KMS {op} could not reach KMS: {type(exc).__name__}")
    raise keys.KeyProviderError(f"KMS {op} failed: {exc}") from exc


def _kms_call(op: str, fn: Any, **kwargs: Any) -> Any:
    try:
        return fn(**kwargs)
    except botocore.exceptions.BotoCoreError as exc:
        _kms_error(op, exc)
    except botocore.exceptions.ClientError as exc:
        _kms_error(op, exc)


def _public_pem(public: ec.EllipticCurvePublicKey) -> str:
    if not isinstance(public.curve, ec.SECP256R1):
        raise keys.KeyProviderError(f"signing keys must be P-256, not {public.curve.name}")
    return public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode("ascii")


def _kms_public_pem(client: Any, kms_key_id: str) -> tuple[str, str]:
    """The ARN and public key (PEM) of a KMS key that can sign ECDSA P-256 / SHA-256."""
    meta = _kms_call("DescribeKey", client.describe_key, KeyId=kms_key_id)["KeyMetadata"]
    spec = meta.get("KeySpec") or meta.get("CustomerMasterKeySpec")
    if spec != KMS_KEY_SPEC or meta.get("KeyUsage") != "SIGN_VERIFY":
        raise keys.KeyProviderError(
            f"KMS key {kms_key_id} is {spec}/{meta.get('KeyUsage')}; a signing key must be "
            f"{KMS_KEY_SPEC} with KeyUsage SIGN_VERIFY"
        )
    resp = _kms_call("GetPublicKey", client.get_public_key, KeyId=meta["Arn"])
    public = serialization.load_der_public_key(resp["PublicKey"])
    if not isinstance(public, ec.EllipticCurvePublicKey):
        raise keys.KeyProviderError(f"KMS key {kms_key_id} is not an elliptic-curve key")
    return meta["Arn"], _public_pem(public)


def _new_kms_key(kms_key_id: str | None) -> SigningKey:
    client = _kms_client()
    if not kms_key_id:
        resp = _kms_call(
            "CreateKey",
            client.create_key,
            KeySpec=KMS_KEY_SPEC,
            KeyUsage="SIGN_VERIFY",
            Description="Secure Model Registry: OMS signing key for approved versions",
        )
        kms_key_id = resp["KeyMetadata"]["Arn"]
    arn, pem = _kms_public_pem(client, kms_key_id)
    return SigningKey(
        key_id=oms.public_key_hint(pem.encode()),
        algorithm=ALGORITHM,
        public_key_pem=pem,
        provider=SigningKeyProvider.KMS,
        kms_key_id=arn,
    )


# --- local ------------------------------------------------------------------------------------


def _new_local_key() -> SigningKey:
    private = ec.generate_private_key(ec.SECP256R1())
    pem = _public_pem(private.public_key())
    key_id = oms.public_key_hint(pem.encode())
    scalar = bytearray(private.private_numbers().private_value.to_bytes(32, "big"))
    try:
        wrapped = key_provider_call(get_key_provider().wrap, scalar, wrap_context(key_id))
    finally:
        for i in range(len(scalar)):  # best effort, as in registry.crypto.keys._zero
            scalar[i] = 0
    return SigningKey(
        key_id=key_id,
        algorithm=ALGORITHM,
        public_key_pem=pem,
        provider=SigningKeyProvider.LOCAL,
        private_key_wrapped=wrapped.blob,
        private_key_kek_id=wrapped.kek_id,
    )


def _local_private_key(key: SigningKey) -> ec.EllipticCurvePrivateKey:
    wrapped = keys.WrappedKey(kek_id=key.private_key_kek_id, blob=bytes(key.private_key_wrapped))
    provider = key_provider_call(provider_for, key.private_key_kek_id)
    scalar = key_provider_call(provider.unwrap, wrapped, wrap_context(key.key_id))
    return ec.derive_private_key(int.from_bytes(scalar, "big"), ec.SECP256R1())


def _new_key(kind: str | None, kms_key_id: str | None) -> SigningKey:
    kind = kind or (SigningKeyProvider.KMS if kms_key_id else default_kind())
    if kind == SigningKeyProvider.KMS:
        return _new_kms_key(kms_key_id)
    if kind == SigningKeyProvider.LOCAL and not kms_key_id:
        return _new_local_key()
    raise ValueError(f"signing key kind must be 'local' or 'kms', got {kind!r}")


def _discard(key: SigningKey) -> None:
    # A key made by a creator that lost the race to record it; nothing was signed with it.
    if key.provider == SigningKeyProvider.KMS:
        try:
            _kms_client().schedule_key_deletion(KeyId=key.kms_key_id, PendingWindowInDays=7)
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
            logger.warning(
                "unused KMS signing key %s was not scheduled for deletion: %s", key.kms_key_id, exc
            )


def _record(key: SigningKey, *, retire_current: bool) -> SigningKey | None:
    """Insert `key` as the current key; returns the current key instead when one exists and
    `retire_current` is false."""
    with transaction.atomic():
        # The lock orders creators and rotations; the queries below run after it is held,
        # so they see a key another process has just recorded.
        advisory_lock(SIGNING_KEY_LOCK)
        current = list(SigningKey.objects.filter(retired_at__isnull=True))
        if current and not retire_current:
            return current[0]
        retired = [k.key_id for k in current]
        SigningKey.objects.filter(key_id__in=retired).update(retired_at=timezone.now())
        key.save(force_insert=True)
        audit_record(
            action=AuditAction.SIGNING_KEY_CREATE,
            target=f"signing-key:{key.key_id}",
            details={
                "key_id": key.key_id,
                "provider": key.provider,
                "algorithm": key.algorithm,
                "kms_key_id": key.kms_key_id,
                "kek_id": key.private_key_kek_id,
                "retired": retired,
            },
        )
    return None


def signing_key_current() -> SigningKey:
    """The key new registry signatures are made with; the first call creates it (audited).

    Call it outside a transaction: creating a key may call the key provider or KMS.
    """
    key = SigningKey.objects.filter(retired_at__isnull=True).first()
    if key is not None:
        return key
    new = _new_key(None, None)
    existing = _record(new, retire_current=False)
    if existing is not None:
        _discard(new)
        return existing
    logger.info("created the first registry signing key %s (%s)", new.key_id, new.provider)
    return new


def signing_key_rotate(*, kind: str | None = None, kms_key_id: str | None = None) -> SigningKey:
    """Make a new signing key current and retire the old one (audited, in one transaction).

    `kind` is `local` or `kms` (default: `kms` when the KEKs live in KMS); for `kms`, an
    existing ECC_NIST_P256 SIGN_VERIFY key may be named by `kms_key_id`, else one is created.
    Retired keys are kept: their public keys still verify the bundles they signed.
    """
    new = _new_key(kind, kms_key_id)
    _record(new, retire_current=True)
    logger.info("signing key rotated: %s (%s) is now current", new.key_id, new.provider)
    return new


def signing_keys_all() -> list[SigningKey]:
    """Every signing key, newest first: what `GET /signing-keys` publishes."""
    return list(SigningKey.objects.order_by("-created_at"))


def signing_key_for_bundle(bundle: dict[str, Any]) -> SigningKey | None:
    """The registry key a bundle names in its public key hint (current or retired), if any."""
    hint = oms.bundle_key_hint(bundle)
    return None if hint is None else SigningKey.objects.filter(key_id=hint).first()


def public_key(key: SigningKey) -> ec.EllipticCurvePublicKey:
    loaded = serialization.load_pem_public_key(key.public_key_pem.encode())
    if not isinstance(loaded, ec.EllipticCurvePublicKey):
        raise IntegrityFailure()
    return loaded


def sign(message: bytes, *, key: SigningKey | None = None) -> bytes:
    """A DER ECDSA P-256 / SHA-256 signature over `message` by `key` (default: the current key).

    The signature is checked against the key's recorded public key before it is returned, so
    a KMS key that is not the one recorded, or a wrong unwrap, fails here (IntegrityFailure)
    rather than in a consumer's verifier.
    """
    key = key or signing_key_current()
    if key.provider == SigningKeyProvider.LOCAL:
        signature = _local_private_key(key).sign(message, ec.ECDSA(hashes.SHA256()))
    else:
        # RAW when it fits; otherwise KMS signs the SHA-256 digest (same signature).
        if len(message) <= KMS_RAW_MAX:
            body, message_type = message, "RAW"
        else:
            body, message_type = hashlib.sha256(message).digest(), "DIGEST"
        resp = key_provider_call(
            _kms_call,
            "Sign",
            _kms_client().sign,
            KeyId=key.kms_key_id,
            Message=body,
            MessageType=message_type,
            SigningAlgorithm=KMS_SIGNING_ALGORITHM,
        )
        signature = resp["Signature"]
    try:
        public_key(key).verify(signature, message, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        logger.error(
            "signing key %s (%s) made a signature its public key does not verify",
            key.key_id,
            key.provider,
        )
        raise IntegrityFailure() from None
    return bytes(signature)


def signing_keys_rewrap_all(*, target: keys.KeyProvider) -> tuple[int, int]:
    """Re-wrap every local signing key not yet under `target`'s primary KEK: (moved, total).

    Part of KEK rotation: the scalar moves between KEKs without changing the key."""
    to_kek = target.primary_kek_id()
    qs = SigningKey.objects.filter(provider=SigningKeyProvider.LOCAL).exclude(
        private_key_kek_id=to_kek
    )
    moved = 0
    for key in qs.iterator():
        old = keys.WrappedKey(kek_id=key.private_key_kek_id, blob=bytes(key.private_key_wrapped))
        source = key_provider_call(provider_for, key.private_key_kek_id)
        context = wrap_context(key.key_id)
        if source.scheme == target.scheme:
            new = key_provider_call(source.rewrap, old, context, to_kek_id=to_kek)
        else:
            new = key_provider_call(keys.rewrap_between, old, context, source, target)
        with transaction.atomic():
            updated = SigningKey.objects.filter(
                key_id=key.key_id, private_key_kek_id=key.private_key_kek_id
            ).update(private_key_wrapped=new.blob, private_key_kek_id=new.kek_id)
            if updated:
                audit_record(
                    action=AuditAction.KEY_REWRAP,
                    target=f"signing-key:{key.key_id}",
                    details={"from_kek_id": key.private_key_kek_id, "to_kek_id": new.kek_id},
                )
                moved += 1
    total = SigningKey.objects.filter(provider=SigningKeyProvider.LOCAL).count()
    return moved, total
