"""Small helpers for talking to the files API through the Django test client."""

from __future__ import annotations

import base64
import hashlib

from tests.conftest import FILES

OCTET = "application/octet-stream"


def put(client, path: str, data: bytes, **headers):
    """PUT `data` as the raw body of acme/bert v1's file `path`."""
    return client.put(f"{FILES}/{path}", data, content_type=OCTET, **headers)


def body(response) -> bytes:
    return b"".join(response.streaming_content)


def digest_header(data: bytes) -> str:
    """An RFC 9530 Content-Digest value for `data`."""
    return "sha-256=:" + base64.b64encode(hashlib.sha256(data).digest()).decode() + ":"
