"""OpenSSF Model Signing (OMS) v1.0 bundles built from recorded digests.

`model_signing` hashes a folder into a manifest, turns it into an in-toto statement (predicate
`https://model_signing/signature/v1.0`: one resource per file with its SHA-256, plus the
serialization parameters a verifier must reproduce) and signs that as a DSSE envelope inside
a Sigstore bundle v0.3. Here the manifest comes from digests the registry computed at upload,
so signing never reads artifact bytes; the rest (payload, PAE, bundle) is the package's own
code, and its `verify key` CLI judges the result in the tests.

No Django here: the signer is a callable, so this module knows nothing about key storage.
"""

from __future__ import annotations

import base64
import hashlib
import json
import pathlib
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final, NamedTuple

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from google.protobuf import json_format
from model_signing import manifest
from model_signing._hashing import hashing
from model_signing._signing import sign_ec_key, sign_sigstore_pb, signing
from sigstore_models import intoto as intoto_pb
from sigstore_models.bundle import v1 as bundle_pb
from sigstore_models.common import v1 as common_pb

BUNDLE_MEDIA_TYPE: Final = "application/vnd.dev.sigstore.bundle.v0.3+json"
PAYLOAD_TYPE = signing._IN_TOTO_JSON_PAYLOAD_TYPE
PREDICATE_TYPE = signing._PREDICATE_TYPE

# What `model_signing sign key` leaves out by default (its hashing.Config ignores git
# metadata), recorded in the payload the same way. A verifier ignores these paths in the
# folder, so a signed resource with one of these names could never be matched: they are left
# out of the resources rather than make the bundle unverifiable.
GIT_IGNORE_PATHS = (".git", ".gitattributes", ".github", ".gitignore")

_SHA256_HEX = re.compile(r"^[0-9a-f]{64}\Z")

Signer = Callable[[bytes], bytes]


class FileDigest(NamedTuple):
    """One file of a version as recorded at upload: relative POSIX path, SHA-256, size."""

    path: str
    sha256: str
    size: int


class BundleInvalid(ValueError):
    """A bundle that does not check out; `reason` is a stable code, the message says why.

    Reasons: `malformed` (not an OMS key bundle we can read), `unsupported` (a serialization
    other than whole files with SHA-256), `key_mismatch` (the bundle names another key),
    `bad_signature`, `files_mismatch` (missing, extra or changed files).
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Verified:
    """What a bundle that checks out covers: its model name and {path: sha256}."""

    model_name: str
    digests: dict[str, str]
    ignore_paths: tuple[str, ...]


def public_key_hint(public_pem: bytes) -> str:
    """The key hint model_signing writes and checks: SHA-256 (hex) of the SPKI PEM."""
    key = serialization.load_pem_public_key(public_pem)
    pem = key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(pem).hexdigest()


def bundle_key_hint(bundle: dict[str, Any]) -> str | None:
    """The public key hint a key-based bundle names (its signer's key id), if any."""
    material = bundle.get("verificationMaterial")
    public_key = material.get("publicKey") if isinstance(material, dict) else None
    hint = public_key.get("hint") if isinstance(public_key, dict) else None
    return hint if isinstance(hint, str) and hint else None


def is_ignored(path: str, ignore_paths: Iterable[str]) -> bool:
    """Whether `path` is one of `ignore_paths` or lies under one (as model_signing reads them)."""
    return any(path == ig or path.startswith(ig.rstrip("/") + "/") for ig in ignore_paths)


def _checked(files: Iterable[FileDigest | tuple[str, str, int]]) -> list[FileDigest]:
    out: list[FileDigest] = []
    seen: set[str] = set()
    for item in files:
        f = FileDigest(*item)
        pure = pathlib.PurePosixPath(f.path)
        if (
            not f.path
            or pure.is_absolute()
            or str(pure) != f.path
            or any(part in {".", ".."} for part in f.path.split("/"))
        ):
            raise ValueError(f"file path {f.path!r} is not a normalised relative POSIX path")
        if not _SHA256_HEX.match(f.sha256):
            raise ValueError(f"file {f.path!r}: sha256 must be 64 lowercase hex digits")
        if not isinstance(f.size, int) or f.size < 0:
            raise ValueError(f"file {f.path!r}: size must be a non-negative integer")
        if f.path in seen:
            raise ValueError(f"file {f.path!r} is listed twice")
        seen.add(f.path)
        out.append(f)
    return out


def manifest_from_digests(
    files: Iterable[FileDigest | tuple[str, str, int]], *, model_name: str
) -> manifest.Manifest:
    """The model_signing manifest a `files`-method hash of the folder would produce."""
    ignore = sorted(GIT_IGNORE_PATHS)
    serialization_type = manifest.SerializationType.from_args(
        {"method": "files", "hash_type": "sha256", "allow_symlinks": False, "ignore_paths": ignore}
    )
    items = [
        serialization_type.new_item(f.path, hashing.Digest("sha256", bytes.fromhex(f.sha256)))
        for f in _checked(files)
        if not is_ignored(f.path, ignore)
    ]
    if not items:
        raise ValueError("there are no files to sign (git metadata files are not signed)")
    return manifest.Manifest(model_name, items, serialization_type)


def payload_bytes(files: Iterable[FileDigest | tuple[str, str, int]], *, model_name: str) -> bytes:
    """The in-toto statement (JSON) that goes into the DSSE envelope."""
    payload = signing.Payload(manifest_from_digests(files, model_name=model_name))
    text: str = json_format.MessageToJson(payload.statement.pb)
    return text.encode("utf-8")


def pae(payload: bytes) -> bytes:
    """DSSE's pre-authentication encoding of an in-toto payload: the bytes that get signed."""
    return sign_sigstore_pb.pae(payload)


def bundle_assemble(*, payload: bytes, signature: bytes, public_pem: bytes) -> dict[str, Any]:
    """A Sigstore bundle v0.3 (JSON-ready dict) around `payload` and its DSSE signature.

    `signature` is a DER ECDSA signature over `pae(payload)`; the verification material is
    the public key hint, as `model_signing sign key` writes it.
    """
    envelope = intoto_pb.Envelope(
        payload=base64.b64encode(payload),
        payload_type=PAYLOAD_TYPE,
        signatures=[intoto_pb.Signature(sig=base64.b64encode(signature), keyid="")],
    )
    bundle = bundle_pb.Bundle(
        media_type=BUNDLE_MEDIA_TYPE,
        verification_material=bundle_pb.VerificationMaterial(
            public_key=common_pb.PublicKeyIdentifier(hint=public_key_hint(public_pem)),
            tlog_entries=[],
        ),
        dsse_envelope=envelope,
    )
    doc: dict[str, Any] = json.loads(bundle.to_json())
    return doc


def bundle_sign(
    files: Iterable[FileDigest | tuple[str, str, int]],
    *,
    model_name: str,
    signer: Signer,
    public_pem: bytes,
) -> dict[str, Any]:
    """Build the OMS payload from `files`' digests, sign its PAE with `signer`, and return the
    bundle. Only digests are used: no file is opened."""
    payload = payload_bytes(files, model_name=model_name)
    return bundle_assemble(payload=payload, signature=signer(pae(payload)), public_pem=public_pem)


class _PemVerifier(sign_ec_key.Verifier):
    # model_signing's key verifier reads its key from a path; the registry holds PEM text.
    def __init__(self, public_pem: bytes) -> None:
        key = serialization.load_pem_public_key(public_pem)
        if not isinstance(key, ec.EllipticCurvePublicKey):
            raise BundleInvalid("key_mismatch", "the public key is not an elliptic-curve key")
        sign_ec_key._check_supported_ec_key(key)
        self._public_key = key


def _read_bundle(bundle: dict[str, Any]) -> sign_sigstore_pb.Signature:
    # The same normalisation sign_sigstore_pb.Signature.read applies to a file.
    doc = json.loads(json.dumps(bundle))
    material = doc.get("verificationMaterial")
    if not isinstance(material, dict):
        raise BundleInvalid("malformed", "the bundle has no verificationMaterial")
    material.setdefault("tlogEntries", [])
    if isinstance(material.get("publicKey"), dict):
        material["publicKey"].setdefault("hint", None)
        for k in ("rawBytes", "keyDetails"):
            material["publicKey"].pop(k, None)
    try:
        return sign_sigstore_pb.Signature(bundle_pb.Bundle.from_dict(doc))
    except ValueError as exc:  # pydantic's ValidationError is a ValueError
        raise BundleInvalid("malformed", f"not a Sigstore bundle: {exc}") from None


def bundle_parse(bundle: dict[str, Any]) -> None:
    """Raise BundleInvalid("malformed") unless `bundle` reads as a Sigstore bundle."""
    _read_bundle(bundle)


def bundle_verify(
    bundle: dict[str, Any],
    files: Sequence[FileDigest | tuple[str, str, int]],
    *,
    public_pem: bytes,
) -> Verified:
    """Check `bundle` against `public_pem` and the recorded `files`, with no file bytes read.

    model_signing's own key verifier checks the key hint, the DSSE signature and the payload
    (statement type, predicate, root digest); the file set must then match exactly, ignoring
    only the paths the bundle's own serialization names. Raises BundleInvalid with the reason.
    """
    signature = _read_bundle(bundle)
    verifier = _PemVerifier(public_pem)
    try:
        expected = verifier.verify(signature)
    except InvalidSignature:
        raise BundleInvalid("bad_signature", "the DSSE signature does not verify") from None
    except ValueError as exc:
        reason = "key_mismatch" if str(exc).startswith("Key mismatch") else "malformed"
        raise BundleInvalid(reason, str(exc)) from None
    except (KeyError, TypeError, IndexError) as exc:
        raise BundleInvalid("malformed", f"the payload is not an OMS statement: {exc!r}") from None
    params = expected.serialization_type
    if params.get("method") != "files" or params.get("hash_type") != "sha256":
        raise BundleInvalid(
            "unsupported",
            f"serialization {params.get('method')}/{params.get('hash_type')} cannot be checked "
            "against per-file SHA-256 digests; sign with the default (files, sha256)",
        )
    ignore = tuple(str(p) for p in params.get("ignore_paths", ()))
    signed = {rd.identifier: rd.digest.digest_hex for rd in expected.resource_descriptors()}
    recorded = {f.path: f.sha256 for f in _checked(files) if not is_ignored(f.path, ignore)}
    problems = []
    if missing := sorted(signed.keys() - recorded.keys()):
        problems.append(f"signed but not in the version: {', '.join(missing)}")
    if extra := sorted(recorded.keys() - signed.keys()):
        problems.append(f"in the version but not signed: {', '.join(extra)}")
    if changed := sorted(p for p in signed.keys() & recorded.keys() if signed[p] != recorded[p]):
        problems.append(f"digest differs: {', '.join(changed)}")
    if problems:
        raise BundleInvalid("files_mismatch", "; ".join(problems))
    return Verified(model_name=expected.model_name, digests=signed, ignore_paths=ignore)
