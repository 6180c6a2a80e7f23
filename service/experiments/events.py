"""Live progress: ``GET /v1/experiments/{id}/events`` as Server-Sent Events.

Events come from the database, so any API process serves any experiment whichever worker
computes it:

- ``point``: one per stored point, in the order they were stored; ``data`` is the point as
  in the results document, ``id`` its row id (monotone per experiment);
- ``status``: the status document, whenever it changes (status, progress, ETA, waiting);
  its ``id`` is the last point's, so resuming after it replays nothing twice;
- comment lines (``: keep-alive``) every ``HSL_EVENTS_HEARTBEAT_SECONDS`` on a quiet stream,
  so proxies keep it open;
- the stream ends after the status event of a terminal status (succeeded, failed,
  cancelled), or when the experiment is deleted.

``Last-Event-ID`` (or the query parameter ``last_event_id``) resumes: the points stored
after that id, then the current status.

No stream holds a thread or a database connection while it waits. One poller per process
(`Hub`) reads the status rows of every watched experiment in one query every
``HSL_EVENTS_POLL_SECONDS`` and wakes the streams whose experiment changed; a woken stream
reads its new points in one query (in the request threads, briefly). Open streams are
capped per process (``HSL_MAX_EVENT_STREAMS``, 503 beyond) and per tenant
(``HSL_MAX_EVENT_STREAMS_PER_TENANT``, 429 beyond), both with ``Retry-After``; the load
shedder counts a stream as a request only until its response starts.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import anyio
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from hsl.document import document_point

from ..db import Experiment
from ..errors import ProblemError
from . import repository as repo
from . import status

log = logging.getLogger("hsl.events")

TERMINAL = ("succeeded", "failed", "cancelled")
MEDIA_TYPE = "text/event-stream"
RETRY_MS = 2000  # what a browser's EventSource waits before it reconnects


class TooManyStreams(ProblemError):
    status, type, title = 429, "too-many-streams", "Too many open event streams"


class StreamsExhausted(ProblemError):
    status, type, title = 503, "overloaded", "Service overloaded"


class StreamSlots:
    """Open streams per process and per tenant (the event loop is their only user)."""

    def __init__(self, total: int, per_tenant: int):
        self.total, self.per_tenant = total, per_tenant
        self.open: dict[int, int] = {}

    @property
    def count(self) -> int:
        return sum(self.open.values())

    def acquire(self, tenant_id: int) -> None:
        mine = self.open.get(tenant_id, 0)
        if mine >= self.per_tenant:
            raise TooManyStreams(
                f"this key's tenant has {mine} event streams open on this server, the limit "
                f"(HSL_MAX_EVENT_STREAMS_PER_TENANT); close one or retry later",
                headers={"Retry-After": "5"},
            )
        if self.count >= self.total:
            raise StreamsExhausted(
                f"{self.total} event streams are open on this server, the limit "
                "(HSL_MAX_EVENT_STREAMS); retry after the delay in Retry-After or poll "
                "the status document",
                headers={"Retry-After": "5"},
            )
        self.open[tenant_id] = mine + 1

    def release(self, tenant_id: int) -> None:
        left = self.open.get(tenant_id, 0) - 1
        if left > 0:
            self.open[tenant_id] = left
        else:
            self.open.pop(tenant_id, None)


@dataclass(frozen=True)
class Snapshot:
    """What the poller saw of one experiment: its stored points and its status document."""

    points_done: int
    status: str
    rendered: status.Rendered


GONE = None  # the experiment was deleted


class Watch:
    def __init__(self, experiment_id: str, first: Snapshot):
        self.experiment_id = experiment_id
        self.latest: Snapshot | None = first
        self.changed = asyncio.Event()
        self.changed.set()  # send the first snapshot at once

    def update(self, snap: Snapshot | None) -> None:
        old = self.latest
        if snap is None or old is None or snap.rendered.etag != old.rendered.etag:
            self.latest = snap
            self.changed.set()


def snapshot(session: Any, rows: list[Any]) -> dict[str, Snapshot]:
    """Snapshots of these rows of `status.versions` (documents from the version cache)."""
    rendered = status.render(session, rows)
    return {
        row.id: Snapshot(row.points_done, row.status, r)
        for row, r in zip(rows, rendered, strict=True)
    }


class Hub:
    """One poller per API process for every open stream: one query per interval whatever the
    number of streams, run in a request thread; streams wait on an asyncio event."""

    def __init__(self, read_sessions: Any, poll_seconds: float):
        self.read_sessions, self.poll_seconds = read_sessions, poll_seconds
        self.watchers: dict[str, set[Watch]] = {}
        self.task: asyncio.Task[None] | None = None
        self.polls = 0  # queries made (for tests: the cost does not grow with the streams)

    def watch(self, experiment_id: str, first: Snapshot) -> Watch:
        w = Watch(experiment_id, first)
        self.watchers.setdefault(experiment_id, set()).add(w)
        if self.task is None or self.task.done():
            self.task = asyncio.get_running_loop().create_task(self._run())
        return w

    def unwatch(self, w: Watch) -> None:
        group = self.watchers.get(w.experiment_id)
        if group is not None:
            group.discard(w)
            if not group:
                del self.watchers[w.experiment_id]

    def _poll(self, ids: list[str]) -> dict[str, Snapshot]:
        with self.read_sessions() as session:
            rows = session.execute(status.versions().where(Experiment.id.in_(ids))).all()
            return snapshot(session, rows)

    async def _run(self) -> None:
        while self.watchers:
            await asyncio.sleep(self.poll_seconds)
            ids = list(self.watchers)
            if not ids:
                break
            try:
                snaps = await run_in_threadpool(self._poll, ids)
                self.polls += 1
            except Exception as exc:  # the database is down: streams stay open, try again
                log.warning("event poller: %s", exc)
                continue
            for exp_id in ids:
                for w in list(self.watchers.get(exp_id, ())):
                    w.update(snaps.get(exp_id, GONE))


def _event(name: str, data: bytes | str, event_id: int | None) -> bytes:
    text = data.decode() if isinstance(data, bytes) else data
    head = f"event: {name}\n" + (f"id: {event_id}\n" if event_id is not None else "")
    # a JSON document has no raw newlines, but split anyway: each line its own data field
    return (head + "".join(f"data: {line}\n" for line in text.split("\n")) + "\n").encode()


def parse_last_event_id(value: str | None) -> int:
    """A resume position: the row id of the last point received (0: from the start). Ids
    this service never sent (not a non-negative integer) start from the beginning, as a
    missing one does."""
    if value is None:
        return 0
    value = value.strip()
    return int(value) if value.isdigit() and len(value) < 19 else 0


async def events(
    hub: Hub,
    experiment_id: str,
    first: Snapshot,
    after: int,
    heartbeat: float,
) -> AsyncIterator[bytes]:
    """The stream of one experiment from point row id ``after`` on."""
    watch = hub.watch(experiment_id, first)
    try:
        yield f"retry: {RETRY_MS}\n\n".encode()
        sent_etag = None
        points_seen = -1
        while True:
            try:
                await asyncio.wait_for(watch.changed.wait(), heartbeat)
            except TimeoutError:
                yield b": keep-alive\n\n"
                continue
            watch.changed.clear()
            snap = watch.latest
            if snap is GONE:
                return
            if snap.points_done != points_seen:
                while True:
                    batch = await run_in_threadpool(_points_after, hub, experiment_id, after)
                    for row_id, point in batch:
                        yield _event("point", json.dumps(document_point(point)), row_id)
                        after = row_id
                    if len(batch) < 500:
                        break
                points_seen = snap.points_done
            if snap.rendered.etag != sent_etag:
                yield _event("status", snap.rendered.body, after)
                sent_etag = snap.rendered.etag
            if snap.status in TERMINAL:
                return
    finally:
        hub.unwatch(watch)


def _points_after(hub: Hub, experiment_id: str, after: int):
    with hub.read_sessions() as session:
        return repo.points_after(session, experiment_id, after, limit=500)


class EventStreamResponse(Response):
    """A ``text/event-stream`` response that stops its generator as soon as the client goes
    away (it listens for ``http.disconnect`` whatever the server's ASGI version), so a closed
    connection frees its stream slot at once, not at the next write. ``on_close`` runs once
    when it ends, however it ends (it releases the slot)."""

    media_type = MEDIA_TYPE

    def __init__(self, content: AsyncIterator[bytes], on_close: Any = None):
        self.body_iterator = content
        self.on_close = on_close
        self.status_code = 200
        self.background = None
        self.init_headers(
            {
                "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no",  # nginx: do not buffer the stream
            }
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def stream() -> None:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            async for chunk in self.body_iterator:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        async def disconnect() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass

        try:
            async with anyio.create_task_group() as tg:

                async def run(func: Any) -> None:
                    try:
                        await func()
                    except OSError:  # the client went away mid-write
                        pass
                    tg.cancel_scope.cancel()

                tg.start_soon(run, stream)
                await run(disconnect)
        finally:
            try:
                close = getattr(self.body_iterator, "aclose", None)
                if close is not None:
                    await close()
            finally:
                if self.on_close is not None:
                    self.on_close()
