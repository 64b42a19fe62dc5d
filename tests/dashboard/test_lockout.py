"""In a browser: a lockout after the configured number of wrong passwords, audited; and on
every page of the audit, datasets and settings modules (with home and login) the CSP header,
no inline script, no on* handler and no style attribute."""

from __future__ import annotations

import re

import pytest
from playwright.sync_api import expect

from registry.dp.accounting import DpEvent
from registry.models import AuditEvent, JobKind
from registry.services import jobs, ledger, signatures, webhooks
from tests.dashboard.conftest import PASSWORD, sign_in

pytestmark = pytest.mark.django_db(transaction=True)

# Every element's event-handler and style attributes (the CSP would block them anyway; a
# page that needs one is broken under it).
INLINE_ATTRIBUTES = """() => Array.from(document.querySelectorAll('*')).flatMap(el =>
  Array.from(el.attributes)
    .filter(a => a.name.toLowerCase().startsWith('on') || a.name.toLowerCase() === 'style')
    .map(a => `${el.tagName.toLowerCase()}[${a.name}]`))"""


def try_password(page, site: str, username: str, password: str) -> None:
    page.goto(f"{site}/login")
    page.get_by_label("Username").fill(username)
    page.get_by_label("Password").fill(password)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_load_state()


def test_wrong_passwords_lock_the_account_out_audited(page, site, settings):
    settings.AXES_FAILURE_LIMIT = 3
    for _ in range(2):
        try_password(page, site, "carol", "wrong horse")
        expect(page.get_by_role("alert")).to_contain_text("(invalid_credentials)")
    try_password(page, site, "carol", "wrong horse")
    expect(page.get_by_text("locked_out")).to_be_visible()
    # Locked out: even the right password is refused, and no session starts.
    try_password(page, site, "carol", PASSWORD)
    expect(page.get_by_text("locked_out")).to_be_visible()
    page.goto(f"{site}/")
    assert "/login" in page.url
    failed = AuditEvent.objects.filter(action="auth.login_failed", target="user:carol")
    assert failed.count() >= 3
    locked = AuditEvent.objects.filter(action="auth.locked_out", target="user:carol")
    assert locked.exists()
    assert locked.first().details["failure_limit"] == 3
    assert not AuditEvent.objects.filter(action="auth.login", actor_user="carol").exists()


def test_the_lockout_message_is_shown_on_the_login_page(page, site, settings):
    settings.AXES_FAILURE_LIMIT = 1
    try_password(page, site, "carol", "wrong horse")
    expect(page.get_by_role("alert")).to_contain_text("(locked_out)", timeout=1000)
    expect(page.get_by_label("Password")).to_be_visible(timeout=1000)


@pytest.fixture
def everything(actors, draft, settings):
    """A dataset with spent budget and a running job, a webhook with a delivery, a publisher
    key: so every section of the pages renders its rows, not only its empty state."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    alice = actors.users["alice"]
    dataset = ledger.dataset_create(
        namespace=actors.acme, name="clinic", sensitivity="confidential", delta=1e-5, creator=alice
    )
    ledger.data_block_create(dataset=dataset, name="b", epsilon=8, accountant="rdp", creator=alice)
    ledger.dp_record_declare(
        version=draft,
        dataset=dataset,
        blocks=["b"],
        event=DpEvent(sampling_rate=0.01, noise_multiplier=1.0, steps=1000),
        creator=alice,
    )
    job = jobs.job_create(
        kind=JobKind.DP_RETRAIN,
        namespace=actors.acme,
        created_by=alice,
        params={"dataset": "clinic", "blocks": ["b"], "model": "bert"},
    )
    jobs.job_start(job_id=job.pk)
    jobs.job_progress(job_id=job.pk, progress=0.4, message="epoch 4 of 10")
    settings.SMR_WEBHOOK_ALLOW_PRIVATE = True
    webhook, _ = webhooks.webhook_create(
        namespace=actors.acme,
        url="http://127.0.0.1:9/hook",
        events=["version.approved"],
        creator=actors.users["root"],
    )
    webhooks.webhooks_emit(namespace=actors.acme, event="version.approved", payload={"a": 1})
    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    pem = key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()
    signatures.publisher_key_add(
        namespace=actors.acme, public_key_pem=pem, name="bot", creator=actors.users["root"]
    )
    return webhook


def check_page(page, response, violations: list[str]) -> None:
    url = page.url
    assert response is not None and response.ok, url
    csp = response.headers.get("content-security-policy", "")
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp, url
    assert page.locator("script:not([src])").count() == 0, url
    assert page.evaluate(INLINE_ATTRIBUTES) == [], url
    assert violations == [], url


def test_every_page_has_the_csp_and_no_inline_script(page, site, actors, everything, browser):
    violations: list[str] = []
    page.on(
        "console",
        lambda msg: violations.append(msg.text) if "Content Security Policy" in msg.text else None,
    )
    check_page(page, page.goto(f"{site}/login"), violations)
    sign_in(page, site, "root")
    pages = [
        "/",
        "/audit",
        "/audit?action=model.create&since=2000-01-01T00:00",
        "/audit?since=not-a-time",
        "/settings",
        "/ns/acme/-/settings",
        f"/ns/acme/-/settings/webhooks/{everything.pk}",
        "/ns/acme/-/datasets",
        "/ns/acme/-/datasets/clinic",
        "/ns/acme/-/datasets/clinic/jobs",
    ]
    for path in pages:
        check_page(page, page.goto(f"{site}{path}"), violations)
    # The datasets page polls its running job: let htmx swap the fragment in at least once.
    page.goto(f"{site}/ns/acme/-/datasets/clinic")
    with page.expect_response(lambda r: r.url.endswith("/clinic/jobs")):
        pass
    assert page.evaluate(INLINE_ATTRIBUTES) == [] and violations == []
    # Pages rendered by a POST: a created token (shown once) and a created webhook.
    page.goto(f"{site}/settings")
    page.get_by_label("Name (what it is for)").fill("csp-check")
    with page.expect_navigation() as nav:
        page.get_by_role("button", name="Create token").click()
    assert nav.value.status == 201
    check_page(page, nav.value, violations)
    expect(page.get_by_label("Your new token csp-check")).to_have_value(re.compile(r"^smr_"))
    # An auditor's pages: the audit log with "Verify now" and the verification page itself.
    dave = browser.new_page()
    try:
        dave.on(
            "console",
            lambda msg: (
                violations.append(msg.text) if "Content Security Policy" in msg.text else None
            ),
        )
        sign_in(dave, site, "dave")
        check_page(dave, dave.goto(f"{site}/audit"), violations)
        dave.get_by_role("button", name="Verify now").click()
        expect(dave.locator("#verify-result")).to_contain_text("intact")
        assert dave.evaluate(INLINE_ATTRIBUTES) == [] and violations == []
        # A refused page (the selector's refusal) carries the same headers.
        response = dave.goto(f"{site}/ns/acme/-/settings")
        assert response.status == 403
        assert "script-src 'self'" in response.headers["content-security-policy"]
        assert dave.locator("script:not([src])").count() == 0
    finally:
        dave.close()
