"""Slow clients cannot hold the API's capacity: uvicorn's h11 protocol with a deadline for
each request head and a cap on open connections.

uvicorn alone arms no timer until a first response, and ``data_received`` cancels the
keep-alive timer, so a client sending its headers a byte at a time (slowloris) keeps a
connection, and a file descriptor, for ever. Here:

- a connection must deliver each request head (request line and headers) within
  ``header_timeout`` seconds of starting it (from the connection's opening, or from the first
  byte after an idle keep-alive); otherwise it is closed;
- a request head larger than ``max_header_bytes`` gets 431 problem+json (h11's own limit
  only applies to a head still incomplete);
- at most ``max_connections`` are open; at the cap, a new connection closes the one that has
  waited longest without a request under way (idle, or still sending its head) and without a
  whole request head waiting unread in the kernel; if there is none, the new one gets 503
  problem+json and is closed.

So a legitimate client, which sends its head in milliseconds, is served even while hundreds
of slow ones are connected, and the process never runs out of file descriptors.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import resource
import socket
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("hsl.connections")

_REFUSAL = json.dumps(
    {
        "type": "https://hsl.dev/problems/overloaded",
        "title": "Service overloaded",
        "status": 503,
        "detail": "too many open connections; retry after the delay in Retry-After",
    }
).encode()
REFUSAL = (
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/problem+json\r\n"
    b"retry-after: 1\r\nconnection: close\r\ncontent-length: "
    + str(len(_REFUSAL)).encode()
    + b"\r\n\r\n"
    + _REFUSAL
)


def _head_too_large(limit: int) -> bytes:
    body = json.dumps(
        {
            "type": "https://hsl.dev/problems/too-large",
            "title": "Request head too large",
            "status": 431,
            "detail": f"the request line and headers exceed {limit} bytes (HSL_MAX_HEADER_BYTES)",
        }
    ).encode()
    return (
        b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
        b"content-type: application/problem+json\r\nconnection: close\r\n"
        b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )


# how many of the connections idle longest are looked at for one to close
CANDIDATES = 32


# the blank line that ends a request head (h11 also accepts bare newlines)
_HEAD_END = re.compile(rb"\n\r?\n")


def head_waiting(transport: asyncio.BaseTransport, buffered: bytes, limit: int) -> bool:
    """Whether a whole request head has arrived on this connection but not been parsed yet:
    ``buffered`` (what h11 holds of an unfinished head) followed by the bytes the kernel
    holds that the event loop has not read (peeked, at most ``limit`` of them, not taken).

    A slow client has bytes waiting too, whenever the event loop falls behind its trickle
    (a busy or starved server); only a finished head marks a client that is not slow.
    The bytes are read as plain HTTP: the API serves no TLS (a proxy in front terminates
    it); under TLS they would be ciphertext and this test meaningless."""
    sock = transport.get_extra_info("socket")
    if sock is None:
        return False
    try:
        peek = socket.socket(fileno=sock.fileno())  # the same descriptor; detached below
    except OSError:  # the connection is gone
        return False
    try:
        unread = peek.recv(limit, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except OSError:  # nothing waiting (EAGAIN), or the connection is gone
        unread = b""
    finally:
        peek.detach()
    return _HEAD_END.search(buffered + unread) is not None


class Counters:
    def __init__(self) -> None:
        self.head_timeouts = 0
        self.evicted = 0
        self.refused = 0


def guarded_protocol(
    max_connections: int, header_timeout: float, max_header_bytes: int = 16 * 1024
) -> tuple[type[H11Protocol], Counters]:
    """An ``H11Protocol`` subclass with these limits (pass it as uvicorn's ``http``)."""
    counters = Counters()
    too_large = _head_too_large(max_header_bytes)
    # connections without a request under way, oldest first (dict keeps insertion order)
    idle: dict[GuardedH11Protocol, float] = {}

    class GuardedH11Protocol(H11Protocol):
        _head_timer: asyncio.TimerHandle | None = None
        _refused = False

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                victim = self._victim()
                if victim is None:
                    # refuse: 503 at once
                    counters.refused += 1
                    self._answer_and_close(REFUSAL)
                    return
                counters.evicted += 1
                victim._close()
            self._idle()
            self._arm()

        def shutdown(self) -> None:
            # an event stream never ends by itself: close it, so a graceful shutdown does
            # not wait for it; its client reconnects with Last-Event-ID
            cycle = self.cycle
            if (
                cycle is not None
                and cycle.response_started
                and not cycle.response_complete
                and cycle.scope["path"].endswith("/events")
            ):
                self._close()
                return
            super().shutdown()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            idle.pop(self, None)
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            if self._refused:
                return
            if self.conn.their_state is h11.IDLE:
                # h11 checks the size of a head only while it is incomplete: one that arrives
                # whole would pass, so measure it here
                pending = self.conn.trailing_data[0] + data
                end = pending.find(b"\r\n\r\n")
                if end > max_header_bytes or (end == -1 and len(pending) > max_header_bytes):
                    self._disarm()
                    idle.pop(self, None)
                    self._answer_and_close(too_large)
                    return
            super().data_received(data)
            if self.transport.is_closing():
                return
            if self.conn.their_state is h11.IDLE:
                # still (or again) reading a request head
                if self._head_timer is None:
                    self._arm()
            else:
                self._disarm()
                idle.pop(self, None)

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
                self._idle()  # the keep-alive timer closes it if nothing comes

        # -- helpers ------------------------------------------------------------------
        def _victim(self) -> GuardedH11Protocol | None:
            """The connection idle longest (no request under way) without a whole request
            head waiting to be read: one whose request already arrived, unread while the loop
            was busy, is not a slow client."""
            for i, conn in enumerate(idle):
                if i >= CANDIDATES:
                    break
                if conn is self or conn.transport.is_closing():
                    continue
                buffered = conn.conn.trailing_data[0]
                if not head_waiting(conn.transport, buffered, max_header_bytes + 4):
                    return conn
            return None

        def _idle(self) -> None:
            idle.pop(self, None)
            idle[self] = self.loop.time()

        def _arm(self) -> None:
            self._disarm()
            self._head_timer = self.loop.call_later(header_timeout, self._head_timeout)

        def _disarm(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_timeout(self) -> None:
            self._head_timer = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                counters.head_timeouts += 1
                self._close()

        def _answer_and_close(self, answer: bytes) -> None:
            """Answer, discard what comes, close a moment later: closing with a request unread
            would reset the connection, and the client could lose the answer."""
            self._refused = True
            self.transport.write(answer)
            self.loop.call_later(0.5, self.transport.close)

        def _close(self) -> None:
            self._disarm()
            idle.pop(self, None)
            if not self.transport.is_closing():
                self.transport.close()

    return GuardedH11Protocol, counters


def ensure_open_files(needed: int) -> int:
    """Raise the soft limit on open files towards ``needed`` (up to the hard limit); returns
    the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:  # pragma: no cover - platform dependent
            log.warning("could not raise the open-files limit to %d: %s", needed, exc)
    return soft


def uvicorn_options(settings: Any) -> dict[str, Any]:
    """uvicorn's keyword arguments for these settings' connection limits. The connection cap
    stays below the open-files limit (with room for the database pool, logs and the broker)."""
    reserve = 128 + settings.api_threads * 2
    soft = ensure_open_files(settings.max_connections + reserve)
    cap = settings.max_connections
    if soft != resource.RLIM_INFINITY and cap + reserve > soft:
        cap = max(8, soft - reserve)
        log.warning(
            "HSL_MAX_CONNECTIONS=%d lowered to %d: the open-files limit is %d",
            settings.max_connections,
            cap,
            soft,
        )
    protocol, _ = guarded_protocol(cap, settings.header_timeout, settings.max_header_bytes)
    return {
        "http": protocol,
        "timeout_keep_alive": settings.keep_alive_seconds,
        "h11_max_incomplete_event_size": settings.max_header_bytes,
        "backlog": min(2048, max(128, cap)),
        "access_log": settings.access_log,
    }
