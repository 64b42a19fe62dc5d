"""The Celery app. Tasks are thin: they load by id and call a registry service.

Embedded mode (`make run`) uses kombu's filesystem transport under var/celery, so a real worker
runs with no broker server; production sets CELERY_BROKER_URL (Redis or RabbitMQ).
"""

from __future__ import annotations

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "registry.settings")

app = Celery("smr")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks(["workers"], related_name="tasks")
