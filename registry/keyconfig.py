"""Builds the configured KeyProviders from settings (the crypto package has no Django)."""

from __future__ import annotations

import functools

from django.conf import settings

from registry.crypto.keys import (
    AwsKmsKeyProvider,
    KeyProvider,
    LocalKeyring,
    provider_for_kek_id,
)


@functools.cache
def local_keyring() -> LocalKeyring:
    # Embedded mode generates the keyring on first use (with a loud warning); in production
    # the file is mounted from a secret and must exist.
    create = not getattr(settings, "SMR_PRODUCTION", False)
    return LocalKeyring(settings.SMR_KEYRING_FILE, create=create)


@functools.cache
def kms_provider(key_id: str | None = None) -> AwsKmsKeyProvider:
    return AwsKmsKeyProvider(
        key_id or settings.KMS_KEY_ID,
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
