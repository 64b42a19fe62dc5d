"""The Celery app. Tasks are thin: they load by id and call a registry service.

Embedded mode (`make run`) uses kombu's filesystem transport under var/celery, so a real worker
runs with no broker server; production sets CELERY_BROKER_URL (Redis or RabbitMQ).
"""

from __future__ import annotations

import os
from typing import Any

from celery import Celery

from registry.embedded import broker_folders_ensure

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "registry.settings")

app = Celery("smr")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks(["workers"], related_name="tasks")


def _broker_folders(sender: Celery, source: Any, **kwargs: Any) -> None:
    # kombu's filesystem transport creates none of its folders' parents: make them on first use
    # of the app (a worker or a publisher), since importing settings must write nothing.
    if str(source.broker_url).startswith("filesystem:"):
        broker_folders_ensure(source.broker_transport_options or {})


app.on_after_configure.connect(_broker_folders)
