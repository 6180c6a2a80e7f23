"""Load shedding: at most ``active`` requests are handled at once; up to ``queued`` more wait
for a slot, each at most ``wait`` seconds. A request beyond that gets 503 problem+json with
``Retry-After`` at once (or after its wait), instead of piling up on the threadpool and the
database pool until everything times out.

``/healthz`` bypasses it (liveness must not depend on load). An event stream
(``text/event-stream``) holds its slot only until its response starts: the stream itself
holds no thread and is capped on its own (``HSL_MAX_EVENT_STREAMS``).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from .errors import PROBLEM, TYPE_BASE

EXEMPT = frozenset({"/healthz"})


def _is_event_stream(start: dict[str, Any]) -> bool:
    return any(
        name == b"content-type" and value.startswith(b"text/event-stream")
        for name, value in start.get("headers", ())
    )


class LoadShedder:
    def __init__(self, app: Any, *, active: int, queued: int, wait: float):
        self.app, self.active, self.queued, self.wait = app, active, queued, wait
        self.running = 0
        self.waiting = 0
        self.shed = 0  # requests answered 503 by this middleware (for logs and tests)
        self._slots: asyncio.Semaphore | None = None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] in EXEMPT:
            await self.app(scope, receive, send)
            return
        if self._slots is None:  # created on the server's event loop
            self._slots = asyncio.Semaphore(self.active)
        slots = self._slots
        if slots.locked() or self.waiting:
            if self.waiting >= self.queued:
                await self._refuse(scope, send, "the service is at capacity")
                return
            self.waiting += 1
            try:
                await asyncio.wait_for(slots.acquire(), self.wait)
            except TimeoutError:
                await self._refuse(scope, send, f"no slot freed within {self.wait:g} s")
                return
            finally:
                self.waiting -= 1
        else:
            await slots.acquire()
        self.running += 1
        held = True

        def free() -> None:
            nonlocal held
            if held:
                held = False
                self.running -= 1
                slots.release()

        async def send_streaming(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start" and _is_event_stream(message):
                free()  # the stream waits without a thread: it no longer counts
            await send(message)

        try:
            await self.app(scope, receive, send_streaming)
        finally:
            free()

    async def _refuse(self, scope: dict[str, Any], send: Any, why: str) -> None:
        self.shed += 1
        body = json.dumps(
            {
                "type": TYPE_BASE + "overloaded",
                "title": "Service overloaded",
                "status": 503,
                "detail": f"{why} ({self.active} requests under way, {self.waiting} waiting); "
                "retry after the delay in Retry-After",
                "instance": scope["path"],
            }
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 503,
                "headers": [
                    (b"content-type", PROBLEM.encode()),
                    (b"content-length", str(len(body)).encode()),
                    (b"retry-after", b"1"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})
