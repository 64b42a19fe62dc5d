"""Browser tests: pytest-playwright driving Debian's chromium headless against a live server.

Playwright's own browser download cannot work here, so the launch points at /usr/bin/chromium
(installed by apt: .ci/run does it). Playwright's sync API runs an event loop in the test's
thread, where Django refuses ORM calls unless told the test is synchronous on purpose.
"""

from __future__ import annotations

import os
import shutil

import pytest

os.environ.setdefault("DJANGO_ALLOW_ASYNC_UNSAFE", "true")

CHROMIUM = os.environ.get("SMR_CHROMIUM", "/usr/bin/chromium")
PASSWORD = "correct horse battery staple"


@pytest.fixture(scope="session")
def browser_type_launch_args(browser_type_launch_args):
    if not shutil.which(CHROMIUM):
        pytest.fail(f"{CHROMIUM} is missing: apt-get install chromium (.ci/run installs it)")
    # --no-sandbox: CI runs as root, where chromium's sandbox refuses to start.
    return {**browser_type_launch_args, "executable_path": CHROMIUM, "args": ["--no-sandbox"]}


@pytest.fixture
def site(live_server, actors):
    """The live server's URL, with every actor able to sign in with PASSWORD."""
    for user in actors.users.values():
        user.set_password(PASSWORD)
        user.save(update_fields=["password"])
    return live_server.url


def sign_in(page, site: str, username: str) -> None:
    page.goto(f"{site}/login")
    page.get_by_label("Username").fill(username)
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(lambda url: "/login" not in url)
