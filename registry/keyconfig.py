"""Key configuration from settings: the KeyProviders that wrap data keys (the crypto package
has no Django) and the Ed25519 key file that signs audit checkpoints."""

from __future__ import annotations

import functools
import hashlib
import logging
import os
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from django.conf import settings

from registry.crypto.keys import (
    AwsKmsKeyProvider,
    KeyProvider,
    LocalKeyring,
    provider_for_kek_id,
)

logger = logging.getLogger(__name__)


@functools.cache
def local_keyring() -> LocalKeyring:
    # Embedded mode generates the keyring on first use (with a loud warning); in production
    # the file is mounted from a secret and must exist.
    create = not getattr(settings, "SMR_PRODUCTION", False)
    return LocalKeyring(settings.SMR_KEYRING_FILE, create=create)


@functools.cache
def kms_provider(key_id: str | None = None) -> AwsKmsKeyProvider:
    return AwsKmsKeyProvider(
        # An empty id makes the provider raise its own "needs a KMS key id" error.
        key_id or settings.KMS_KEY_ID or "",
        endpoint_url=settings.KMS_ENDPOINT_URL,
        region=settings.KMS_REGION,
    )


def get_key_provider() -> KeyProvider:
    """The provider that wraps new data keys."""
    if settings.SMR_KEY_PROVIDER == "aws-kms":
        return kms_provider()
    return local_keyring()


def provider_for(kek_id: str) -> KeyProvider:
    """The provider able to unwrap a key wrapped under `kek_id` (routes by its scheme)."""
    if kek_id.startswith("aws-kms:"):
        # Unwrap with the key the DEK was wrapped under, even after KMS_KEY_ID moved on.
        return provider_for_kek_id(kek_id, [kms_provider(kek_id.removeprefix("aws-kms:"))])
    return provider_for_kek_id(kek_id, [local_keyring()])


def reset() -> None:
    """Forget cached providers (tests and settings changes)."""
    local_keyring.cache_clear()
    kms_provider.cache_clear()


# --- Audit checkpoint signing key (a file, never the database) ------------------------------


def audit_signing_key() -> Ed25519PrivateKey:
    """The Ed25519 key that signs audit checkpoints, from SMR_AUDIT_SIGNING_KEY_FILE.

    In production the file must be mounted (a missing one raises RuntimeError); in embedded
    mode the first caller generates it, created 0600 in a 0700 folder, with a loud warning.
    """
    path = Path(settings.SMR_AUDIT_SIGNING_KEY_FILE)
    if not path.exists():
        if settings.SMR_PRODUCTION:
            raise RuntimeError(
                f"audit signing key {path} is missing; mount it (SMR_AUDIT_SIGNING_KEY_FILE)"
            )
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(pem)
        try:
            os.link(tmp, path)  # exclusive: two processes starting together agree on one key
        except FileExistsError:
            pass
        finally:
            os.unlink(tmp)
        logger.warning("generated an embedded audit signing key at %s; back it up", path)
    loaded = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(loaded, Ed25519PrivateKey):
        raise RuntimeError(f"{path} is not an Ed25519 private key")
    return loaded


def audit_public_key_pem() -> str:
    """The checkpoint verification key as PEM, for auditors who check checkpoints offline."""
    return (
        audit_signing_key()
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


def audit_key_id(public: Ed25519PublicKey) -> str:
    """A short stable id of a checkpoint key: the first 32 hex digits of SHA-256(raw key)."""
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:32]
