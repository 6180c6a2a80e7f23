"""Status documents for many readers: a fixed number of queries per request or list page, a
document cache, and ETags.

One request for a status document (or a page of up to 200) costs one query: the experiment
rows with their point counts, runs by status, queue and the workers serving each queue as
subqueries (the key check joined to it for one document); only on a cache miss, the
experiments' full rows and the timings of live ones' points, for the ETA (two more). A document
is cached, serialised, under its *version*: (id, status, cancel flag, engine version, start
and end, points stored, runs by status, waiting), everything it is computed from, so a cached
document is never stale, and the spec is parsed once per experiment (for the ETA), not per
request.
"""

from __future__ import annotations

import functools
import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

from sqlalchemy import String, and_, bindparam, cast, func, select
from sqlalchemy.orm import Session

import hsl_engine as he
from hsl import plots

from ..db import ApiKey, Experiment, Point, Run, Worker, state, utcnow
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


RUN_STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")


@functools.cache
def versions():
    """The experiments query for status documents: the columns a document's version is made
    of, the stored point count, the runs by status and their queue, each as a correlated
    subquery on an index (one round trip for one experiment or a page; no JSON decoded).
    Built once (a select is immutable: ``.where`` returns a new one)."""

    def runs(status: str):
        return (
            select(func.count())
            .select_from(Run)
            .where(Run.experiment_id == Experiment.id, Run.status == status)
            .correlate(Experiment)
            .scalar_subquery()
            .label(f"runs_{status}")
        )

    points = (
        select(func.count())
        .select_from(Point)
        .where(Point.experiment_id == Experiment.id)
        .correlate(Experiment)
        .scalar_subquery()
        .label("points_done")
    )
    queue = (
        select(Run.queue)
        .where(Run.experiment_id == Experiment.id)
        .limit(1)
        .correlate(Experiment)
        .scalar_subquery()
        .label("queue")
    )

    def workers_of(queue: str, column: Any, label: str):
        serving = cast(Worker.queues, String).like(f'%"{queue}"%')
        if queue == GPU:  # a gpu-queue run needs a GPU (`workers.serves`)
            serving = and_(serving, Worker.cuda_devices > 0)
        return select(func.max(column)).where(serving).scalar_subquery().label(label)

    return select(
        Experiment.id,
        Experiment.created_at,
        Experiment.status,
        Experiment.cancel_requested,
        Experiment.engine_version,
        Experiment.started_at,
        Experiment.finished_at,
        Experiment.tags,
        Experiment.notes,
        points,
        queue,
        *(runs(st) for st in RUN_STATUSES),
        # the workers serving each queue: alive while one's expires_at is ahead, and when
        # one was last seen (uncorrelated: computed once per statement)
        workers_of(CPU, Worker.expires_at, "cpu_expires"),
        workers_of(CPU, Worker.last_seen, "cpu_seen"),
        workers_of(GPU, Worker.expires_at, "gpu_expires"),
        workers_of(GPU, Worker.last_seen, "gpu_seen"),
    )


_statements: dict[str, Any] = {}


def statement(name: str) -> Any:
    """The status queries, built once per process (building one costs more than running it):
    ``by_key`` (params ``id``, ``key_hash``: the experiment if this live key's tenant owns
    it) and ``by_tenant`` (params ``id``, ``tenant_id``)."""
    stmt = _statements.get(name)
    if stmt is None:
        base = versions().where(Experiment.id == bindparam("id"))
        if name == "by_key":
            stmt = base.join(ApiKey, ApiKey.tenant_id == Experiment.tenant_id).where(
                ApiKey.key_hash == bindparam("key_hash"), ApiKey.revoked_at.is_(None)
            )
        else:
            stmt = base.where(Experiment.tenant_id == bindparam("tenant_id"))
        _statements[name] = stmt
    return stmt


def version_of(row: Any, waiting: str | None) -> tuple[Any, ...]:
    return (
        row.id,
        row.status,
        row.cancel_requested,
        row.engine_version,
        row.started_at,
        row.finished_at,
        row.points_done,
        row.queue,
        *(getattr(row, f"runs_{st}") for st in RUN_STATUSES),
        tuple(row.tags or ()),
        row.notes,
        waiting,
    )


def _counts(row: Any) -> dict[str, int]:
    return {st: n for st in RUN_STATUSES if (n := getattr(row, f"runs_{st}"))}


def waiting(row: Any, now: Any) -> str | None:
    """Why the queued runs of this row's experiment are not starting: no live worker serves
    their queue (`repository.queue_for` puts runs on ``cpu`` or ``gpu``)."""
    queue = row.queue or CPU
    prefix = "gpu" if queue == GPU else "cpu"
    expires, seen = getattr(row, f"{prefix}_expires"), getattr(row, f"{prefix}_seen")
    if expires is not None and expires > now:
        return None
    who = "a GPU worker" if queue == GPU else f"a worker on the {queue!r} queue"
    if seen is None:
        return f"waiting for {who} (none is registered)"
    return (
        f"waiting for {who} (none is alive; the last one was seen at "
        f"{seen.isoformat(timespec='seconds')})"
    )


def _spec(exp: Experiment) -> he.ExperimentSpec:
    spec = _specs.get(exp.id)
    if spec is None:
        spec = state.stored_spec(exp.spec)
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
        "tags": list(exp.tags or []),
        "notes": exp.notes,
        "links": {
            "self": base,
            "results": f"{base}/results",
            "results_csv": f"{base}/results.csv",
            "plots": {n: {f: f"{base}/plots/{n}.{f}" for f in fs} for n, fs in _PLOTS.items()},
            "cancel": f"{base}/cancel",
        },
    }


def render(session: Session, rows: list[Any]) -> list[Rendered]:
    """The status documents of these rows of `versions`, in order: from the cache when their
    version was rendered before, else from the experiments (read in one query, the timings
    of live ones in another)."""
    if not rows:
        return []
    now = utcnow()
    keys = []
    for row in rows:
        live = row.status in ("queued", "running") and not row.cancel_requested
        keys.append(version_of(row, waiting(row, now) if live and row.runs_queued else None))
    out: list[Rendered | None] = [_documents.get(k) for k in keys]
    missing = [i for i, r in enumerate(out) if r is None]
    if missing:
        ids = [rows[i].id for i in missing]
        exps = {
            e.id: e
            for e in session.execute(select(Experiment).where(Experiment.id.in_(ids))).scalars()
        }
        live_ids = [i for i in ids if exps[i].status not in ("succeeded", "failed", "cancelled")]
        timings = _timings(session, live_ids)
        for i in missing:
            row, key = rows[i], keys[i]
            exp = exps[row.id]
            doc = _document(
                exp, row.points_done, _counts(row), row.queue or CPU, key[-1], timings.get(exp.id)
            )
            body = StatusDocument.model_validate(doc).model_dump_json().encode()
            out[i] = Rendered(body, etag_of(body))
            _documents.put(key, out[i])
    return out  # type: ignore[return-value]


def list_body(items: list[Rendered], next_cursor: str | None) -> bytes:
    cursor = b"null" if next_cursor is None else f'"{next_cursor}"'.encode()
    return b'{"items":[' + b",".join(r.body for r in items) + b'],"next_cursor":' + cursor + b"}"
