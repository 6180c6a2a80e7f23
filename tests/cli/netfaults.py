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
import time
from typing import Any


def _reset(sock: socket.socket) -> None:
    """Close with RST (SO_LINGER 0) rather than FIN. A socket that a pump thread is blocked
    reading is shut for reading first: that wakes the reader, and the kernel tears the
    connection down (and sends the RST) only once no call is using it. Without it, an open
    event stream was not reset at all; its client saw nothing until its 60 s read timeout."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        try:
            sock.shutdown(socket.SHUT_RD)
        except OSError:
            pass
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
        self.lose_next = 0  # connections whose request reaches the service, answer lost
        self.retry_after = 1
        self.resets = 0
        self.busy_answers = 0
        self.lost_answers = 0
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
                elif self.lose_next > 0:
                    self.lose_next -= 1
                    self.lost_answers += 1
                    action = "lose"
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
            elif action == "lose":
                threading.Thread(target=self._lose, args=(client,), daemon=True).start()
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

    def _lose(self, client: socket.socket) -> None:
        """Forward one request, wait for the start of the service's answer, then reset the
        client: the service did the work, the client never hears of it."""
        request = _read_request(client)
        with socket.create_connection(("127.0.0.1", self.target_port), timeout=30) as up:
            up.sendall(request)
            up.recv(65536)
        _reset(client)

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

    def fault(self, *, reset: int = 0, busy: int = 0, lose: int = 0, retry_after: int = 1) -> None:
        with self.lock:
            self.reset_next += reset
            self.busy_next += busy
            self.lose_next += lose
            self.retry_after = retry_after

    def clear(self) -> None:
        with self.lock:
            self.reset_next = self.busy_next = self.lose_next = 0

    def close(self) -> None:
        self.closed = True
        self.listener.close()
        self.reset_open()


def _read_request(sock: socket.socket) -> bytes:
    """One whole HTTP/1.1 request with a Content-Length body (or none)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return head + b"\r\n\r\n" + body


def hold_a_request_slot(port: int, path: str = "/v1/experiments") -> socket.socket:
    """Start a POST whose body never completes: it holds a request slot of the service's load
    shedder until the socket is closed. Returns the socket once the request holds a slot (a
    request that arrived while the slot was busy is answered 503 at once: try again)."""
    for _ in range(100):
        sock = socket.create_connection(("127.0.0.1", port))
        sock.sendall(
            f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{".encode()
        )
        sock.settimeout(0.5)
        try:
            sock.recv(65536)  # shed: the slot was busy
        except TimeoutError:
            sock.settimeout(None)
            return sock  # no answer: the request is in the slot, waiting for its body
        sock.close()
        time.sleep(0.1)
    raise RuntimeError("could not take the service's request slot")


def fields(obj: Any) -> dict[str, Any]:
    return {k: getattr(obj, k) for k in ("resets", "busy_answers", "lost_answers", "forwarded")}
