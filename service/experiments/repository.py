"""Queries and writes of the experiments resource. Never commits: the route does, once."""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import and_, delete, func, or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

import hsl_engine as he
from hsl.document import PROVENANCE_FIELDS, point_from_dict

from .. import labels
from ..config import DEFAULT_GPU_MEMORY_BYTES, DEFAULT_GPU_ROUTE_FLOPS
from ..db import Experiment, Point, Run, state, utcnow, workers
from ..errors import BadRequest, Conflict, NotFound

CPU, GPU = "cpu", workers.GPU_QUEUE
# experiment ids are uuid4().hex; anything else is unknown without asking the database (a NUL
# in a path or cursor would otherwise reach PostgreSQL, which refuses it)
_ID = re.compile(r"[0-9a-f]{32}")


def is_experiment_id(value: str) -> bool:
    """Whether ``value`` has the form of an experiment id (anything else is unknown without
    asking the database: a NUL would reach PostgreSQL as an error, not a miss)."""
    return _ID.fullmatch(value) is not None


def queue_for(
    spec: he.ExperimentSpec,
    estimate: he.ResourceEstimate | None = None,
    *,
    gpu_route_flops: float = DEFAULT_GPU_ROUTE_FLOPS,
    gpu_workers: int = 0,
    gpu_memory_bytes: float = math.inf,
) -> str:
    """The queue of a spec's runs.

    ``cuda`` and ``cuda:N`` go to ``gpu`` (they wait there for a GPU worker), ``cpu`` to
    ``cpu``. ``auto`` goes to ``gpu`` only when it pays and can run there: a GPU worker is
    alive (``gpu_workers`` > 0), the estimated work reaches ``gpu_route_flops``, its estimated
    peak fits in ``gpu_memory_bytes``, and the spec does not ask for NumPy (CPU only);
    otherwise, or without an ``estimate``, to ``cpu``.
    """
    if spec.device.startswith("cuda"):
        return GPU
    if spec.device == "cpu" or spec.solver.backend == "numpy" or estimate is None:
        return CPU
    if (
        gpu_workers > 0
        and estimate.flops >= gpu_route_flops
        and estimate.peak_bytes <= gpu_memory_bytes
    ):
        return GPU
    return CPU


def may_route_to_gpu(
    spec: he.ExperimentSpec, estimate: he.ResourceEstimate, route_flops: float
) -> bool:
    """Whether the placement depends on the GPU workers (saves the lookup otherwise)."""
    if spec.device.startswith("cuda"):
        return True
    return (
        spec.device == "auto" and spec.solver.backend != "numpy" and estimate.flops >= route_flops
    )


@dataclass(frozen=True)
class GpuCapacity:
    """The live GPU workers and the memory a gpu-queue run may use, with where it came from."""

    workers: int
    memory_bytes: float
    source: str


def gpu_capacity(session: Session, configured_bytes: float | None) -> GpuCapacity:
    """``HSL_GPU_MEMORY_BYTES`` when set, else the smallest GPU among the live GPU workers
    (those that have reported it), else `DEFAULT_GPU_MEMORY_BYTES`."""
    live = workers.live_gpu_workers(session)
    if configured_bytes is not None:
        return GpuCapacity(len(live), configured_bytes, "HSL_GPU_MEMORY_BYTES")
    reported = [w.cuda_memory_bytes for w in live if w.cuda_memory_bytes]
    if reported:
        return GpuCapacity(
            len(live),
            float(min(reported)),
            f"the smallest GPU of the {len(live)} live GPU worker(s); HSL_GPU_MEMORY_BYTES "
            "overrides it",
        )
    return GpuCapacity(
        len(live),
        DEFAULT_GPU_MEMORY_BYTES,
        "the default of HSL_GPU_MEMORY_BYTES: no live GPU worker reports its memory",
    )


def find_live(
    session: Session, tenant_id: int, spec_hash: str, engine_version: str
) -> Experiment | None:
    """The tenant's live experiment of this spec under this engine version: another
    version may compute other numbers, so it does not answer for this one."""
    return session.execute(
        select(Experiment).where(
            Experiment.tenant_id == tenant_id,
            Experiment.dedupe_key == spec_hash,
            Experiment.engine_version == engine_version,
        )
    ).scalar_one_or_none()


def find_by_idempotency_key(session: Session, tenant_id: int, key: str) -> Experiment | None:
    return session.execute(
        select(Experiment).where(
            Experiment.tenant_id == tenant_id, Experiment.idempotency_key == key
        )
    ).scalar_one_or_none()


def create(
    session: Session,
    tenant_id: int,
    spec: he.ExperimentSpec,
    *,
    idempotency_key: str | None,
    admit: Callable[[], None] | None = None,
    queue: str | None = None,
    tags: list[str] | None = None,
    notes: str | None = None,
    standalone: bool = True,
) -> tuple[Experiment, bool]:
    """Store an experiment and its runs; or return the tenant's existing one.

    Returns ``(experiment, created)``. The same ``Idempotency-Key`` returns the experiment
    it created (a different spec under the same key is a conflict), whatever engine
    computed it; the same spec while the earlier one is live (not failed or cancelled) and
    was accepted under this engine version returns that one. ``admit`` runs only when a new
    experiment is about to be stored (it may refuse it by raising). ``queue``: where its runs
    go (default `queue_for` without an estimate: ``cuda`` to gpu, everything else to cpu).
    ``tags``, ``notes``: the new experiment's labels; ``standalone``: submitted on its own
    (False for one created only as a study's member).
    """
    engine_version = he.ENGINE_VERSION
    if idempotency_key is not None:
        earlier = find_by_idempotency_key(session, tenant_id, idempotency_key)
        if earlier is not None:
            if earlier.spec_hash != spec.spec_hash:
                raise Conflict(
                    "this Idempotency-Key was used with a different spec",
                    errors=[{"field": "Idempotency-Key", "message": "reused with another spec"}],
                )
            return earlier, False
    live = find_live(session, tenant_id, spec.spec_hash, engine_version)
    if live is not None:
        return live, False
    if admit is not None:
        admit()
    exp = Experiment(
        id=uuid.uuid4().hex,
        tenant_id=tenant_id,
        name=spec.name,
        spec=spec.model_dump(mode="json"),
        spec_hash=spec.spec_hash,
        dedupe_key=spec.spec_hash,
        engine_version=engine_version,
        idempotency_key=idempotency_key,
        status="queued",
        cancel_requested=False,
        points_total=he.points_total(spec),
        created_at=utcnow(),
        tags=list(tags or []),
        notes=notes,
        standalone=standalone,
    )
    queue = queue or queue_for(spec)
    exp.runs = [
        Run(method=m, seed=s, queue=queue, status="queued", attempts=0) for m, s in he.runs(spec)
    ]
    try:
        with session.begin_nested():
            session.add(exp)
            session.flush()
    except IntegrityError:
        # a concurrent submission of the same spec or key won the race: return its row, or
        # the conflict when the winner stored another spec under this key
        if idempotency_key is not None:
            earlier = find_by_idempotency_key(session, tenant_id, idempotency_key)
            if earlier is not None:
                if earlier.spec_hash != spec.spec_hash:
                    raise Conflict(
                        "this Idempotency-Key was used with a different spec",
                        errors=[
                            {"field": "Idempotency-Key", "message": "reused with another spec"}
                        ],
                    ) from None
                return earlier, False
        live = find_live(session, tenant_id, spec.spec_hash, engine_version)
        if live is not None:
            return live, False
        raise
    return exp, True


def get(session: Session, tenant_id: int, experiment_id: str) -> Experiment:
    """The tenant's experiment; another tenant's id answers exactly like an unknown one."""
    exp = None
    if _ID.fullmatch(experiment_id):
        exp = session.execute(
            select(Experiment).where(
                Experiment.id == experiment_id, Experiment.tenant_id == tenant_id
            )
        ).scalar_one_or_none()
    if exp is None:
        raise NotFound(f"no experiment with id {experiment_id!r}")
    return exp


def _encode_cursor(exp: Any) -> str:
    """From anything with ``created_at`` and ``id`` (an experiment or a row)."""
    raw = json.dumps([exp.created_at.isoformat(), exp.id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        created, exp_id = json.loads(raw)
        created = datetime.fromisoformat(created)
        if created.tzinfo is None:  # ours carry UTC; a naive one fails in the UTC column
            raise ValueError("naive timestamp")
        # ours are UTC; a forged offset may push the instant out of datetime's range
        # (9999-12-31T23:59:59-14:00, 0001-01-01T00:00:00+14:00): OverflowError
        created = created.astimezone(UTC)
        if not isinstance(exp_id, str) or not _ID.fullmatch(exp_id):
            raise ValueError("not an experiment id")
        return created, exp_id
    except (binascii.Error, ValueError, TypeError, UnicodeDecodeError, OverflowError):
        raise BadRequest(
            "cursor is not one this service issued",
            errors=[{"field": "cursor", "message": "invalid cursor; use next_cursor as given"}],
        ) from None


def list_page(
    session: Session,
    tenant_id: int,
    *,
    status: str | None,
    name: str | None,
    limit: int,
    cursor: str | None,
    query: Any = None,
    tag: str | None = None,
) -> tuple[list[Any], str | None]:
    """Newest first; keyset pagination on (created_at, id). ``query``: what to select
    (default the experiments; rows then are experiments), e.g. experiments with a count.
    ``tag``: only experiments carrying this tag."""
    q = (select(Experiment) if query is None else query).where(Experiment.tenant_id == tenant_id)
    if status is not None:
        q = q.where(Experiment.status == status)
    if name is not None:
        q = q.where(Experiment.name == name)
    if tag is not None:
        q = q.where(labels.has_tag(Experiment.tags, tag, session.get_bind().dialect.name))
    if cursor is not None:
        created, exp_id = _decode_cursor(cursor)
        q = q.where(
            or_(
                Experiment.created_at < created,
                and_(Experiment.created_at == created, Experiment.id < exp_id),
            )
        )
    result = session.execute(
        q.order_by(Experiment.created_at.desc(), Experiment.id.desc()).limit(limit + 1)
    )
    rows = list(result.scalars() if query is None else result.all())
    more = len(rows) > limit
    rows = rows[:limit]
    return rows, (_encode_cursor(rows[-1]) if more and rows else None)


def points(session: Session, experiment_id: str) -> list[he.Point]:
    """The stored points: provenance from its own columns, everything else from the JSON."""
    rows = session.execute(
        select(Point.data, *(getattr(Point, name) for name in PROVENANCE_FIELDS))
        .where(Point.experiment_id == experiment_id)
        .order_by(Point.id)
    ).all()
    out = []
    for data, *provenance in rows:
        merged = dict(data)
        for name, value in zip(PROVENANCE_FIELDS, provenance, strict=True):
            merged[name] = value if value is not None else data.get(name)
        out.append(point_from_dict(merged))
    return out


def points_after(
    session: Session, experiment_id: str, after_id: int, limit: int = 500
) -> list[tuple[int, he.Point]]:
    """The experiment's points stored with a row id above ``after_id``, in row id order (the
    order they were stored), at most ``limit``: what an event stream has not sent yet."""
    rows = session.execute(
        select(Point.id, Point.data, *(getattr(Point, name) for name in PROVENANCE_FIELDS))
        .where(Point.experiment_id == experiment_id, Point.id > after_id)
        .order_by(Point.id)
        .limit(limit)
    ).all()
    out = []
    for row_id, data, *provenance in rows:
        merged = dict(data)
        for name, value in zip(PROVENANCE_FIELDS, provenance, strict=True):
            merged[name] = value if value is not None else data.get(name)
        out.append((row_id, point_from_dict(merged)))
    return out


def points_count(session: Session, experiment_id: str) -> int:
    return session.execute(
        select(func.count()).select_from(Point).where(Point.experiment_id == experiment_id)
    ).scalar_one()


def cancel(session: Session, exp: Experiment) -> None:
    state.request_cancel(session, exp.id)


def set_labels(session: Session, row: Any, changes: dict[str, Any]) -> None:
    """Apply a validated ``{tags?, notes?}`` to an experiment or a study row."""
    if "tags" in changes:
        row.tags = list(changes["tags"])
    if "notes" in changes:
        row.notes = changes["notes"]
    session.flush()


def remove(session: Session, exp: Experiment) -> None:
    """Cancel, then delete the experiment with its runs and points (a running run notices
    at its next point and stops)."""
    state.request_cancel(session, exp.id)
    session.execute(delete(Point).where(Point.experiment_id == exp.id))
    session.execute(delete(Run).where(Run.experiment_id == exp.id))
    session.execute(delete(Experiment).where(Experiment.id == exp.id))
