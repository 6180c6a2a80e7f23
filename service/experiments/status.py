"""Status documents for many readers: a fixed number of queries per request or list page, a
document cache, and ETags.

One request for a status document (or a page of up to 200) costs: the experiment rows with
their point counts (one query), their runs grouped by status and queue (one query), the
worker rows when some experiment has queued runs (one query), and, only on a cache miss for a
live experiment, the timings of its points for the ETA (one query for the page). A document
is cached, serialised, under its *version*: (id, status, cancel flag, engine version, start
and end, points stored, runs by status, waiting), everything it is computed from, so a cached
document is never stale, and the spec is parsed once per experiment (for the ETA), not per
request.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

import hsl_engine as he
from hsl import plots

from ..db import Experiment, Point, Run, Worker, utcnow, workers
from .repository import CPU, GPU
from .schemas import StatusDocument


class LRU:
    def __init__(self, size: int):
        self.size, self.items, self.lock = size, OrderedDict(), threading.Lock()

    def get(self, key: Any) -> Any:
        with self.lock:
            value = self.items.get(key)
            if value is not None:
                self.items.move_to_end(key)
            return value

    def put(self, key: Any, value: Any) -> None:
        with self.lock:
            self.items[key] = value
            self.items.move_to_end(key)
            while len(self.items) > self.size:
                self.items.popitem(last=False)


@dataclass(frozen=True)
class Rendered:
    body: bytes  # the status document as JSON
    etag: str


_documents = LRU(4096)  # version -> Rendered
_specs = LRU(1024)  # experiment id -> parsed spec (a spec never changes)
_PLOTS = {n: tuple(plots.FORMATS) for n in plots.PLOT_NAMES}


def etag_of(body: bytes) -> str:
    return '"' + hashlib.blake2b(body, digest_size=12).hexdigest() + '"'


def matches(if_none_match: str | None, etag: str) -> bool:
    """Whether an ``If-None-Match`` header names this ETag (weak comparison, RFC 9110)."""
    if not if_none_match:
        return False
    if if_none_match.strip() == "*":
        return True
    return any(t.strip().removeprefix("W/") == etag for t in if_none_match.split(","))


def with_points_count():
    """The experiments query with each row's stored point count (a correlated count)."""
    count = (
        select(func.count())
        .select_from(Point)
        .where(Point.experiment_id == Experiment.id)
        .correlate(Experiment)
        .scalar_subquery()
    )
    return select(Experiment, count)


def _runs_of(session: Session, ids: list[str]) -> dict[str, tuple[dict[str, int], str]]:
    """Runs by status and the queue of each experiment, in one grouped query."""
    out: dict[str, tuple[dict[str, int], str]] = {i: ({}, CPU) for i in ids}
    rows = session.execute(
        select(Run.experiment_id, Run.status, Run.queue, func.count())
        .where(Run.experiment_id.in_(ids))
        .group_by(Run.experiment_id, Run.status, Run.queue)
    ).all()
    for exp_id, status, queue, n in rows:
        counts, _ = out[exp_id]
        counts[status] = counts.get(status, 0) + n
        out[exp_id] = (counts, queue or CPU)
    return out


class _WorkerView:
    """The worker rows read once for a request: which queues a live worker serves, and when a
    worker of each queue was last seen."""

    def __init__(self, session: Session):
        self.now = utcnow()
        self.rows = list(session.execute(select(Worker)).scalars())

    def waiting(self, queue: str) -> str | None:
        serving = [w for w in self.rows if workers.serves(w, queue)]
        if any(w.expires_at > self.now for w in serving):
            return None
        who = "a GPU worker" if queue == GPU else f"a worker on the {queue!r} queue"
        if not serving:
            return f"waiting for {who} (none is registered)"
        seen = max(w.last_seen for w in serving)
        return (
            f"waiting for {who} (none is alive; the last one was seen at "
            f"{seen.isoformat(timespec='seconds')})"
        )


def _spec(exp: Experiment) -> he.ExperimentSpec:
    spec = _specs.get(exp.id)
    if spec is None:
        spec = he.parse_spec(exp.spec)
        _specs.put(exp.id, spec)
    return spec


def _timings(session: Session, ids: list[str]) -> dict[str, list[SimpleNamespace]]:
    out: dict[str, list[SimpleNamespace]] = {i: [] for i in ids}
    if not ids:
        return out
    rows = session.execute(
        select(Point.experiment_id, Point.method, Point.seed, Point.n, Point.seconds).where(
            Point.experiment_id.in_(ids)
        )
    ).all()
    for exp_id, m, s, n, sec in rows:
        out[exp_id].append(SimpleNamespace(method=m, seed=s, n=n, seconds=sec))
    return out


def _document(
    exp: Experiment,
    done: int,
    counts: dict[str, int],
    queue: str,
    waiting: str | None,
    timings: list[SimpleNamespace] | None,
) -> dict[str, Any]:
    if exp.status in ("succeeded", "failed", "cancelled"):
        eta = 0.0 if exp.status == "succeeded" else None
    else:
        left = he.expected_seconds(_spec(exp), timings or [])
        # runs execute in parallel: divide by the runs under way (at least one)
        eta = None if left is None else left / max(1, counts.get("running", 0))
    base = f"/v1/experiments/{exp.id}"
    return {
        "id": exp.id,
        "name": exp.name,
        "status": exp.status,
        "spec_hash": exp.spec_hash,
        "engine_version": exp.engine_version,
        "created_at": exp.created_at,
        "started_at": exp.started_at,
        "finished_at": exp.finished_at,
        "progress": {
            "points_done": done,
            "points_total": exp.points_total,
            "fraction": done / exp.points_total if exp.points_total else 1.0,
            "eta_seconds": eta,
            "runs": counts,
        },
        "error": exp.error,
        "queue": queue,
        "waiting": waiting,
        "links": {
            "self": base,
            "results": f"{base}/results",
            "results_csv": f"{base}/results.csv",
            "plots": {n: {f: f"{base}/plots/{n}.{f}" for f in fs} for n, fs in _PLOTS.items()},
            "cancel": f"{base}/cancel",
        },
    }


def render(session: Session, rows: list[tuple[Experiment, int]]) -> list[Rendered]:
    """The status documents of these (experiment, points stored) rows, in order."""
    if not rows:
        return []
    ids = [exp.id for exp, _ in rows]
    runs = _runs_of(session, ids)
    view: _WorkerView | None = None
    versions = []
    for exp, done in rows:
        counts, queue = runs[exp.id]
        waiting = None
        live = exp.status in ("queued", "running") and not exp.cancel_requested
        if live and counts.get("queued"):
            view = view or _WorkerView(session)
            waiting = view.waiting(queue)
        key = (
            exp.id,
            exp.status,
            exp.cancel_requested,
            exp.engine_version,
            exp.started_at,
            exp.finished_at,
            done,
            tuple(sorted(counts.items())),
            queue,
            waiting,
        )
        versions.append((key, counts, queue, waiting))
    out: list[Rendered | None] = [_documents.get(v[0]) for v in versions]
    missing = [
        i
        for i, r in enumerate(out)
        if r is None and rows[i][0].status not in ("succeeded", "failed", "cancelled")
    ]
    timings = _timings(session, [rows[i][0].id for i in missing])
    for i, r in enumerate(out):
        if r is not None:
            continue
        exp, done = rows[i]
        key, counts, queue, waiting = versions[i]
        doc = _document(exp, done, counts, queue, waiting, timings.get(exp.id))
        body = StatusDocument.model_validate(doc).model_dump_json().encode()
        out[i] = Rendered(body, etag_of(body))
        _documents.put(key, out[i])
    return out  # type: ignore[return-value]


def list_body(items: list[Rendered], next_cursor: str | None) -> bytes:
    cursor = b"null" if next_cursor is None else f'"{next_cursor}"'.encode()
    return b'{"items":[' + b",".join(r.body for r in items) + b'],"next_cursor":' + cursor + b"}"
