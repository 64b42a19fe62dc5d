"""The REST API over httpx: one client per registry, errors as SmrError, cursor pages."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import httpx

from smr.errors import SmrError

API = "/api/v1"
# What a retry can fix: the connection broke, the server is busy or restarting.
RETRY_STATUSES = {429, 502, 503, 504}
RETRIES = 5


def path_quote(path: str) -> str:
    """A file's relative path as a URL path (slashes kept, everything else escaped)."""
    return quote(path, safe="/")


class Api:
    """A connection pool to one registry with its token (sent as a header, never logged)."""

    def __init__(self, url: str, token: str, *, timeout: float = 60.0) -> None:
        self.url = url.rstrip("/")
        self._client = httpx.Client(
            base_url=self.url,
            headers={"Authorization": f"Bearer {token}", "User-Agent": "smr-client/0.1"},
            timeout=httpx.Timeout(timeout, connect=10.0),
            follow_redirects=False,
            limits=httpx.Limits(max_connections=32, max_keepalive_connections=16),
        )

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> Api:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def client(self) -> httpx.Client:
        return self._client

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """Send a request, retrying broken connections and 429/5xx (after Retry-After), and
        raise SmrError with the server's code for any other non-2xx answer."""
        url = path if path.startswith("http") else f"{API}{path}"
        for attempt in range(RETRIES + 1):
            try:
                response = self._client.request(method, url, **kwargs)
            except httpx.TransportError as exc:
                if attempt == RETRIES or not _replayable(kwargs):
                    raise SmrError(
                        f"Cannot reach {self.url}: {exc}", code="connection_error"
                    ) from exc
                time.sleep(min(2**attempt * 0.2, 5))
                continue
            if response.status_code in RETRY_STATUSES and attempt < RETRIES and _replayable(kwargs):
                time.sleep(_retry_after(response, attempt))
                continue
            raise_for(response)
            return response
        raise AssertionError("unreachable")

    def json(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self.request(method, path, **kwargs)
        return response.json() if response.content else None

    def pages(self, path: str, params: dict[str, Any] | None = None) -> Iterator[dict[str, Any]]:
        """Every item of a cursor-paginated list, page after page."""
        query = {"limit": 500, **(params or {})}
        url: str | None = path
        while url is not None:
            body = self.json("GET", url, params=query if url == path else None)
            yield from body["results"]
            url = body.get("next")


def _replayable(kwargs: dict[str, Any]) -> bool:
    # A streamed body (an iterator) cannot be sent twice; bytes and JSON can.
    content = kwargs.get("content")
    return content is None or isinstance(content, bytes | str)


def _retry_after(response: httpx.Response, attempt: int) -> float:
    try:
        return min(float(response.headers.get("Retry-After", "")), 30.0)
    except ValueError:
        return min(2**attempt * 0.2, 5.0)


def raise_for(response: httpx.Response) -> None:
    if response.is_success:
        return
    try:
        body = response.json()
    except ValueError:
        body = {}
    if not isinstance(body, dict):
        body = {}
    raise SmrError(
        str(body.get("message") or f"HTTP {response.status_code}"),
        code=str(body.get("code") or f"http_{response.status_code}"),
        status=response.status_code,
        extra=body.get("extra") if isinstance(body.get("extra"), dict) else None,
    )
