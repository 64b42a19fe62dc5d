"""Key-encryption-key (KEK) providers for envelope encryption.

Each artifact is encrypted under its own random 32-byte data key (DEK); only the DEK's wrapped
form is stored. A provider turns wrapped DEKs back into DEKs and never hands out its KEKs:

* ``LocalKeyring``: AES-256-GCM KEKs kept in a JSON file (embedded mode, or a mounted secret).
* ``AwsKmsKeyProvider``: the KEK stays inside AWS KMS (or anything speaking its API).

Every ``kek_id`` carries its scheme (``local:k2``, ``aws-kms:arn:...``) so a stored wrapped key can
be routed back to the provider that made it (``provider_for_kek_id``) after the configured
provider changes.

This module has no Django imports: settings are read elsewhere and passed in.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import fcntl
import json
import logging
import os
import pathlib
import re
import secrets
import tempfile
import threading
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, NoReturn

import boto3
import botocore.config
import botocore.exceptions
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from registry.fsutil import fsync_dir

logger = logging.getLogger(__name__)

DEK_BYTES = 32
_NONCE_BYTES = 12
_GCM_TAG_BYTES = 16
_KEYRING_VERSION = 1

__all__ = [
    "DEK_BYTES",
    "AwsKmsKeyProvider",
    "KeyProvider",
    "KeyProviderError",
    "KeyUnavailableError",
    "KeyUnwrapError",
    "LocalKeyring",
    "WrappedKey",
    "provider_for_kek_id",
    "rewrap_between",
]


class KeyProviderError(Exception):
    """A KEK operation failed. Messages never carry key material."""


class KeyUnavailableError(KeyProviderError):
    """The key service could not be reached or refused for load; retrying later may succeed."""


class KeyUnwrapError(KeyProviderError):
    """Authentication failed: wrong KEK, tampered wrapped key, or wrong context. Not retryable."""


@dataclass(frozen=True)
class WrappedKey:
    kek_id: str  # "local:<key-id>" or "aws-kms:<key arn>"
    blob: bytes  # opaque wrapped DEK; safe to store and log (it is ciphertext)


def _check_context(context: Mapping[str, str]) -> dict[str, str]:
    # KMS only accepts string->string; enforcing it locally too means a context that works with the
    # embedded keyring cannot start failing after a move to KMS.
    ctx = dict(context)
    for k, v in ctx.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise TypeError("encryption context keys and values must be str")
    return ctx


def _check_dek(dek: bytes | bytearray | memoryview) -> None:
    if len(dek) != DEK_BYTES:
        raise ValueError(f"a data key must be {DEK_BYTES} bytes, got {len(dek)}")


def _zero(buf: bytearray) -> None:
    # Best effort only: CPython may already hold other copies (the immutable bytes an API returned,
    # buffers inside cryptography/botocore) that cannot be wiped. This just shortens the lifetime
    # of the copy we own.
    for i in range(len(buf)):
        buf[i] = 0


def _split_kek_id(kek_id: str) -> tuple[str, str]:
    scheme, sep, rest = kek_id.partition(":")
    if not sep or not scheme or not rest:
        raise KeyProviderError(f"malformed kek_id {kek_id!r}; expected '<scheme>:<key id>'")
    return scheme, rest


class KeyProvider(ABC):
    scheme: str

    @abstractmethod
    def primary_kek_id(self) -> str:
        """The kek_id new data keys are wrapped under."""

    @abstractmethod
    def generate_data_key(self, context: Mapping[str, str]) -> tuple[bytes, WrappedKey]:
        """A fresh 32-byte DEK and its wrapped form under the primary KEK."""

    @abstractmethod
    def unwrap(self, wrapped: WrappedKey, context: Mapping[str, str]) -> bytes:
        """The DEK inside ``wrapped``; KeyUnwrapError if it does not authenticate."""

    @abstractmethod
    def rewrap(
        self, wrapped: WrappedKey, context: Mapping[str, str], *, to_kek_id: str | None = None
    ) -> WrappedKey:
        """Re-wrap under ``to_kek_id`` (default: the primary) without returning the DEK."""

    def wrap(
        self, dek: bytes | bytearray, context: Mapping[str, str], *, kek_id: str | None = None
    ) -> WrappedKey:
        """Wrap an existing DEK under ``kek_id`` (default: the primary).

        Not abstract so that providers written against the four methods above keep working; only
        ``rewrap_between`` needs it, and only on the target provider.
        """
        raise NotImplementedError(f"{type(self).__name__} cannot wrap an existing data key")

    def _own_key_id(self, kek_id: str) -> str:
        scheme, rest = _split_kek_id(kek_id)
        if scheme != self.scheme:
            raise KeyProviderError(
                f"kek_id {kek_id!r} belongs to scheme {scheme!r}, not {self.scheme!r}; "
                "route it with provider_for_kek_id()"
            )
        return rest


# --------------------------------------------------------------------------------------------
# Local keyring
# --------------------------------------------------------------------------------------------

_LOCAL_KEY_ID = re.compile(r"^k([1-9][0-9]*)$")


def _local_aad(kek_id: str, context: Mapping[str, str]) -> bytes:
    # Binding the kek_id stops a blob from being relabelled as another key version; one JSON
    # object with sorted keys keeps the encoding unambiguous (no concatenation boundary games).
    return json.dumps(
        {"kek_id": kek_id, "context": dict(context)},
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    ).encode("utf-8")


class LocalKeyring(KeyProvider):
    """KEKs in a JSON file: ``{"version": 1, "primary": "k1", "keys": {"k1": {...}}}``.

    The file is re-read when it changes on disk, so ``add_key`` in one process (a management
    command) is picked up by the web and worker processes without a restart.
    """

    scheme = "local"

    def __init__(self, path: pathlib.Path, *, create: bool = False) -> None:
        self.path = pathlib.Path(path)
        self._lock = threading.RLock()
        self._keys: dict[str, bytes] = {}
        self._primary = ""
        self._stamp: tuple[int, int, int] | None = None
        if not self.path.exists():
            if not create:
                raise KeyProviderError(
                    f"keyring file {self.path} does not exist. Mount the existing keyring there "
                    "(or point SMR_KEYRING_FILE at it); only for a brand-new install let the "
                    "registry generate one, and back it up: losing it loses every artifact."
                )
            self._create()
        self._load()

    def __repr__(self) -> str:
        return f"LocalKeyring(path={str(self.path)!r}, primary={self._primary!r})"

    # -- file handling -------------------------------------------------------------------------

    @staticmethod
    def _new_key_entry() -> dict[str, str]:
        return {
            "key": base64.b64encode(secrets.token_bytes(DEK_BYTES)).decode("ascii"),
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
        }

    def _write_temp(self, doc: dict[str, Any]) -> str:
        # mkstemp creates the file 0600, so the key is never readable by others, even briefly.
        fd, tmp = tempfile.mkstemp(
            dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp"
        )
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(doc, fh, indent=2, sort_keys=True)
                fh.write("\n")
                fh.flush()
                os.fsync(fh.fileno())
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return tmp

    def _create(self) -> None:
        parent = self.path.parent
        if not parent.exists():
            parent.mkdir(parents=True, mode=0o700, exist_ok=True)
            os.chmod(parent, 0o700)  # mkdir's mode is filtered by the umask
        doc = {"version": _KEYRING_VERSION, "primary": "k1", "keys": {"k1": self._new_key_entry()}}
        tmp = self._write_temp(doc)
        try:
            # link() refuses to replace, unlike os.replace: when several workers start at once
            # exactly one keyring wins and the others load it, instead of each briefly using a
            # key that a sibling then overwrites (which would make their DEKs unrecoverable).
            os.link(tmp, self.path)
        except FileExistsError:
            return
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        # A crash right after the link could lose the new entry, i.e. a freshly generated key
        # that may already have wrapped DEKs. Best effort: the file itself is fsynced, and some
        # mounts refuse to fsync a directory.
        with contextlib.suppress(OSError):
            fsync_dir(self.path.parent)
        msg = (
            f"Generated a new embedded keyring at {self.path}. It is the only copy of the keys "
            "that protect every stored artifact: back it up, or configure a mounted keyring or "
            "AWS KMS for production."
        )
        logger.warning(msg)
        warnings.warn(msg, UserWarning, stacklevel=3)

    def _stat_stamp(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def _parse(self, raw: str) -> tuple[str, dict[str, bytes]]:
        where = f"keyring file {self.path}"
        try:
            doc = json.loads(raw)
        except ValueError:
            raise KeyProviderError(f"{where} is not valid JSON") from None
        if not isinstance(doc, dict) or doc.get("version") != _KEYRING_VERSION:
            raise KeyProviderError(f"{where} must be a JSON object with version {_KEYRING_VERSION}")
        entries = doc.get("keys")
        primary = doc.get("primary")
        if not isinstance(entries, dict) or not entries:
            raise KeyProviderError(f"{where} has no keys")
        keys: dict[str, bytes] = {}
        for key_id, entry in entries.items():
            if not isinstance(key_id, str) or not _LOCAL_KEY_ID.match(key_id):
                raise KeyProviderError(f"{where}: key id {key_id!r} is not of the form k<n>")
            material = entry.get("key") if isinstance(entry, dict) else None
            try:
                key = base64.b64decode(material or "", validate=True)
            except (binascii.Error, TypeError, ValueError):
                # `from None`: the decoder's message could quote part of the key.
                raise KeyProviderError(f"{where}: key {key_id} is not valid base64") from None
            if len(key) != DEK_BYTES:
                raise KeyProviderError(f"{where}: key {key_id} must be {DEK_BYTES} bytes")
            keys[key_id] = key
        if primary not in keys:
            raise KeyProviderError(f"{where}: primary {primary!r} is not one of its keys")
        return primary, keys

    def _load(self) -> None:
        with self._lock:
            stamp = self._stat_stamp()
            try:
                raw = self.path.read_text(encoding="utf-8")
            except OSError as exc:
                raise KeyProviderError(f"keyring file {self.path} cannot be read: {exc}") from None
            self._primary, self._keys = self._parse(raw)
            self._stamp = stamp

    def _refresh(self) -> None:
        stamp = self._stat_stamp()
        if stamp is None or stamp == self._stamp:
            # A vanished file keeps the cached keys: failing every request would not bring it back.
            return
        try:
            self._load()
        except KeyProviderError as exc:
            # Our own writes are atomic, so this is a hand edit gone wrong; keep serving with the
            # last good keys (a restart would fail loudly on the same error).
            logger.warning("keeping the previously loaded keyring: %s", exc)
            self._stamp = stamp

    @contextlib.contextmanager
    def _file_lock(self) -> Iterator[None]:
        # Serialises add_key across processes so two rotations cannot drop each other's key.
        lock_path = self.path.parent / f".{self.path.name}.lock"
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def add_key(self) -> str:
        """Generate a new KEK version, make it primary, persist it; returns its kek_id."""
        with self._lock, self._file_lock():
            # Re-read under the lock: another process may have rotated since we loaded.
            raw = self.path.read_text(encoding="utf-8")
            _, keys = self._parse(raw)  # refuse to rewrite a file we could not load
            doc = json.loads(raw)
            new_id = f"k{max(int(k[1:]) for k in keys) + 1}"
            doc["keys"][new_id] = self._new_key_entry()
            doc["primary"] = new_id
            tmp = self._write_temp(doc)
            try:
                os.replace(tmp, self.path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
            with contextlib.suppress(OSError):  # best effort, as in _create
                fsync_dir(self.path.parent)
            self._load()
        logger.info("keyring %s: new primary key %s", self.path, new_id)
        return f"{self.scheme}:{new_id}"

    # -- KeyProvider ---------------------------------------------------------------------------

    def primary_kek_id(self) -> str:
        with self._lock:
            self._refresh()
            return f"{self.scheme}:{self._primary}"

    def _key_for(self, kek_id: str) -> bytes | None:
        key_id = self._own_key_id(kek_id)
        with self._lock:
            self._refresh()
            return self._keys.get(key_id)

    def wrap(
        self, dek: bytes | bytearray, context: Mapping[str, str], *, kek_id: str | None = None
    ) -> WrappedKey:
        _check_dek(dek)
        ctx = _check_context(context)
        kek_id = kek_id or self.primary_kek_id()
        kek = self._key_for(kek_id)
        if kek is None:
            raise KeyProviderError(f"keyring {self.path} has no key {kek_id!r} to wrap with")
        nonce = secrets.token_bytes(_NONCE_BYTES)
        blob = nonce + AESGCM(kek).encrypt(nonce, bytes(dek), _local_aad(kek_id, ctx))
        return WrappedKey(kek_id=kek_id, blob=blob)

    def generate_data_key(self, context: Mapping[str, str]) -> tuple[bytes, WrappedKey]:
        dek = secrets.token_bytes(DEK_BYTES)
        return dek, self.wrap(dek, context)

    def unwrap(self, wrapped: WrappedKey, context: Mapping[str, str]) -> bytes:
        ctx = _check_context(context)
        kek = self._key_for(wrapped.kek_id)
        if kek is None:
            raise KeyUnwrapError(
                f"keyring {self.path} has no key {wrapped.kek_id!r}; was an old key removed?"
            )
        blob = wrapped.blob
        if len(blob) != _NONCE_BYTES + DEK_BYTES + _GCM_TAG_BYTES:
            raise KeyUnwrapError(f"wrapped key under {wrapped.kek_id!r} has the wrong length")
        try:
            return AESGCM(kek).decrypt(
                blob[:_NONCE_BYTES], blob[_NONCE_BYTES:], _local_aad(wrapped.kek_id, ctx)
            )
        except InvalidTag:
            raise KeyUnwrapError(
                f"wrapped key did not authenticate under {wrapped.kek_id!r} "
                "(wrong key, tampered blob, or wrong context)"
            ) from None

    def rewrap(
        self, wrapped: WrappedKey, context: Mapping[str, str], *, to_kek_id: str | None = None
    ) -> WrappedKey:
        dek = bytearray(self.unwrap(wrapped, context))
        try:
            return self.wrap(dek, context, kek_id=to_kek_id)
        finally:
            _zero(dek)


# --------------------------------------------------------------------------------------------
# AWS KMS
# --------------------------------------------------------------------------------------------

_KMS_KEY_ARN = re.compile(r"^arn:aws[a-z-]*:kms:[^:]+:[0-9]+:key/.+$")

# Codes that mean "this ciphertext does not open under this key/context": retrying cannot help.
_KMS_UNWRAP_CODES = frozenset(
    {"InvalidCiphertextException", "IncorrectKeyException", "AccessDeniedException"}
)
_KMS_UNAVAILABLE_CODES = frozenset(
    {
        "ThrottlingException",
        "Throttling",
        "ThrottledException",
        "RequestLimitExceeded",
        "TooManyRequestsException",
        "LimitExceededException",
        "KMSInternalException",
        "DependencyTimeoutException",
        "KeyUnavailableException",
        "ServiceUnavailable",
        "ServiceUnavailableException",
        "InternalFailure",
    }
)


def default_kms_config() -> botocore.config.Config:
    return botocore.config.Config(
        retries={"mode": "standard", "max_attempts": 3}, connect_timeout=5, read_timeout=30
    )


class AwsKmsKeyProvider(KeyProvider):
    """KEKs held by AWS KMS; the DEK is only ever seen in plaintext when generated or unwrapped."""

    scheme = "aws-kms"

    def __init__(
        self,
        key_id: str,
        *,
        endpoint_url: str | None = None,
        region: str = "us-east-1",
        client: Any = None,
    ) -> None:
        if not key_id:
            raise KeyProviderError("AwsKmsKeyProvider needs a KMS key id, ARN or alias")
        self.key_id = key_id
        self._client = client or boto3.client(
            "kms", endpoint_url=endpoint_url, region_name=region, config=default_kms_config()
        )
        self._primary_arn: str | None = key_id if _KMS_KEY_ARN.match(key_id) else None

    def __repr__(self) -> str:
        return f"AwsKmsKeyProvider(key_id={self.key_id!r})"

    def _call(self, op: str, unwrapping: bool, fn: Callable[..., Any], **kwargs: Any) -> Any:
        try:
            return fn(**kwargs)
        except botocore.exceptions.ClientError as exc:
            self._raise_client_error(op, unwrapping, exc)
        except (
            botocore.exceptions.ConnectionError,
            botocore.exceptions.HTTPClientError,
        ) as exc:
            raise KeyUnavailableError(
                f"KMS {op} could not reach KMS: {type(exc).__name__}"
            ) from exc
        except botocore.exceptions.ParamValidationError:
            # Its message quotes the offending parameter value, which may be a plaintext DEK, so
            # neither the message nor the exception itself may travel on.
            raise KeyProviderError(f"KMS {op} rejected its parameters locally") from None
        except botocore.exceptions.BotoCoreError as exc:
            # e.g. NoCredentialsError: configuration, not an outage.
            raise KeyProviderError(f"KMS {op} failed: {exc}") from exc

    def _raise_client_error(
        self, op: str, unwrapping: bool, exc: botocore.exceptions.ClientError
    ) -> NoReturn:
        err = exc.response.get("Error", {})
        code = err.get("Code", "Unknown")
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        # AWS error messages name keys and ARNs, never request payloads, so they are safe to keep.
        msg = f"KMS {op} failed ({code}): {err.get('Message', '')}".rstrip(": ")
        if unwrapping and code in _KMS_UNWRAP_CODES:
            raise KeyUnwrapError(msg) from exc
        if code in _KMS_UNAVAILABLE_CODES or status >= 500 or status == 429:
            raise KeyUnavailableError(msg) from exc
        raise KeyProviderError(msg) from exc

    def _kms_key_id(self, kek_id: str | None) -> str:
        return self.key_id if kek_id is None else self._own_key_id(kek_id)

    def primary_kek_id(self) -> str:
        # Compared against stored kek_ids (which hold the ARN KMS reports), so an alias or bare
        # key id must be resolved once, or every wrapped key would look "not on the primary".
        if self._primary_arn is None:
            resp = self._call("DescribeKey", False, self._client.describe_key, KeyId=self.key_id)
            self._primary_arn = resp["KeyMetadata"]["Arn"]
        return f"{self.scheme}:{self._primary_arn}"

    def generate_data_key(self, context: Mapping[str, str]) -> tuple[bytes, WrappedKey]:
        resp = self._call(
            "GenerateDataKey",
            False,
            self._client.generate_data_key,
            KeyId=self.key_id,
            KeySpec="AES_256",
            EncryptionContext=_check_context(context),
        )
        dek = resp["Plaintext"]
        _check_dek(dek)
        return dek, WrappedKey(kek_id=f"{self.scheme}:{resp['KeyId']}", blob=resp["CiphertextBlob"])

    def wrap(
        self, dek: bytes | bytearray, context: Mapping[str, str], *, kek_id: str | None = None
    ) -> WrappedKey:
        _check_dek(dek)
        resp = self._call(
            "Encrypt",
            False,
            self._client.encrypt,
            KeyId=self._kms_key_id(kek_id),
            Plaintext=bytes(dek),
            EncryptionContext=_check_context(context),
        )
        return WrappedKey(kek_id=f"{self.scheme}:{resp['KeyId']}", blob=resp["CiphertextBlob"])

    def unwrap(self, wrapped: WrappedKey, context: Mapping[str, str]) -> bytes:
        resp = self._call(
            "Decrypt",
            True,
            self._client.decrypt,
            CiphertextBlob=wrapped.blob,
            EncryptionContext=_check_context(context),
            # Pinning the key makes KMS refuse a blob that claims a different key, rather than
            # silently decrypting with whatever key the blob names.
            KeyId=self._own_key_id(wrapped.kek_id),
        )
        plaintext: bytes = resp["Plaintext"]
        return plaintext

    def rewrap(
        self, wrapped: WrappedKey, context: Mapping[str, str], *, to_kek_id: str | None = None
    ) -> WrappedKey:
        ctx = _check_context(context)
        resp = self._call(
            "ReEncrypt",
            True,
            self._client.re_encrypt,
            CiphertextBlob=wrapped.blob,
            SourceEncryptionContext=ctx,
            SourceKeyId=self._own_key_id(wrapped.kek_id),
            DestinationKeyId=self._kms_key_id(to_kek_id),
            DestinationEncryptionContext=ctx,
        )
        return WrappedKey(kek_id=f"{self.scheme}:{resp['KeyId']}", blob=resp["CiphertextBlob"])


# --------------------------------------------------------------------------------------------
# Routing and migration between providers
# --------------------------------------------------------------------------------------------


def provider_for_kek_id(kek_id: str, providers: Sequence[KeyProvider]) -> KeyProvider:
    """The first provider whose scheme matches ``kek_id``'s prefix."""
    scheme, _ = _split_kek_id(kek_id)
    for provider in providers:
        if provider.scheme == scheme:
            return provider
    configured = ", ".join(sorted({p.scheme for p in providers})) or "none"
    raise KeyProviderError(
        f"no key provider for {kek_id!r} (scheme {scheme!r}); configured: {configured}"
    )


def rewrap_between(
    wrapped: WrappedKey,
    context: Mapping[str, str],
    source: KeyProvider,
    target: KeyProvider,
) -> WrappedKey:
    """Move a wrapped DEK from one provider to another (local <-> KMS), under target's primary.

    Unlike ``rewrap`` the DEK does pass through this process, since neither side can reach the
    other's KEK.
    """
    if source is target:
        return source.rewrap(wrapped, context)
    dek = bytearray(source.unwrap(wrapped, context))
    try:
        return target.wrap(dek, context)
    finally:
        _zero(dek)
