"""Registry signing: OpenSSF Model Signing bundles for approved versions, and their keys.

`oms` is the bundle format (no Django); `keys` holds the signing keys (local, wrapped under the
KEK, or in KMS); `bundles` signs and checks versions' digests with them.
"""

from registry.signing.bundles import bundle_build, bundle_verify, bundle_verify_registry
from registry.signing.keys import (
    sign,
    signing_key_current,
    signing_key_for_bundle,
    signing_key_rotate,
    signing_keys_all,
    signing_keys_rewrap_all,
)
from registry.signing.oms import BundleInvalid, FileDigest, Verified

__all__ = [
    "BundleInvalid",
    "FileDigest",
    "Verified",
    "bundle_build",
    "bundle_verify",
    "bundle_verify_registry",
    "sign",
    "signing_key_current",
    "signing_key_for_bundle",
    "signing_key_rotate",
    "signing_keys_all",
    "signing_keys_rewrap_all",
]
