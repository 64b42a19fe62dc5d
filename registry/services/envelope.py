"""Envelope-encryption plumbing shared by artifacts and resumable uploads: key-provider calls
mapped to registry errors, and one-pass encryption of a plaintext stream into the store."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import ParamSpec, TypeVar

from registry import storage
from registry.crypto import keys, stream
from registry.errors import IntegrityFailure, KeyServiceUnavailable, StorageUnavailable
from registry.keyconfig import provider_for

logger = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")


@dataclass(frozen=True)
class EncryptedWrite:
    """What one encrypted write stored: the plaintext's size and SHA-256."""

    size: int
    sha256: str


def key_provider_call(fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """Run a KeyProvider call, turning its failures into registry errors (503 or 502)."""
    try:
        return fn(*args, **kwargs)
    except keys.KeyUnavailableError as exc:
        raise KeyServiceUnavailable() from exc
    except keys.KeyUnwrapError as exc:
        logger.error("data key could not be unwrapped: %s", exc)
        raise IntegrityFailure() from exc


def wrapped_key_rewrap(
    old: keys.WrappedKey, context: dict[str, str], *, target: keys.KeyProvider, to_kek: str
) -> keys.WrappedKey:
    """`old` re-wrapped under `to_kek` (`target`'s primary): within one provider by its own
    rewrap (KMS ReEncrypt: the DEK never leaves it), across providers by unwrap + wrap."""
    source = key_provider_call(provider_for, old.kek_id)
    if source.scheme == target.scheme:
        return key_provider_call(source.rewrap, old, context, to_kek_id=to_kek)
    return key_provider_call(keys.rewrap_between, old, context, source, target)


def encrypt_to_store(
    *,
    store: storage.ObjectStore,
    key: str,
    dek: bytes,
    ad: bytes,
    chunks: Iterable[bytes],
    size_hint: int | None = None,
) -> EncryptedWrite:
    """Encrypt `chunks` into object `key` in one pass, returning plaintext size and SHA-256.

    The object only becomes visible on commit; on any error the write is aborted, and an
    store that cannot take the write (unreachable, or a folder that is not usable) is a
    StorageUnavailable (503): nothing the client sent is at fault.
    """
    encryptor = stream.StreamEncryptor(dek, ad)
    try:
        writer = store.writer(
            key, size_hint=stream.ciphertext_size(size_hint) if size_hint is not None else None
        )
    except storage.StorageError as exc:
        logger.error("object store refused a write of %s: %s", key, exc)
        raise StorageUnavailable() from exc
    try:
        for chunk in chunks:
            for out in encryptor.update(chunk):
                writer.write(out)
        for out in encryptor.finalize():
            writer.write(out)
        writer.commit()
    except BaseException as exc:
        try:
            writer.abort()
        except storage.StorageError:
            logger.warning("abort of %s failed; the janitor will retry", key)
        if isinstance(exc, storage.StorageError):
            logger.error("object store failed a write of %s: %s", key, exc)
            raise StorageUnavailable() from exc
        raise
    sha256 = encryptor.sha256
    if sha256 is None:  # finalize() sets it; this keeps the type honest
        raise RuntimeError("the encryptor was not finalized")
    return EncryptedWrite(size=encryptor.plaintext_size, sha256=sha256)
