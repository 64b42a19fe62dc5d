"""KEK providers: the local keyring on disk, and KMS through moto's server over real HTTP."""

from __future__ import annotations

import base64
import json
import logging
import socket
import stat
import threading
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import boto3
import botocore.config
import pytest

from registry.crypto.keys import (
    AwsKmsKeyProvider,
    KeyProviderError,
    KeyUnavailableError,
    KeyUnwrapError,
    LocalKeyring,
    WrappedKey,
    provider_for_kek_id,
    rewrap_between,
)

REGION = "us-east-1"
CTX = {"artifact": "a-123", "model": "resnet"}


def kms_client(endpoint: str, *, total_attempts: int = 3, connect_timeout: float = 5):
    config = botocore.config.Config(
        retries={"mode": "standard", "total_max_attempts": total_attempts},
        connect_timeout=connect_timeout,
        read_timeout=5,
    )
    return boto3.client("kms", endpoint_url=endpoint, region_name=REGION, config=config)


def flip(blob: bytes, index: int) -> bytes:
    b = bytearray(blob)
    b[index] ^= 0x01
    return bytes(b)


@pytest.fixture
def keyring_path(tmp_path: Path) -> Path:
    return tmp_path / "keys" / "keyring.json"


@pytest.fixture
def keyring(keyring_path: Path) -> LocalKeyring:
    with pytest.warns(UserWarning, match="embedded keyring"):
        return LocalKeyring(keyring_path, create=True)


@pytest.fixture
def kms(moto_endpoint: str, kms_key_id: str) -> AwsKmsKeyProvider:
    return AwsKmsKeyProvider(kms_key_id, endpoint_url=moto_endpoint, region=REGION)


@pytest.fixture
def second_kms_key(moto_endpoint: str) -> str:
    return kms_client(moto_endpoint).create_key(Description="smr second KEK")["KeyMetadata"]["Arn"]


# ---------------------------------------------------------------------------------------------
# Local keyring
# ---------------------------------------------------------------------------------------------


def test_local_round_trip(keyring: LocalKeyring) -> None:
    dek, wrapped = keyring.generate_data_key(CTX)

    assert len(dek) == 32
    assert wrapped.kek_id == "local:k1" == keyring.primary_kek_id()
    assert dek not in wrapped.blob
    assert keyring.unwrap(wrapped, dict(reversed(CTX.items()))) == dek  # order-insensitive
    assert keyring.generate_data_key(CTX)[0] != dek


def test_local_wrong_context_fails(keyring: LocalKeyring) -> None:
    _, wrapped = keyring.generate_data_key(CTX)

    for ctx in ({**CTX, "artifact": "a-124"}, {}, {**CTX, "extra": "x"}):
        with pytest.raises(KeyUnwrapError):
            keyring.unwrap(wrapped, ctx)


@pytest.mark.parametrize(
    "index", [0, 11, 12, 43, -1], ids=["nonce", "nonce-end", "ct", "ct-end", "tag"]
)
def test_local_tampered_blob_fails(keyring: LocalKeyring, index: int) -> None:
    _, wrapped = keyring.generate_data_key(CTX)

    with pytest.raises(KeyUnwrapError):
        keyring.unwrap(WrappedKey(wrapped.kek_id, flip(wrapped.blob, index)), CTX)
    with pytest.raises(KeyUnwrapError):
        keyring.unwrap(WrappedKey(wrapped.kek_id, wrapped.blob[:-1]), CTX)


def test_local_blob_relabelled_to_another_key_version_fails(keyring: LocalKeyring) -> None:
    _, wrapped = keyring.generate_data_key(CTX)
    keyring.add_key()

    with pytest.raises(KeyUnwrapError):
        keyring.unwrap(WrappedKey("local:k2", wrapped.blob), CTX)


def test_keyring_created_on_first_use_private_and_warned(
    keyring_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    assert not keyring_path.parent.exists()

    with (
        caplog.at_level(logging.WARNING, logger="registry.crypto.keys"),
        pytest.warns(UserWarning, match="Generated a new embedded keyring"),
    ):
        ring = LocalKeyring(keyring_path, create=True)

    assert any("embedded keyring" in r.getMessage() for r in caplog.records)
    assert stat.S_IMODE(keyring_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(keyring_path.parent.stat().st_mode) == 0o700
    assert sorted(p.name for p in keyring_path.parent.iterdir()) == ["keyring.json"]  # no temp left

    doc = json.loads(keyring_path.read_text())
    assert doc["version"] == 1 and doc["primary"] == "k1" and list(doc["keys"]) == ["k1"]
    assert len(base64.b64decode(doc["keys"]["k1"]["key"])) == 32
    assert doc["keys"]["k1"]["created"].endswith("+00:00")

    # A second start loads the same keyring quietly instead of generating another.
    _, wrapped = ring.generate_data_key(CTX)
    caplog.clear()
    again = LocalKeyring(keyring_path, create=True)
    assert not caplog.records
    assert again.unwrap(wrapped, CTX) == ring.unwrap(wrapped, CTX)


def test_missing_keyring_without_create_says_how_to_fix(keyring_path: Path) -> None:
    with pytest.raises(KeyProviderError, match="does not exist") as exc:
        LocalKeyring(keyring_path)

    assert str(keyring_path) in str(exc.value)
    assert "SMR_KEYRING_FILE" in str(exc.value)
    assert not keyring_path.exists()


def test_malformed_keyring_is_rejected_without_echoing_it(keyring_path: Path) -> None:
    keyring_path.parent.mkdir()
    secretish = base64.b64encode(b"s" * 31).decode()  # one byte short
    keyring_path.write_text(
        json.dumps({"version": 1, "primary": "k1", "keys": {"k1": {"key": secretish}}})
    )

    with pytest.raises(KeyProviderError, match="must be 32 bytes") as exc:
        LocalKeyring(keyring_path)
    assert secretish not in str(exc.value)


def test_add_key_then_rewrap_moves_to_new_key(keyring: LocalKeyring, keyring_path: Path) -> None:
    dek, old = keyring.generate_data_key(CTX)

    assert keyring.add_key() == "local:k2"
    assert keyring.primary_kek_id() == "local:k2"
    assert stat.S_IMODE(keyring_path.stat().st_mode) == 0o600
    doc = json.loads(keyring_path.read_text())
    assert doc["primary"] == "k2" and sorted(doc["keys"]) == ["k1", "k2"]

    new = keyring.rewrap(old, CTX)
    assert new.kek_id == "local:k2"
    assert keyring.unwrap(new, CTX) == dek
    assert keyring.unwrap(old, CTX) == dek  # old blobs stay readable while k1 is kept
    assert keyring.generate_data_key(CTX)[1].kek_id == "local:k2"

    back = keyring.rewrap(new, CTX, to_kek_id="local:k1")
    assert back.kek_id == "local:k1" and keyring.unwrap(back, CTX) == dek

    assert keyring.add_key() == "local:k3"
    with pytest.raises(KeyProviderError):
        keyring.rewrap(new, CTX, to_kek_id="local:k9")


def test_keyring_missing_old_key_cannot_unwrap_old_blobs(
    keyring: LocalKeyring, keyring_path: Path
) -> None:
    _, old = keyring.generate_data_key(CTX)
    keyring.add_key()
    doc = json.loads(keyring_path.read_text())
    del doc["keys"]["k1"]
    keyring_path.write_text(json.dumps(doc))

    with pytest.raises(KeyUnwrapError, match="local:k1"):
        LocalKeyring(keyring_path).unwrap(old, CTX)


def test_rotation_in_another_process_is_picked_up(
    keyring: LocalKeyring, keyring_path: Path
) -> None:
    other = LocalKeyring(keyring_path)  # e.g. a worker that loaded the file before rotation

    keyring.add_key()
    dek, wrapped = keyring.generate_data_key(CTX)

    assert other.primary_kek_id() == "local:k2"
    assert other.unwrap(wrapped, CTX) == dek


def test_no_dek_in_keyring_file_reprs_or_errors(keyring: LocalKeyring, keyring_path: Path) -> None:
    dek, wrapped = keyring.generate_data_key(CTX)
    kek = base64.b64decode(json.loads(keyring_path.read_text())["keys"]["k1"]["key"])
    with pytest.raises(KeyUnwrapError) as exc:
        keyring.unwrap(wrapped, {})

    file_text = keyring_path.read_text()
    assert dek.hex() not in file_text and base64.b64encode(dek).decode() not in file_text
    texts = [str(exc.value), repr(exc.value), repr(keyring), repr(wrapped)]
    for secret in (dek, kek):
        for text in texts:
            for form in (secret.hex(), base64.b64encode(secret).decode(), repr(secret)):
                assert form not in text


def test_context_must_be_strings(keyring: LocalKeyring) -> None:
    with pytest.raises(TypeError):
        keyring.generate_data_key({"size": 3})  # type: ignore[dict-item]


# ---------------------------------------------------------------------------------------------
# AWS KMS (moto server over HTTP)
# ---------------------------------------------------------------------------------------------


def test_kms_round_trip(kms: AwsKmsKeyProvider, kms_key_id: str) -> None:
    dek, wrapped = kms.generate_data_key(CTX)

    assert len(dek) == 32
    assert wrapped.kek_id == f"aws-kms:{kms_key_id}" == kms.primary_kek_id()
    assert kms.unwrap(wrapped, CTX) == dek
    # botocore reads retries["max_attempts"] as retries *after* the first try: 3 -> 4 attempts.
    retries = kms._client.meta.config.retries
    assert retries["mode"] == "standard" and retries["total_max_attempts"] == 4


def test_kms_alias_resolves_to_arn(moto_endpoint: str, kms_key_id: str) -> None:
    alias = f"alias/smr-{uuid.uuid4().hex[:8]}"
    kms_client(moto_endpoint).create_alias(AliasName=alias, TargetKeyId=kms_key_id)
    provider = AwsKmsKeyProvider(alias, endpoint_url=moto_endpoint)

    assert provider.primary_kek_id() == f"aws-kms:{kms_key_id}"
    dek, wrapped = provider.generate_data_key(CTX)
    assert wrapped.kek_id == provider.primary_kek_id()
    assert provider.unwrap(wrapped, CTX) == dek


def test_kms_wrong_encryption_context_fails(kms: AwsKmsKeyProvider) -> None:
    # moto 5.2.5 does enforce this: it uses the sorted context as AES-GCM AAD, so a mismatch is
    # InvalidCiphertextException, as with real KMS.
    _, wrapped = kms.generate_data_key(CTX)

    for ctx in ({**CTX, "artifact": "a-124"}, {}, {**CTX, "extra": "x"}):
        with pytest.raises(KeyUnwrapError, match="InvalidCiphertextException"):
            kms.unwrap(wrapped, ctx)


def test_kms_tampered_blob_fails(kms: AwsKmsKeyProvider) -> None:
    _, wrapped = kms.generate_data_key(CTX)

    with pytest.raises(KeyUnwrapError):
        kms.unwrap(WrappedKey(wrapped.kek_id, flip(wrapped.blob, -1)), CTX)


def test_kms_blob_relabelled_to_another_key_fails(
    kms: AwsKmsKeyProvider, second_kms_key: str
) -> None:
    # Real KMS answers IncorrectKeyException; moto answers AccessDeniedException. Both map to
    # KeyUnwrapError, which is what matters to callers.
    _, wrapped = kms.generate_data_key(CTX)

    with pytest.raises(KeyUnwrapError):
        kms.unwrap(WrappedKey(f"aws-kms:{second_kms_key}", wrapped.blob), CTX)


def test_kms_rewrap_to_second_key(
    kms: AwsKmsKeyProvider, kms_key_id: str, second_kms_key: str, moto_endpoint: str
) -> None:
    dek, old = kms.generate_data_key(CTX)

    new = kms.rewrap(old, CTX, to_kek_id=f"aws-kms:{second_kms_key}")
    assert new.kek_id == f"aws-kms:{second_kms_key}"
    assert new.blob != old.blob
    assert kms.unwrap(new, CTX) == dek
    second = AwsKmsKeyProvider(second_kms_key, endpoint_url=moto_endpoint)
    assert second.unwrap(new, CTX) == dek

    # Default destination is the provider's own primary key.
    home = kms.rewrap(new, CTX)
    assert home.kek_id == f"aws-kms:{kms_key_id}" and kms.unwrap(home, CTX) == dek

    # ReEncrypt checks the source context too.
    with pytest.raises(KeyUnwrapError):
        kms.rewrap(old, {}, to_kek_id=f"aws-kms:{second_kms_key}")


def test_local_to_kms_and_back(keyring: LocalKeyring, kms: AwsKmsKeyProvider) -> None:
    dek, local_wrapped = keyring.generate_data_key(CTX)

    in_kms = rewrap_between(local_wrapped, CTX, keyring, kms)
    assert in_kms.kek_id == kms.primary_kek_id()
    assert kms.unwrap(in_kms, CTX) == dek
    with pytest.raises(KeyUnwrapError):
        kms.unwrap(in_kms, {})

    keyring.add_key()
    back = rewrap_between(in_kms, CTX, kms, keyring)
    assert back.kek_id == "local:k2"
    assert keyring.unwrap(back, CTX) == dek


def test_provider_for_kek_id(keyring: LocalKeyring, kms: AwsKmsKeyProvider) -> None:
    providers = [keyring, kms]
    assert provider_for_kek_id("local:k7", providers) is keyring
    assert provider_for_kek_id("aws-kms:arn:aws:kms:us-east-1:1:key/x", providers) is kms
    with pytest.raises(KeyProviderError, match="no key provider"):
        provider_for_kek_id("vault:transit/k", providers)
    with pytest.raises(KeyProviderError, match="no key provider"):
        provider_for_kek_id("aws-kms:arn:x", [keyring])
    with pytest.raises(KeyProviderError, match="malformed"):
        provider_for_kek_id("k1", providers)
    # A provider handed a foreign kek_id refuses rather than mislabelling it as tampered.
    with pytest.raises(KeyProviderError) as exc:
        kms.unwrap(WrappedKey("local:k1", b"x" * 60), CTX)
    assert not isinstance(exc.value, KeyUnwrapError)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_kms_unreachable_is_unavailable_within_the_retry_budget() -> None:
    endpoint = f"http://127.0.0.1:{closed_port()}"
    arn = "arn:aws:kms:us-east-1:123456789012:key/00000000-0000-0000-0000-000000000000"
    client = kms_client(endpoint, total_attempts=2, connect_timeout=1)
    # botocore's hook sees every HTTP attempt, so the test can count them.
    sent: list[bytes] = []
    client.meta.events.register(
        "before-send.kms", lambda request, **_: sent.append(request.headers["X-Amz-Target"])
    )
    provider = AwsKmsKeyProvider(arn, client=client)

    with pytest.raises(KeyUnavailableError, match="could not reach"):
        provider.generate_data_key(CTX)
    assert len(sent) == 2  # the client's budget, and no retry loop of the provider's own
    with pytest.raises(KeyUnavailableError):
        provider.unwrap(WrappedKey(f"aws-kms:{arn}", b"x" * 60), CTX)
    with pytest.raises(KeyUnavailableError):
        provider.rewrap(WrappedKey(f"aws-kms:{arn}", b"x" * 60), CTX)
    # Each call is one KMS operation, given up after exactly two attempts.
    ops = [target.decode().rpartition(".")[2] for target in sent]
    assert ops == [op for op in ("GenerateDataKey", "Decrypt", "ReEncrypt") for _ in range(2)]


class FakeKms:
    """A loopback HTTP server answering every KMS call with a chosen (status, __type)."""

    def __init__(self) -> None:
        self.status = 500
        self.code: str | None = None
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                body = b""
                if fake.code:
                    body = json.dumps({"__type": fake.code, "message": "nope"}).encode()
                self.send_response(fake.status)
                self.send_header("Content-Type", "application/x-amz-json-1.1")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"


@pytest.fixture
def fake_kms() -> Iterator[FakeKms]:
    fake = FakeKms()
    thread = threading.Thread(target=fake.server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield fake
    finally:
        fake.server.shutdown()
        fake.server.server_close()


@pytest.mark.parametrize(
    ("status", "code", "expected"),
    [
        (400, "ThrottlingException", KeyUnavailableError),
        (500, "KMSInternalException", KeyUnavailableError),
        (503, None, KeyUnavailableError),
        (400, "DisabledException", KeyProviderError),
        (400, "InvalidCiphertextException", KeyUnwrapError),
    ],
)
def test_kms_service_errors_are_classified(
    fake_kms: FakeKms, status: int, code: str | None, expected: type
) -> None:
    fake_kms.status, fake_kms.code = status, code
    arn = "arn:aws:kms:us-east-1:123456789012:key/00000000-0000-0000-0000-000000000000"
    provider = AwsKmsKeyProvider(arn, client=kms_client(fake_kms.endpoint, total_attempts=1))

    with pytest.raises(KeyProviderError) as exc:
        provider.unwrap(WrappedKey(f"aws-kms:{arn}", b"x" * 60), CTX)
    assert type(exc.value) is expected


def test_kms_errors_never_carry_the_dek(kms: AwsKmsKeyProvider) -> None:
    dek, wrapped = kms.generate_data_key(CTX)
    with pytest.raises(KeyUnwrapError) as exc:
        kms.unwrap(wrapped, {})
    text = f"{exc.value} {exc.value!r} {exc.value.__cause__}"
    for form in (dek.hex(), base64.b64encode(dek).decode(), repr(dek)):
        assert form not in text
