"""Personal access tokens at the service level: format, hashing at rest, what authenticates."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone

from registry.errors import InvalidInput, NotFound
from registry.models import ApiToken
from registry.services.tokens import token_authenticate, token_create, token_revoke


@pytest.fixture
def alice(actors):
    return actors.users["alice"]


def parts(plaintext: str) -> tuple[str, str]:
    assert plaintext.startswith("smr_")
    key_id, _, secret = plaintext[len("smr_") :].partition("_")
    return key_id, secret


def test_token_has_the_smr_prefix_and_authenticates(alice):
    issued = token_create(user=alice, scopes=["read"], name="ci")
    key_id, secret = parts(issued.plaintext)
    assert key_id == issued.token.key_id
    assert len(secret) >= 40  # 256 bits, url-safe base64
    assert token_authenticate(issued.plaintext) == issued.token
    assert token_authenticate(issued.plaintext).user == alice


def test_no_plaintext_secret_is_stored(alice):
    issued = token_create(user=alice, scopes=["read", "write"], name="laptop")
    _key_id, secret = parts(issued.plaintext)
    row = ApiToken.objects.filter(pk=issued.token.pk).values().get()
    for field, value in row.items():
        assert secret not in str(value), f"secret found in {field}"
        assert issued.plaintext not in str(value), f"token found in {field}"
    assert row["secret_hash"] != issued.plaintext
    assert row["secret_hash"] != secret
    assert len(row["secret_hash"]) == 64


def test_two_tokens_never_share_id_or_secret(alice):
    a = token_create(user=alice, scopes=["read"])
    b = token_create(user=alice, scopes=["read"])
    assert parts(a.plaintext)[0] != parts(b.plaintext)[0]
    assert parts(a.plaintext)[1] != parts(b.plaintext)[1]
    assert a.token.secret_hash != b.token.secret_hash


@pytest.mark.parametrize(
    "raw",
    [
        "",
        "garbage",
        "smr_",
        "smr__",
        "smr_abc",
        "smr_nope_secret",
        "ghp_0123456789abcdef0123456789abcdef0123",
        "smr_" + "a" * 17 + "_secret",
        "smr_ab\x00cd_secret",
    ],
)
def test_garbage_does_not_authenticate(actors, raw):
    assert token_authenticate(raw) is None


def test_wrong_secret_with_a_valid_key_id_fails(alice):
    issued = token_create(user=alice, scopes=["read"])
    key_id, secret = parts(issued.plaintext)
    assert (
        token_authenticate(f"smr_{key_id}_{secret[:-1]}{'A' if secret[-1] != 'A' else 'B'}") is None
    )
    assert token_authenticate(f"smr_{key_id}_") is None
    # The secret of one token does not open another token's key id.
    other = token_create(user=alice, scopes=["read"])
    assert token_authenticate(f"smr_{parts(other.plaintext)[0]}_{secret}") is None
    assert token_authenticate(issued.plaintext) is not None  # control


def test_expired_token_fails(alice):
    issued = token_create(
        user=alice, scopes=["read"], expires_at=timezone.now() + timedelta(hours=1)
    )
    assert token_authenticate(issued.plaintext) is not None
    ApiToken.objects.filter(pk=issued.token.pk).update(
        expires_at=timezone.now() - timedelta(seconds=1)
    )
    assert token_authenticate(issued.plaintext) is None


def test_revoked_token_fails(alice):
    issued = token_create(user=alice, scopes=["read"])
    revoked = token_revoke(user=alice, key_id=issued.token.key_id)
    assert revoked.revoked_at is not None
    assert token_authenticate(issued.plaintext) is None
    # Revoking twice keeps the first revocation time.
    assert token_revoke(user=alice, key_id=issued.token.key_id).revoked_at == revoked.revoked_at


def test_only_the_owner_can_revoke(actors, alice):
    issued = token_create(user=alice, scopes=["read"])
    with pytest.raises(NotFound):
        token_revoke(user=actors.users["mallory"], key_id=issued.token.key_id)
    assert token_authenticate(issued.plaintext) is not None


def test_token_of_an_inactive_user_fails(alice):
    issued = token_create(user=alice, scopes=["read"])
    alice.is_active = False
    alice.save(update_fields=["is_active"])
    assert token_authenticate(issued.plaintext) is None
    alice.is_active = True
    alice.save(update_fields=["is_active"])
    assert token_authenticate(issued.plaintext) is not None


def test_use_records_last_used_at(alice):
    issued = token_create(user=alice, scopes=["read"])
    assert issued.token.last_used_at is None
    token_authenticate(issued.plaintext)
    assert ApiToken.objects.get(pk=issued.token.pk).last_used_at is not None


@pytest.mark.parametrize("scopes", [[], ["root"], ["read", "sudo"], ["READ"]])
def test_scopes_must_be_a_known_non_empty_set(alice, scopes):
    with pytest.raises(InvalidInput):
        token_create(user=alice, scopes=scopes)
    assert ApiToken.objects.filter(user=alice).count() == 1  # only the fixture's token


def test_expiry_in_the_past_is_refused(alice):
    with pytest.raises(InvalidInput):
        token_create(user=alice, scopes=["read"], expires_at=timezone.now() - timedelta(minutes=1))


def test_scopes_are_stored_deduplicated_and_sorted(alice):
    issued = token_create(user=alice, scopes=["write", "read", "write"])
    assert ApiToken.objects.get(pk=issued.token.pk).scopes == ["read", "write"]
