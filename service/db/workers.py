"""The worker registry: workers announce themselves, renew a heartbeat, and say goodbye.

A row per worker process (`Worker`). The API reads the live rows to route ``device: auto``
specs, to size GPU specs against the workers' memory, and to say in a status document that
a queued experiment has no worker for its queue. A worker killed without a goodbye stops
renewing ``expires_at`` and drops out of the live set by itself; its row is pruned later.

Like `state`, every function takes a session and never commits.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from .models import Worker
from .session import utcnow

GPU_QUEUE = "gpu"
# rows of workers gone this long are deleted (kept a while to say when one was last seen)
PRUNE_AFTER = timedelta(days=1)


@dataclass(frozen=True)
class Devices:
    """What a worker's machine offers (from the engine: cuda_devices, cuda_memory_bytes)."""

    torch: bool
    cuda_devices: int
    cuda_memory_bytes: int | None  # the smallest device's, None without CUDA


def register(
    session: Session,
    *,
    worker_id: str,
    hostname: str,
    pid: int,
    kind: str,
    queues: list[str],
    engine_version: str,
    ttl_seconds: float,
    devices: Devices | None = None,
) -> None:
    """Insert (or refresh) this worker's row, alive for ``ttl_seconds``."""
    now = utcnow()
    row = session.get(Worker, worker_id)
    if row is None:
        row = Worker(id=worker_id, started_at=now)
        session.add(row)
    row.hostname, row.pid, row.kind = hostname, pid, kind
    row.queues, row.engine_version = list(queues), engine_version
    row.last_seen, row.expires_at = now, now + timedelta(seconds=ttl_seconds)
    if devices is not None:
        row.torch = devices.torch
        row.cuda_devices = devices.cuda_devices
        row.cuda_memory_bytes = devices.cuda_memory_bytes


def heartbeat(session: Session, worker_id: str, *, ttl_seconds: float) -> bool:
    """Renew the row; False when it is gone (pruned, or the database was replaced)."""
    now = utcnow()
    result = session.execute(
        update(Worker)
        .where(Worker.id == worker_id)
        .values(last_seen=now, expires_at=now + timedelta(seconds=ttl_seconds))
    )
    return result.rowcount == 1


def unregister(session: Session, worker_id: str) -> None:
    session.execute(delete(Worker).where(Worker.id == worker_id))


def prune(session: Session, *, now: datetime | None = None) -> int:
    """Delete the rows of workers gone for more than `PRUNE_AFTER`; returns how many."""
    cutoff = (now or utcnow()) - PRUNE_AFTER
    return session.execute(delete(Worker).where(Worker.expires_at < cutoff)).rowcount


def live(session: Session, *, now: datetime | None = None) -> list[Worker]:
    return list(
        session.execute(
            select(Worker).where(Worker.expires_at > (now or utcnow())).order_by(Worker.id)
        ).scalars()
    )


def is_gpu_worker(worker: Worker) -> bool:
    return GPU_QUEUE in (worker.queues or []) and (worker.cuda_devices or 0) > 0


def serves(worker: Worker, queue: str) -> bool:
    """Whether the worker executes runs of ``queue`` (a gpu-queue run needs a GPU)."""
    if queue == GPU_QUEUE:
        return is_gpu_worker(worker)
    return queue in (worker.queues or [])


def live_gpu_workers(session: Session) -> list[Worker]:
    return [w for w in live(session) if is_gpu_worker(w)]


def last_seen(session: Session, queue: str) -> datetime | None:
    """When a worker of ``queue`` last renewed its row (live or not); None if none ever did
    (or its row was pruned)."""
    rows = session.execute(select(Worker)).scalars()
    seen = [w.last_seen for w in rows if serves(w, queue)]
    return max(seen) if seen else None
