"""Settings pages (registry/dashboard/views/settings.py): your tokens (shown once, revoked),
and a namespace's policy, webhooks with their deliveries, and trusted publisher keys."""

from __future__ import annotations

import re
from html import unescape

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from django.test import Client
from rest_framework.test import APIClient

from registry.models import ApiToken, AuditEvent, PublisherKey, Webhook
from registry.services import webhooks

pytestmark = pytest.mark.django_db


def signed_in(actors, name: str) -> Client:
    client = Client()
    client.force_login(actors.users[name])
    return client


def bearer(token: str) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {token}")
    return client


def pem(key) -> str:
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


# --- Tokens -----------------------------------------------------------------------------------


def test_a_created_token_is_shown_once_and_works(actors):
    alice = signed_in(actors, "alice")
    page = alice.post(
        "/settings/tokens", {"name": "ci", "scopes": ["read", "write"], "expires": "30"}
    )
    assert page.status_code == 201
    assert page["Cache-Control"] == "no-store"
    html = page.content.decode()
    plaintext = re.search(r'id="new-token"[^>]*value="(smr_[^"]+)"', html).group(1)
    token = ApiToken.objects.get(user=actors.users["alice"], name="ci")
    assert plaintext.startswith(f"smr_{token.key_id}_")
    assert token.scopes == ["read", "write"] and token.expires_at is not None
    assert bearer(plaintext).get("/api/v1/namespaces").status_code == 200
    # Never again: not on the settings page, nor anywhere the session keeps.
    listing = alice.get("/settings").content.decode()
    assert plaintext not in listing and f"smr_{token.key_id}_" in listing
    assert plaintext.split("_", 2)[2] not in str(dict(alice.session))
    assert plaintext not in str(alice.cookies)


def test_token_form_errors_are_the_services_messages(actors):
    alice = signed_in(actors, "alice")
    page = alice.post("/settings/tokens", {"name": "none", "expires": "default"}, follow=True)
    assert "(invalid_input)" in page.content.decode()
    page = alice.post("/settings/tokens", {"scopes": ["read"], "expires": "9999"}, follow=True)
    assert "Pick an expiry from the list. (invalid_input)" in page.content.decode()
    assert not ApiToken.objects.filter(name="none").exists()


def test_revoking_a_token_stops_it_and_anothers_token_is_not_found(actors):
    alice = signed_in(actors, "alice")
    key_id = ApiToken.objects.get(user=actors.users["alice"]).key_id
    page = alice.post(f"/settings/tokens/{key_id}/revoke", follow=True)
    assert "is revoked" in page.content.decode()
    assert actors.client("alice").get("/api/v1/namespaces").status_code == 401
    assert AuditEvent.objects.filter(action="token.revoke", target=f"token:{key_id}").exists()
    bobs = ApiToken.objects.get(user=actors.users["bob"]).key_id
    page = alice.post(f"/settings/tokens/{bobs}/revoke", follow=True)
    assert "(not_found)" in page.content.decode()
    assert actors.client("bob").get("/api/v1/namespaces").status_code == 200


def test_settings_lists_the_namespaces_you_administer(actors):
    root = signed_in(actors, "root").get("/settings").content.decode()
    assert 'href="/ns/acme/-/settings"' in root
    alice = signed_in(actors, "alice").get("/settings").content.decode()
    assert "/-/settings" not in alice and "You administer no namespace" in alice


# --- A namespace's settings -----------------------------------------------------------------


def test_only_admins_reach_a_namespaces_settings(actors):
    assert signed_in(actors, "root").get("/ns/acme/-/settings").status_code == 200
    page = signed_in(actors, "alice").get("/ns/acme/-/settings")
    assert page.status_code == 403 and "(permission_denied)" in page.content.decode()
    page = signed_in(actors, "mallory").get("/ns/acme/-/settings")
    assert page.status_code == 404 and "(not_found)" in page.content.decode()
    assert Client().get("/ns/acme/-/settings").status_code == 302


def test_the_policy_form_saves_every_field(actors):
    root = signed_in(actors, "root")
    html = root.get("/ns/acme/-/settings").content.decode()
    for gate in ("scan_clean", "publisher_signature", "dp_budget"):
        assert f'value="{gate}"' in html
    form = {
        "approvals_required": "2",
        "allow_self_review": "on",
        "scan_quarantine_severity": "medium",
        "required_gates": ["scan_clean", "dp_budget"],
        "protected_aliases": "production, staging",
    }
    page = root.post("/ns/acme/-/settings/policy", form, follow=True)
    assert "Policy saved." in page.content.decode()
    actors.acme.refresh_from_db()
    assert actors.acme.approvals_required == 2 and actors.acme.allow_self_review
    assert actors.acme.scan_quarantine_severity == "medium"
    assert actors.acme.required_gates == ["dp_budget", "scan_clean"]
    assert actors.acme.protected_aliases == ["production", "staging"]
    assert AuditEvent.objects.filter(action="policy.update", actor_user="root").exists()
    html = page.content.decode()
    assert 'id="gate-dp_budget" name="required_gates" value="dp_budget" checked' in html
    # Unticked boxes are a change too: no gates, no self review.
    root.post("/ns/acme/-/settings/policy", {**form, "required_gates": [], "allow_self_review": ""})
    actors.acme.refresh_from_db()
    assert actors.acme.required_gates == [] and actors.acme.allow_self_review is False


def test_bad_policy_input_is_refused_with_its_code(actors):
    root = signed_in(actors, "root")
    before = list(actors.acme.protected_aliases)
    base = {"approvals_required": "1", "scan_quarantine_severity": "high"}
    page = root.post("/ns/acme/-/settings/policy", {**base, "approvals_required": "0"}, follow=True)
    assert "(invalid_input)" in page.content.decode()
    page = root.post(
        "/ns/acme/-/settings/policy", {**base, "protected_aliases": "Not/An-Alias"}, follow=True
    )
    assert "An alias name is 1 to 63 characters" in page.content.decode()
    assert "(invalid_input)" in page.content.decode()
    actors.acme.refresh_from_db()
    assert actors.acme.protected_aliases == before
    assert not AuditEvent.objects.filter(action="policy.update").exists()


def test_forged_admin_posts_from_others_are_refused(actors):
    alice = signed_in(actors, "alice")
    before = (actors.acme.approvals_required, list(actors.acme.required_gates))
    forged = {"approvals_required": "1", "scan_quarantine_severity": "critical"}
    assert alice.post("/ns/acme/-/settings/policy", forged).status_code == 403
    assert (
        alice.post("/ns/acme/-/settings/webhooks", {"url": "https://x.example"}).status_code == 403
    )
    assert alice.post("/ns/acme/-/settings/keys", {"public_key_pem": "x"}).status_code == 403
    mallory = signed_in(actors, "mallory")
    assert mallory.post("/ns/acme/-/settings/policy", forged).status_code == 404
    actors.acme.refresh_from_db()
    assert (actors.acme.approvals_required, actors.acme.required_gates) == before
    assert not AuditEvent.objects.filter(action="policy.update").exists()


def test_a_webhook_shows_its_secret_once_then_its_deliveries(actors, settings):
    settings.SMR_WEBHOOK_ALLOW_PRIVATE = True
    root = signed_in(actors, "root")
    page = root.post(
        "/ns/acme/-/settings/webhooks",
        {"url": "http://127.0.0.1:9/hook", "events": ["version.approved", "version.revoked"]},
    )
    assert page.status_code == 201 and page["Cache-Control"] == "no-store"
    secret = re.search(r'id="webhook-secret"[^>]*value="(whsec_[0-9a-f]+)"', page.content.decode())
    webhook = Webhook.objects.get()
    assert webhooks.webhook_secret(webhook=webhook) == secret.group(1)
    html = root.get("/ns/acme/-/settings").content.decode()
    assert secret.group(1) not in html and "http://127.0.0.1:9/hook" in html
    deliveries_url = f"/ns/acme/-/settings/webhooks/{webhook.pk}"
    assert "Nothing delivered yet" in root.get(deliveries_url).content.decode()
    webhooks.webhooks_emit(namespace=actors.acme, event="version.approved", payload={"a": 1})
    html = root.get(deliveries_url).content.decode()
    assert 'data-state="pending"' in html and "version.approved" in html
    assert signed_in(actors, "mallory").get(deliveries_url).status_code == 404
    page = root.post(f"{deliveries_url}/delete", follow=True)
    assert "Webhook deleted" in page.content.decode()
    assert not Webhook.objects.exists()


def test_a_webhook_to_a_private_address_is_refused_by_the_service(actors, settings):
    settings.SMR_WEBHOOK_ALLOW_PRIVATE = False
    page = signed_in(actors, "root").post(
        "/ns/acme/-/settings/webhooks",
        {"url": "http://127.0.0.1/hook", "events": ["version.approved"]},
        follow=True,
    )
    assert "(webhook_url_not_allowed)" in page.content.decode()
    assert not Webhook.objects.exists()


def test_publisher_keys_are_added_listed_and_deleted(actors):
    root = signed_in(actors, "root")
    key = ec.generate_private_key(ec.SECP256R1())
    page = root.post(
        "/ns/acme/-/settings/keys", {"name": "release-bot", "public_key_pem": pem(key)}, follow=True
    )
    assert "is trusted now" in page.content.decode()
    trusted = PublisherKey.objects.get(namespace=actors.acme)
    assert f'data-key="{trusted.key_id}"' in page.content.decode()
    again = root.post("/ns/acme/-/settings/keys", {"public_key_pem": pem(key)}, follow=True)
    assert "(publisher_key_exists)" in again.content.decode()
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    refused = root.post("/ns/acme/-/settings/keys", {"public_key_pem": pem(rsa_key)}, follow=True)
    assert "(invalid_input)" in refused.content.decode()
    # The API lists what the page lists.
    listed = actors.client("carol").get("/api/v1/namespaces/acme/publisher-keys").json()
    assert [k["key_id"] for k in listed["results"]] == [trusted.key_id]
    page = root.post(f"/ns/acme/-/settings/keys/{trusted.key_id}/delete", follow=True)
    assert "is no longer trusted" in page.content.decode()
    assert not PublisherKey.objects.exists()
    assert unescape("No trusted publisher keys") in page.content.decode()
