"""Embedded mode's files: importing settings writes nothing; first use writes under var/ only."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def python(code: str, *, var: Path, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SECRET_KEY", "SMR_", "CELERY_", "DJANGO_"))
    }
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=cwd,
        env={
            **clean,
            "PYTHONPATH": str(ROOT),
            "DJANGO_SETTINGS_MODULE": "registry.settings",
            "SMR_VAR_DIR": str(var),
            **env,
        },
        capture_output=True,
        text=True,
        timeout=60,
    )


SETTINGS = """
import json
from django.conf import settings
print(json.dumps({"key": settings.SECRET_KEY, "broker": settings.CELERY_BROKER_TRANSPORT_OPTIONS}))
"""


def tree(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


def test_importing_settings_writes_nothing(tmp_path):
    var = tmp_path / "var"
    first = python(SETTINGS, var=var, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert tree(tmp_path) == []  # no var/, no secret_key, no broker folders
    key = json.loads(first.stdout)["key"]
    # Dev and tests only: per process, and named so that `check --deploy` flags it.
    assert key.startswith("django-insecure-")
    assert json.loads(python(SETTINGS, var=var, cwd=tmp_path).stdout)["key"] != key
    # The kombu control folder is under var/, not ./control wherever the worker started.
    broker = json.loads(first.stdout)["broker"]
    assert broker["control_folder"] == str(var / "celery" / "control")


def test_settings_read_the_embedded_key_file_and_production_refuses_it(tmp_path):
    var = tmp_path / "var"
    var.mkdir()
    (var / "secret_key").write_text("k" * 60 + "\n")
    out = python(SETTINGS, var=var, cwd=tmp_path)
    assert json.loads(out.stdout)["key"] == "k" * 60
    # Every process of one install agrees (gunicorn workers, Celery).
    assert python(SETTINGS, var=var, cwd=tmp_path).stdout == out.stdout

    refused = python(SETTINGS, var=var, cwd=tmp_path, SMR_PRODUCTION="1")
    assert refused.returncode != 0
    assert "SECRET_KEY (or SECRET_KEY_FILE) is required" in refused.stderr


PUBLISH = """
from workers.app import app
app.send_task("workers.tasks.audit_checkpoint")
"""


def test_the_celery_app_makes_its_broker_folders_under_var_on_first_use(tmp_path):
    var = tmp_path / "var"
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    done = python(PUBLISH, var=var, cwd=cwd, SECRET_KEY="x" * 50)
    assert done.returncode == 0, done.stderr
    assert tree(cwd) == []  # kombu's default ./control is not used
    queued = list((var / "celery" / "queue").iterdir())
    assert len(queued) == 1  # the message, in the folder the worker reads
    assert list((var / "celery" / "control").iterdir())  # the exchange table
    for folder in (var, var / "celery", var / "celery" / "queue", var / "celery" / "control"):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700, folder
