"""A webhook receiver on loopback: a tiny threaded http.server that records every request and
answers with a scripted sequence of statuses (the last one repeats)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes


class Receiver:
    def __init__(self, statuses: list[int], hold: threading.Event | None = None) -> None:
        self.statuses = list(statuses) or [200]
        self.requests: list[Received] = []
        self.lock = threading.Lock()
        # Set when a request has arrived; with `hold`, each answer waits (10 s at most) for it.
        self.arrived = threading.Event()
        self.hold = hold
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                with receiver.lock:
                    receiver.requests.append(Received(self.path, dict(self.headers), body))
                    status = (
                        receiver.statuses.pop(0)
                        if len(receiver.statuses) > 1
                        else receiver.statuses[0]
                    )
                receiver.arrived.set()
                if receiver.hold is not None:
                    receiver.hold.wait(10)
                self.send_response(status)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/smr"


@contextmanager
def receiver(
    statuses: list[int] | None = None, hold: threading.Event | None = None
) -> Iterator[Receiver]:
    r = Receiver(statuses or [200], hold)
    thread = threading.Thread(target=r.server.serve_forever, daemon=True)
    thread.start()
    try:
        yield r
    finally:
        r.server.shutdown()
        r.server.server_close()
