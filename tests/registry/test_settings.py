"""registry/settings.py refuses, at start and loudly, webhook settings that cannot work."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


def start(**env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", "import django; django.setup()"],
        env={**os.environ, "DJANGO_SETTINGS_MODULE": "registry.settings", **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize(
    ("bad", "good", "message"),
    [
        (
            {"SMR_WEBHOOK_CA_BUNDLE": "/nonexistent/ca.pem"},
            {"SMR_WEBHOOK_CA_BUNDLE": "{bundle}"},
            "SMR_WEBHOOK_CA_BUNDLE",
        ),
        (
            {"SMR_WEBHOOK_TIMEOUT": "10", "SMR_WEBHOOK_LOST_AFTER": "70"},
            {"SMR_WEBHOOK_TIMEOUT": "10", "SMR_WEBHOOK_LOST_AFTER": "71"},
            "SMR_WEBHOOK_LOST_AFTER",
        ),
    ],
)
def test_unusable_webhook_settings_stop_the_start(bad, good, message, tmp_path):
    refused = start(**bad)
    assert refused.returncode != 0
    assert "ImproperlyConfigured" in refused.stderr and message in refused.stderr
    # Control: the same start with a usable value succeeds.
    bundle = tmp_path / "ca.pem"
    bundle.write_text("")
    started = start(**{k: v.format(bundle=bundle) for k, v in good.items()})
    assert started.returncode == 0, started.stderr[-2000:]
