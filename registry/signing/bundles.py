"""Registry signatures of versions: OMS bundles built from recorded digests, and their check."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from registry.models import SigningKey
from registry.signing import oms
from registry.signing.keys import sign, signing_key_current, signing_key_for_bundle


def bundle_build(
    files: Iterable[oms.FileDigest | tuple[str, str, int]],
    model_name: str,
    *,
    key: SigningKey | None = None,
) -> dict[str, Any]:
    """The registry's OMS bundle (Sigstore bundle v0.3, JSON-ready) over `files`.

    `files` are (relative POSIX path, sha256 hex, size) as recorded at upload; only these
    digests are signed, no artifact byte is read, so signing costs the same for 4 KiB or 4 TiB.
    Signed by `key` (default: the current key; fetch it outside any transaction). The bundle
    names the key by its id, and `model_signing verify key <folder> --signature <bundle>
    --public_key <the key's PEM>` accepts it for a folder holding exactly these files.
    """
    key = key or signing_key_current()
    return oms.bundle_sign(
        files,
        model_name=model_name,
        signer=lambda message: sign(message, key=key),
        public_pem=key.public_key_pem.encode(),
    )


def bundle_verify(
    bundle: dict[str, Any],
    files: Sequence[oms.FileDigest | tuple[str, str, int]],
    public_pem: str | bytes,
) -> oms.Verified:
    """Check `bundle` against `public_pem` and the recorded `files` (no bytes read).

    Raises oms.BundleInvalid with a `reason` (`malformed`, `unsupported`, `key_mismatch`,
    `bad_signature`, `files_mismatch`) when it does not check out.
    """
    pem = public_pem.encode() if isinstance(public_pem, str) else public_pem
    return oms.bundle_verify(bundle, files, public_pem=pem)


def bundle_verify_registry(
    bundle: dict[str, Any], files: Sequence[oms.FileDigest | tuple[str, str, int]]
) -> SigningKey:
    """Check a registry bundle with the registry key it names (current or retired): the
    download-side check before an approved version is served. Returns the key."""
    key = signing_key_for_bundle(bundle)
    if key is None:
        raise oms.BundleInvalid("unknown_key", "the bundle names no registry signing key")
    bundle_verify(bundle, files, key.public_key_pem)
    return key
