"""A Redis database as a test's Celery broker: flushed before and after, and set as the broker
URL of the code under test (a real broker; never eager mode)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import redis


@contextmanager
def redis_broker(settings, url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(url)
    client.flushdb()
    settings.CELERY_BROKER_URL = url
    try:
        yield client
    finally:
        client.flushdb()
