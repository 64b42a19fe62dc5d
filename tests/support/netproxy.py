"""A threaded TCP proxy that tests can cut and restore, to simulate an endpoint outage."""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time


class TcpProxy:
    """Forwards 127.0.0.1:<port> to upstream.

    cut() resets every live connection and closes the listening socket, so new connections are
    refused; restore() listens again on the same port.
    """

    def __init__(
        self,
        upstream_host: str,
        upstream_port: int,
        *,
        host: str = "127.0.0.1",
        bytes_per_second: float | None = None,
    ) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.host = host
        # Per direction and connection; slow enough, a test can cut a transfer in mid-body.
        self.bytes_per_second = bytes_per_second
        self.port = 0
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._conns: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []

    def start(self) -> int:
        self._listen()
        return self.port

    def restore(self) -> None:
        self._listen()

    def cut(self) -> None:
        with self._lock:
            listener, self._listener = self._listener, None
            conns, self._conns = self._conns, set()
        if listener is not None:
            # shutdown() wakes the thread blocked in accept(); close() alone would not.
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        for conn in conns:
            _reset(conn)

    def stop(self) -> None:
        self.cut()
        for thread in self._threads:
            thread.join(timeout=5)
        self._threads.clear()

    def __enter__(self) -> TcpProxy:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _listen(self) -> None:
        with self._lock:
            if self._listener is not None:
                return
            listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            # The port may still have connections in TIME_WAIT from before the cut.
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind((self.host, self.port))
            listener.listen(64)
            self.port = listener.getsockname()[1]
            self._listener = listener
        self._spawn(self._accept_loop, listener)

    def _spawn(self, target, *args) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        self._threads = [t for t in self._threads if t.is_alive()]
        self._threads.append(thread)
        thread.start()

    def _accept_loop(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # closed by cut()
            try:
                upstream = socket.create_connection(self.upstream, timeout=5)
                upstream.settimeout(None)
            except OSError:
                _reset(client)
                continue
            with self._lock:
                if self._listener is not listener:  # cut() ran while we were connecting
                    _reset(client)
                    _reset(upstream)
                    return
                self._conns.update((client, upstream))
            pair = _Pair(client, upstream)
            self._spawn(self._pump, pair, client, upstream)
            self._spawn(self._pump, pair, upstream, client)

    def _pump(self, pair: _Pair, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
                if self.bytes_per_second:
                    time.sleep(len(data) / self.bytes_per_second)
            # Pass a half-close on, so HTTP clients see the peer's EOF as it happened.
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            _reset(src)
            _reset(dst)
        if pair.finish():
            with self._lock:
                self._conns.difference_update(pair.socks)
            for sock in pair.socks:
                sock.close()


class _Pair:
    """One proxied connection: the two sockets get closed when both directions are done."""

    def __init__(self, *socks: socket.socket) -> None:
        self.socks = socks
        self._open = 2
        self._lock = threading.Lock()

    def finish(self) -> bool:
        with self._lock:
            self._open -= 1
            return self._open == 0


def _reset(sock: socket.socket) -> None:
    """Close with RST, as a crashed or partitioned peer would, and wake blocked readers."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        sock.close()
