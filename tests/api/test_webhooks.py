"""The webhooks API: admins create (secret shown once), list, delete and read the delivery
history; other roles get 403, other namespaces 404; private URLs get a stable 400."""

from __future__ import annotations

import pytest

from registry.models import AuditEvent, WebhookDelivery
from registry.services import webhooks
from tests.registry.services.test_webhooks import deliver_pending, verifies, webhook_row_bytes
from tests.support.receiver import receiver

HOOKS = "/api/v1/namespaces/acme/webhooks"
EVENTS = ["version.submitted", "version.approved"]


def test_admin_creates_lists_and_deletes_with_secret_shown_once(actors, settings):
    settings.SMR_WEBHOOK_ALLOW_PRIVATE = True
    root = actors.client("root")
    created = root.post(HOOKS, {"url": "http://127.0.0.1:9/hook", "events": EVENTS}, format="json")
    assert created.status_code == 201, created.content
    body = created.json()
    assert body["secret"].startswith("whsec_") and len(body["secret"]) > 40
    assert body["events"] == sorted(EVENTS) and body["active"] is True
    assert body["created_by"] == "root"

    listed = root.get(HOOKS).json()["results"]
    assert [h["id"] for h in listed] == [body["id"]]
    assert "secret" not in listed[0]
    assert body["secret"].encode() not in root.get(HOOKS).content
    assert AuditEvent.objects.filter(action="webhook.create", namespace="acme").exists()
    assert body["secret"] not in str(AuditEvent.objects.get(action="webhook.create").details)
    # Shown once, and not kept: the database holds only its wrapped form.
    assert body["secret"].encode() not in webhook_row_bytes(body["id"])

    assert root.delete(f"{HOOKS}/{body['id']}").status_code == 204
    assert root.get(HOOKS).json()["results"] == []
    assert root.delete(f"{HOOKS}/{body['id']}").status_code == 404
    assert AuditEvent.objects.filter(action="webhook.delete").count() == 1


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1/hook",
        "http://10.0.0.1/hook",
        "http://[::1]/hook",
        "http://169.254.169.254/latest/meta-data/",
        "http://localhost/hook",
    ],
)
def test_private_url_is_a_stable_400_by_default(actors, url):
    response = actors.client("root").post(HOOKS, {"url": url, "events": EVENTS}, format="json")
    assert response.status_code == 400, response.content
    assert response.json()["code"] == "webhook_url_not_allowed"
    assert "SMR_WEBHOOK_ALLOW_PRIVATE" in response.json()["message"]


def test_invalid_input_is_a_400(actors, settings):
    settings.SMR_WEBHOOK_ALLOW_PRIVATE = True
    root = actors.client("root")
    for payload in (
        {"url": "http://127.0.0.1/hook", "events": []},
        {"url": "http://127.0.0.1/hook", "events": ["version.exploded"]},
        {"url": "not a url", "events": EVENTS},
        {"url": "http://127.0.0.1/hook", "events": EVENTS, "secret": "mine"},
    ):
        assert root.post(HOOKS, payload, format="json").status_code == 400, payload


def test_only_admins_of_the_namespace(actors, settings):
    settings.SMR_WEBHOOK_ALLOW_PRIVATE = True
    hook, _ = webhooks.webhook_create(
        namespace=actors.acme, url="http://127.0.0.1:9/", events=EVENTS, creator=None
    )
    new = {"url": "http://127.0.0.1:9/x", "events": EVENTS}
    for name in ("alice", "bob", "carol", "dave"):
        client = actors.client(name)
        assert client.get(HOOKS).status_code == 403, name
        assert client.post(HOOKS, new, format="json").status_code == 403, name
        assert client.delete(f"{HOOKS}/{hook.pk}").status_code == 403, name
        assert client.get(f"{HOOKS}/{hook.pk}/deliveries").status_code == 403, name
    mallory = actors.client("mallory")
    assert mallory.get(HOOKS).status_code == 404
    assert mallory.post(HOOKS, new, format="json").status_code == 404
    assert mallory.delete(f"{HOOKS}/{hook.pk}").status_code == 404
    assert mallory.get(f"{HOOKS}/{hook.pk}/deliveries").status_code == 404
    # mallory is admin of evil: acme's webhook id is not reachable through her namespace.
    assert mallory.get(f"/api/v1/namespaces/evil/webhooks/{hook.pk}/deliveries").status_code == 404
    assert mallory.delete(f"/api/v1/namespaces/evil/webhooks/{hook.pk}").status_code == 404
    assert webhooks.webhook_list(namespace=actors.acme).count() == 1
    assert actors.client("root").get(HOOKS).status_code == 200


def test_delivery_history_shows_each_attempt(actors, draft, settings):
    settings.SMR_WEBHOOK_ALLOW_PRIVATE = True
    settings.SMR_WEBHOOK_BACKOFF = 0
    root = actors.client("root")
    with receiver([500, 503, 204]) as rx:
        created = root.post(
            HOOKS, {"url": rx.url, "events": ["version.submitted"]}, format="json"
        ).json()
        alice = actors.client("alice")
        files = "/api/v1/namespaces/acme/models/bert/versions/1/files/config.json"
        assert alice.put(files, b"{}", content_type="application/octet-stream").status_code in (
            200,
            201,
        )
        submit = alice.post("/api/v1/namespaces/acme/models/bert/versions/1/submit")
        assert submit.status_code == 202
        assert deliver_pending() == 3
    assert all(verifies(r, created["secret"]) for r in rx.requests)
    history = root.get(f"{HOOKS}/{created['id']}/deliveries").json()["results"]
    assert [(d["attempt"], d["state"], d["response_status"]) for d in history] == [
        (3, "succeeded", 204),
        (2, "failed", 503),
        (1, "failed", 500),
    ]
    assert {d["event"] for d in history} == {"version.submitted"}
    assert len({d["delivery_id"] for d in history}) == 1
    assert history[0]["payload"]["model"] == "bert"
    assert WebhookDelivery.objects.count() == 3
