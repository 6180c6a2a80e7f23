"""Network faults between a client and a real service, for the client's retry tests.

`FaultyProxy` is a TCP proxy on loopback in front of a running service: it forwards bytes
both ways, and on command resets the next connections (RST, as a crashed proxy or a dropped
NAT entry does: the client sees ``Connection reset by peer``), resets the open ones, or
answers the next requests itself with ``503`` and ``Retry-After`` as a load-shedding proxy
would. It counts what it did. `hold_a_request_slot` keeps the service's only request slot
busy with a request whose body never finishes, so the real load shedder answers 503.
"""

from __future__ import annotations

import json
import socket
import struct
import threading
from typing import Any


def _reset(sock: socket.socket) -> None:
    """Close with RST (SO_LINGER 0) rather than FIN."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
    except OSError:
        pass


class FaultyProxy:
    def __init__(self, target_port: int):
        self.target_port = target_port
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.port = self.listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.lock = threading.Lock()
        self.reset_next = 0  # connections to reset on accept
        self.busy_next = 0  # connections to answer 503 + Retry-After
        self.retry_after = 1
        self.resets = 0
        self.busy_answers = 0
        self.forwarded = 0
        self.open: list[tuple[socket.socket, socket.socket]] = []
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            with self.lock:
                if self.reset_next > 0:
                    self.reset_next -= 1
                    self.resets += 1
                    action = "reset"
                elif self.busy_next > 0:
                    self.busy_next -= 1
                    self.busy_answers += 1
                    action = "busy"
                else:
                    self.forwarded += 1
                    action = "forward"
            if action == "reset":
                client.recv(65536)  # the request was sent: the answer is lost
                _reset(client)
            elif action == "busy":
                threading.Thread(target=self._busy, args=(client,), daemon=True).start()
            else:
                threading.Thread(target=self._forward, args=(client,), daemon=True).start()

    def _busy(self, client: socket.socket) -> None:
        body = json.dumps(
            {
                "type": "https://hsl.dev/problems/overloaded",
                "title": "Service overloaded",
                "status": 503,
                "detail": "a proxy in the test says so",
            }
        ).encode()
        try:
            client.recv(65536)
            client.sendall(
                b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/problem+json\r\n"
                + f"retry-after: {self.retry_after}\r\n".encode()
                + f"content-length: {len(body)}\r\nconnection: close\r\n\r\n".encode()
                + body
            )
        finally:
            client.close()

    def _forward(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=10)
        except OSError:
            _reset(client)
            return
        upstream.settimeout(None)
        pair = (client, upstream)
        with self.lock:
            self.open.append(pair)

        def pump(src: socket.socket, dst: socket.socket) -> None:
            try:
                while True:
                    data = src.recv(65536)
                    if not data:
                        break
                    dst.sendall(data)
            except OSError:
                pass
            finally:
                for s in (src, dst):
                    try:
                        s.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass

        threading.Thread(target=pump, args=(upstream, client), daemon=True).start()
        pump(client, upstream)

    def reset_open(self) -> int:
        """Reset every forwarded connection open now (both sides); how many."""
        with self.lock:
            pairs, self.open = self.open, []
        for client, upstream in pairs:
            _reset(client)
            _reset(upstream)
        with self.lock:
            self.resets += len(pairs)
        return len(pairs)

    def fault(self, *, reset: int = 0, busy: int = 0, retry_after: int = 1) -> None:
        with self.lock:
            self.reset_next += reset
            self.busy_next += busy
            self.retry_after = retry_after

    def close(self) -> None:
        self.closed = True
        self.listener.close()
        self.reset_open()


def hold_a_request_slot(port: int, path: str = "/v1/experiments") -> socket.socket:
    """Start a POST whose body never completes: it holds a request slot of the service's load
    shedder until the socket is closed. Returns the socket."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{".encode()
    )
    return sock


def fields(obj: Any) -> dict[str, Any]:
    return {k: getattr(obj, k) for k in ("resets", "busy_answers", "forwarded")}
