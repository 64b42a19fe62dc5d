"""A webhook receiver on loopback: a tiny threaded http.server that records every request and
answers with a scripted sequence of statuses (the last one repeats). With `tls` it speaks
only HTTPS, and records the handshakes that failed."""

from __future__ import annotations

import socket
import ssl
import sys
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
    def __init__(
        self,
        statuses: list[int],
        hold: threading.Event | None = None,
        tls: ssl.SSLContext | None = None,
        host: str = "127.0.0.1",
        bind: str = "127.0.0.1",
    ) -> None:
        self.statuses = list(statuses) or [200]
        self.requests: list[Received] = []
        self.tls_errors: list[str] = []
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

        class Server(ThreadingHTTPServer):
            address_family = socket.AF_INET6 if ":" in bind else socket.AF_INET
            daemon_threads = True

            def handle_error(self, request: object, client_address: object) -> None:
                # A client that refuses our certificate ends the handshake: record, not print.
                receiver.tls_errors.append(repr(sys.exc_info()[1]))

        self.server = Server((bind, 0), Handler)
        if tls is not None:
            # The handshake runs in the request's thread, on its first read.
            self.server.socket = tls.wrap_socket(
                self.server.socket, server_side=True, do_handshake_on_connect=False
            )
        scheme = "https" if tls is not None else "http"
        self.url = f"{scheme}://{host}:{self.server.server_address[1]}/hooks/smr"


@contextmanager
def receiver(
    statuses: list[int] | None = None,
    hold: threading.Event | None = None,
    tls: ssl.SSLContext | None = None,
    host: str = "127.0.0.1",
    bind: str = "127.0.0.1",
) -> Iterator[Receiver]:
    """`host` is the name the URL uses; `bind` the address the server listens on."""
    r = Receiver(statuses or [200], hold, tls, host, bind)
    thread = threading.Thread(target=r.server.serve_forever, daemon=True)
    thread.start()
    try:
        yield r
    finally:
        r.server.shutdown()
        r.server.server_close()
