"""The dashboard's shell in a real browser: sign-in, the security headers, no inline script."""

from __future__ import annotations

import pytest

from tests.dashboard.conftest import sign_in

pytestmark = pytest.mark.django_db(transaction=True)


def test_sign_in_shows_your_namespaces_with_a_strict_csp(page, site):
    response = page.goto(f"{site}/")
    assert "/login" in page.url
    csp = response.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp
    assert response.headers["x-frame-options"] == "DENY"
    sign_in(page, site, "alice")
    assert page.get_by_role("heading", name="Your namespaces").is_visible()
    assert page.get_by_text("acme").is_visible()
    assert page.locator("script:not([src])").count() == 0
