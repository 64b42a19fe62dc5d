"""The registry's OMS signature of a version, checked on the user's side.

A registry bundle (Sigstore bundle v0.3 around a DSSE envelope of an in-toto statement, as
`model_signing sign key` writes it) is checked with model_signing's own key verifier against
the registry's public key, and its signed resources must be exactly the version's files
(path and SHA-256). Which key: `--trusted-key PEM`, else the keys pinned for this registry
URL in $XDG_CONFIG_HOME/smr/known_keys.json, else (first use, like SSH's known_hosts) the
keys the registry publishes at /signing-keys, which are pinned then. A bundle naming a key
that is not pinned is refused once pins exist: a changed key is what an impostor would show.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import pathlib
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from smr import config
from smr.errors import SmrError, UsageError, VerificationError
from smr.refs import Ref

if TYPE_CHECKING:
    from smr.sdk import Registry

# States in which a version carries the registry's signature (the server's SIGNED_STATES).
SIGNED_STATES = frozenset({"approved", "deprecated"})
HASH_CHUNK = 1 << 20


@dataclass(frozen=True)
class SignatureCheck:
    """A registry bundle that checked out: the key that signed it and how it was trusted
    (`trusted_key`: given on the command line; `pinned`: in known_keys.json; `first_use`:
    published by the registry and pinned now), and the signed {path: sha256}."""

    key_id: str
    trust: str
    signature_id: int | None
    model_name: str
    digests: dict[str, str]
    ignore_paths: tuple[str, ...]

    def as_dict(self) -> dict[str, Any]:
        return {
            "kind": "registry",
            "verified": True,
            "key_id": self.key_id,
            "trust": self.trust,
            "signature_id": self.signature_id,
            "model_name": self.model_name,
        }


def key_id_of(public_pem: bytes | str) -> str:
    """A key's id as bundles name it (the model_signing hint): SHA-256 of its SPKI PEM."""
    pem = public_pem.encode() if isinstance(public_pem, str) else public_pem
    try:
        key = serialization.load_pem_public_key(pem)
    except ValueError as exc:
        raise UsageError(f"Not a PEM public key: {exc}") from None
    spki = key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(spki).hexdigest()


# --- Pinned keys (known_keys.json) -----------------------------------------------------------


def known_keys_path() -> Path:
    return config.config_dir() / "known_keys.json"


def _known_keys() -> dict[str, list[dict[str, str]]]:
    path = known_keys_path()
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
    except ValueError as exc:
        raise SmrError(f"{path} is not valid JSON ({exc}); fix or remove it.") from None
    return data if isinstance(data, dict) else {}


def pinned_keys(url: str) -> dict[str, str]:
    """{key_id: PEM} pinned for the registry at `url` (empty before its first use)."""
    entries = _known_keys().get(url.rstrip("/"), [])
    # The id is recomputed from the PEM: an edited file cannot pin a PEM under another id.
    return {key_id_of(e["public_key_pem"]): e["public_key_pem"] for e in entries}


def pin_keys(url: str, pems: Iterable[str]) -> None:
    """Pin `pems` for `url` (added to those already pinned), written atomically."""
    data = _known_keys()
    entries = data.setdefault(url.rstrip("/"), [])
    have = {key_id_of(e["public_key_pem"]) for e in entries}
    now = datetime.now(UTC).isoformat(timespec="seconds")
    for pem in pems:
        kid = key_id_of(pem)
        if kid not in have:
            entries.append({"key_id": kid, "public_key_pem": pem, "pinned_at": now})
            have.add(kid)
    write_json_atomic(known_keys_path(), data)


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to `path` through a temporary file and a rename: readers (and a process
    killed mid-write) see the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(data, handle, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def signing_key(
    registry: Registry, bundle: Mapping[str, Any], trusted_key: str | Path | None
) -> tuple[str, str, str]:
    """(PEM, key id, trust) of the key to check `bundle` with, or VerificationError."""
    hint = _bundle_hint(bundle)
    if trusted_key is not None:
        try:
            pem = Path(trusted_key).read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"Cannot read the --trusted-key file: {exc}") from None
        kid = key_id_of(pem)
        if hint != kid:
            raise VerificationError(
                f"The registry signature is by key {hint}, not by the --trusted-key {kid}.",
                code="untrusted_key",
                key_id=hint,
                trusted_key_id=kid,
            )
        return pem, kid, "trusted_key"
    pins = pinned_keys(registry.url)
    if pins:
        if hint in pins:
            return pins[hint], hint, "pinned"
        raise VerificationError(
            f"The registry signature is by key {hint}, which is not pinned for "
            f"{registry.url} in {known_keys_path()} (pinned: {', '.join(sorted(pins))}). "
            "If the registry rotated its key, check the new key with its operators and pass "
            "it with --trusted-key PEM, or remove this registry's entry to pin again.",
            code="untrusted_key",
            key_id=hint,
            pinned=sorted(pins),
        )
    published = [k["public_key_pem"] for k in registry.api.json("GET", "/signing-keys")]
    by_id = {key_id_of(pem): pem for pem in published}
    if hint not in by_id:
        raise VerificationError(
            f"The registry signature names key {hint}, which the registry does not publish.",
            code="unknown_key",
            key_id=hint,
        )
    pin_keys(registry.url, published)
    return by_id[hint], hint, "first_use"


def _bundle_hint(bundle: Mapping[str, Any]) -> str:
    material = bundle.get("verificationMaterial")
    public_key = material.get("publicKey") if isinstance(material, dict) else None
    hint = public_key.get("hint") if isinstance(public_key, dict) else None
    if not isinstance(hint, str) or not hint:
        raise VerificationError(
            "The registry signature names no public key (no key hint).", code="malformed"
        )
    return hint


# --- The bundle ------------------------------------------------------------------------------


def _verifier(public_pem: str) -> Any:
    from model_signing._signing import sign_ec_key

    class PemVerifier(sign_ec_key.Verifier):
        # model_signing's key verifier reads its key from a file; we hold PEM text.
        def __init__(self, pem: bytes) -> None:
            key = serialization.load_pem_public_key(pem)
            if not isinstance(key, ec.EllipticCurvePublicKey):
                raise VerificationError("The registry key is not an EC key.", code="bad_key")
            sign_ec_key._check_supported_ec_key(key)
            self._public_key = key

    return PemVerifier(public_pem.encode())


def _signature(bundle: Mapping[str, Any]) -> Any:
    # The normalisation model_signing's Signature.read applies to a .sig file.
    from model_signing._signing import sign_sigstore_pb
    from sigstore_models.bundle import v1 as bundle_pb

    doc = json.loads(json.dumps(bundle))
    material = doc.get("verificationMaterial")
    if not isinstance(material, dict):
        raise VerificationError("The bundle has no verificationMaterial.", code="malformed")
    material.setdefault("tlogEntries", [])
    if isinstance(material.get("publicKey"), dict):
        material["publicKey"].setdefault("hint", None)
        for k in ("rawBytes", "keyDetails"):
            material["publicKey"].pop(k, None)
    try:
        return sign_sigstore_pb.Signature(bundle_pb.Bundle.from_dict(doc))
    except ValueError as exc:
        raise VerificationError(f"Not a Sigstore bundle: {exc}", code="malformed") from None


def bundle_check(
    bundle: Mapping[str, Any],
    public_pem: str,
    files: Sequence[Mapping[str, Any]],
    *,
    model_name: str | None,
) -> tuple[str, dict[str, str], tuple[str, ...]]:
    """Check `bundle`'s DSSE signature with `public_pem` and that it signs exactly `files`
    ({path, sha256}): (signed model name, {path: sha256}, ignored paths), else
    VerificationError with the reason."""
    verifier = _verifier(public_pem)
    try:
        manifest = verifier.verify(_signature(bundle))
    except InvalidSignature:
        raise VerificationError(
            "The registry signature does not verify with the registry's key.",
            code="bad_signature",
        ) from None
    except (ValueError, KeyError, TypeError, IndexError) as exc:
        code = "key_mismatch" if str(exc).startswith("Key mismatch") else "malformed"
        raise VerificationError(
            f"The registry signature does not check out: {exc}", code=code
        ) from None
    params = manifest.serialization_type
    if params.get("method") != "files" or params.get("hash_type") != "sha256":
        raise VerificationError(
            f"The bundle's serialization {params.get('method')}/{params.get('hash_type')} is "
            "not per-file SHA-256.",
            code="unsupported",
        )
    if model_name is not None and manifest.model_name != model_name:
        raise VerificationError(
            f"The registry signature is for {manifest.model_name!r}, not {model_name!r}.",
            code="files_mismatch",
        )
    ignore = tuple(str(p) for p in params.get("ignore_paths", ()))
    signed = {str(rd.identifier): rd.digest.digest_hex for rd in manifest.resource_descriptors()}
    recorded = {
        str(f["path"]): str(f["sha256"]) for f in files if not is_ignored(f["path"], ignore)
    }
    problems = []
    if missing := sorted(signed.keys() - recorded.keys()):
        problems.append(f"signed but not in the version: {', '.join(missing)}")
    if extra := sorted(recorded.keys() - signed.keys()):
        problems.append(f"in the version but not signed: {', '.join(extra)}")
    if changed := sorted(p for p in signed.keys() & recorded.keys() if signed[p] != recorded[p]):
        problems.append(f"digest differs: {', '.join(changed)}")
    if problems:
        raise VerificationError(
            "The registry signature does not cover this version's files: " + "; ".join(problems),
            code="files_mismatch",
        )
    return manifest.model_name, signed, ignore


def is_ignored(path: str, ignore_paths: Iterable[str]) -> bool:
    return any(path == ig or path.startswith(ig.rstrip("/") + "/") for ig in ignore_paths)


def registry_signature(
    registry: Registry,
    ref: Ref,
    version: Mapping[str, Any],
    trusted_key: str | Path | None,
) -> SignatureCheck | None:
    """Check the registry's signature of `version` (its detail JSON, files included).

    None for a version that is not signed by design (a draft, or one pending review: only
    approved versions are signed; their files are still checked against their digests).
    An approved version without a signature is refused: stripping it is what an attacker
    between us and the registry would do.
    """
    number = int(version["number"])
    if version.get("state") not in SIGNED_STATES:
        return None
    base = ref.version_path(number)
    signatures = [
        s for s in registry.api.pages(f"{base}/signatures") if s.get("kind") == "registry"
    ]
    if not signatures:
        raise VerificationError(
            f"{ref.namespace}/{ref.model}:{number} is {version.get('state')} but carries no "
            "registry signature (the registry signs shortly after approval: try again in a "
            "minute).",
            code="unsigned",
        )
    chosen = max(signatures, key=lambda s: (str(s.get("created_at") or ""), int(s["id"])))
    bundle = chosen.get("bundle")
    if not isinstance(bundle, dict):
        bundle = registry.api.json("GET", f"{base}/signatures/{chosen['id']}.sig")
    pem, key_id, trust = signing_key(registry, bundle, trusted_key)
    model_name, digests, ignore = bundle_check(
        bundle,
        pem,
        version.get("files") or [],
        model_name=f"{ref.namespace}/{ref.model}/v{number}",
    )
    return SignatureCheck(
        key_id=key_id,
        trust=trust,
        signature_id=int(chosen["id"]),
        model_name=model_name,
        digests=digests,
        ignore_paths=ignore,
    )


# --- Local files -----------------------------------------------------------------------------


def safe_relpath(path: str) -> PurePosixPath:
    """A file path from the registry as a relative path that stays inside its folder."""
    pure = PurePosixPath(path)
    if (
        not path
        or pure.is_absolute()
        or "\\" in path
        or "\x00" in path
        or any(part in ("", ".", "..") for part in path.split("/"))
    ):
        raise VerificationError(
            f"The registry lists a file path {path!r} that would leave the folder.",
            code="unsafe_path",
        )
    return pure


def sha256_file(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def digest_header(sha256_hex: str) -> str:
    """RFC 9530 Content-Digest of a SHA-256 given as hex."""
    return "sha-256=:" + base64.b64encode(bytes.fromhex(sha256_hex)).decode() + ":"


def verify_folder(
    registry: Registry, ref: Ref, path: str | Path, trusted_key: str | Path | None = None
) -> dict[str, Any]:
    """Check a local folder against a version (`smr sign-verify`): the registry's signature
    of the version must verify, and the folder must hold exactly its files, each with the
    signed SHA-256 (the bundle's ignored paths, such as .git, are left out on both sides).

    Raises VerificationError naming the missing, extra and changed files.
    """
    folder = Path(path)
    version = registry.api.json("GET", ref.version_path())
    check = registry_signature(registry, ref, version, trusted_key)
    if check is None:
        raise VerificationError(
            f"{ref} is {version.get('state')}: only approved versions carry the registry's "
            "signature, so there is nothing to verify the folder against.",
            code="unsigned",
        )
    local = {
        p.relative_to(folder).as_posix(): p
        for p in folder.rglob("*")
        if p.is_file() and not is_ignored(p.relative_to(folder).as_posix(), check.ignore_paths)
    }
    expected = check.digests
    with ThreadPoolExecutor(max_workers=4) as pool:
        names = sorted(local.keys() & expected.keys())
        actual = dict(zip(names, pool.map(lambda n: sha256_file(local[n]), names), strict=True))
    missing = sorted(expected.keys() - local.keys())
    extra = sorted(local.keys() - expected.keys())
    changed = sorted(n for n in names if actual[n] != expected[n])
    if missing or extra or changed:
        parts = []
        if missing:
            parts.append(f"missing: {', '.join(missing)}")
        if extra:
            parts.append(f"not in the version: {', '.join(extra)}")
        if changed:
            parts.append(f"content differs: {', '.join(changed)}")
        raise VerificationError(
            f"{folder} does not match {ref}: " + "; ".join(parts),
            code="files_mismatch",
            missing=missing,
            extra=extra,
            changed=changed,
        )
    return {
        "ok": True,
        "path": str(folder),
        "ref": f"{ref.namespace}/{ref.model}:{version['number']}",
        "version": int(version["number"]),
        "files": len(expected),
        "signature": check.as_dict(),
    }
