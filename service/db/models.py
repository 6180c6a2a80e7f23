"""SQLAlchemy 2.0 models: tenants, API keys, experiments, runs (units of work), points and
the registered workers.

An experiment is split into runs, one per (method, seed); a run stores one point per n.
The database is the source of truth for every state; the broker only carries run ids.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

EXPERIMENT_STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")
TERMINAL = frozenset({"succeeded", "failed", "cancelled"})


class UTCDateTime(TypeDecorator[datetime]):
    """Stored as naive UTC on every database, returned timezone-aware.

    SQLite has no time zones; storing naive UTC everywhere keeps comparisons in SQL
    (lease expiry) identical on SQLite and PostgreSQL.
    """

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        return None if value is None else value.replace(tzinfo=UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Tenant(Base):
    __tablename__ = "tenants"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())


class ApiKey(Base):
    """A key is shown once; only its SHA-256 is stored (keys are 256-bit random)."""

    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    prefix: Mapped[str] = mapped_column(String(16))
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)


class Experiment(Base):
    __tablename__ = "experiments"
    __table_args__ = (
        # the same spec from the same tenant under the same engine version is one experiment
        # while it is live; dedupe_key is cleared when it fails or is cancelled, so it can be
        # submitted again, and a new engine version computes it afresh
        UniqueConstraint("tenant_id", "dedupe_key", "engine_version"),
        UniqueConstraint("tenant_id", "idempotency_key"),
        Index("ix_experiments_tenant_created", "tenant_id", "created_at", "id"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(200))
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    spec_hash: Mapped[str] = mapped_column(String(80))
    dedupe_key: Mapped[str | None] = mapped_column(String(80), nullable=True)
    # the engine version of the API process that accepted the spec
    engine_version: Mapped[str] = mapped_column(String(40))
    idempotency_key: Mapped[str | None] = mapped_column(String(200), nullable=True)
    status: Mapped[str] = mapped_column(String(16), default="queued")
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    points_total: Mapped[int] = mapped_column(Integer)
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    # labels of the researcher's: not part of the spec, so not of its hash; editable (PATCH)
    tags: Mapped[list[str]] = mapped_column(JSON, default=list)
    notes: Mapped[str | None] = mapped_column(Text, nullable=True)
    # submitted through POST /v1/experiments (not only created as a study's member): deleting
    # a study never deletes such an experiment
    standalone: Mapped[bool] = mapped_column(Boolean, default=True)
    # the exact finite-size theory of the spec (hsl.document.exact_theory: seconds of work,
    # independent of the points), computed once by the worker that starts the experiment's
    # first run and read by every results document; null until then. Deferred: only the
    # results path loads it (tens of kB for a large d1)
    theory: Mapped[dict[str, Any] | None] = mapped_column(
        JSON(none_as_null=True), nullable=True, deferred=True
    )

    runs: Mapped[list[Run]] = relationship(
        back_populates="experiment", cascade="all, delete-orphan", passive_deletes=True
    )


class Study(Base):
    """A grid of experiments: a base spec and axes over its fields (the grid product). Its
    status and progress follow from its members'; its members are experiments, shared with
    other studies or submitted on their own when their spec is the same (deduplicated by
    spec hash)."""

    __tablename__ = "studies"
    __table_args__ = (
        UniqueConstraint("tenant_id", "idempotency_key"),
        Index("ix_studies_tenant_created", "tenant_id", "created_at", "id"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(200))
    base: Mapped[dict[str, Any]] = mapped_column(JSON)  # the base spec, defaults filled in
    axes: Mapped[dict[str, Any]] = mapped_column(JSON)  # dotted path -> list of values
    study_hash: Mapped[str] = mapped_column(String(80))  # of (base, axes): Idempotency-Key
    idempotency_key: Mapped[str | None] = mapped_column(String(200), nullable=True)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    tags: Mapped[list[str]] = mapped_column(JSON, default=list)
    notes: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())

    members: Mapped[list[StudyMember]] = relationship(
        back_populates="study",
        cascade="all, delete-orphan",
        passive_deletes=True,
        order_by="StudyMember.position",
    )


class StudyMember(Base):
    """One point of a study's grid: its parameters and the experiment that computes it
    (null once that experiment was deleted on its own)."""

    __tablename__ = "study_members"

    study_id: Mapped[str] = mapped_column(
        ForeignKey("studies.id", ondelete="CASCADE"), primary_key=True
    )
    position: Mapped[int] = mapped_column(Integer, primary_key=True)
    experiment_id: Mapped[str | None] = mapped_column(
        ForeignKey("experiments.id", ondelete="SET NULL"), nullable=True, index=True
    )
    params: Mapped[dict[str, Any]] = mapped_column(JSON)  # dotted path -> value

    study: Mapped[Study] = relationship(back_populates="members")


class Run(Base):
    """One (method, seed) of an experiment, sweeping n upward: what a worker executes."""

    __tablename__ = "runs"
    __table_args__ = (
        UniqueConstraint("experiment_id", "method", "seed"),
        Index("ix_runs_status_lease", "status", "lease_expires_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    experiment_id: Mapped[str] = mapped_column(
        ForeignKey("experiments.id", ondelete="CASCADE"), index=True
    )
    method: Mapped[str] = mapped_column(String(40))
    seed: Mapped[int] = mapped_column(Integer)
    queue: Mapped[str] = mapped_column(String(40), default="cpu")
    status: Mapped[str] = mapped_column(String(16), default="queued")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    lease_owner: Mapped[str | None] = mapped_column(String(200), nullable=True)
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    published_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)

    experiment: Mapped[Experiment] = relationship(back_populates="runs")


class Point(Base):
    """One measured n of a run, stored in its own transaction; unique on (run, n).

    ``engine_version``, ``device`` and ``backend`` record what computed it (also in ``data``);
    they are null for points stored before the engine recorded them.
    """

    __tablename__ = "points"
    __table_args__ = (UniqueConstraint("run_id", "n"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    experiment_id: Mapped[str] = mapped_column(
        ForeignKey("experiments.id", ondelete="CASCADE"), index=True
    )
    method: Mapped[str] = mapped_column(String(40))
    seed: Mapped[int] = mapped_column(Integer)
    n: Mapped[int] = mapped_column(Integer)
    seconds: Mapped[float] = mapped_column(Float)
    data: Mapped[dict[str, Any]] = mapped_column(JSON)
    engine_version: Mapped[str | None] = mapped_column(String(40), nullable=True)
    device: Mapped[str | None] = mapped_column(String(40), nullable=True)
    backend: Mapped[str | None] = mapped_column(String(40), nullable=True)
    attempt: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())


class Worker(Base):
    """A worker process that serves queues: registered when it starts, its ``last_seen`` and
    ``expires_at`` renewed by a heartbeat, removed when it stops. Alive while ``expires_at``
    is in the future (a killed worker simply stops renewing it).

    The API routes work and refuses oversized GPU specs by what the live rows report: a GPU
    worker serves the ``gpu`` queue and has ``cuda_devices`` > 0. ``cuda_devices``,
    ``cuda_memory_bytes`` (the smallest of its devices) and ``torch`` are null until the
    worker has probed its machine.
    """

    __tablename__ = "workers"

    id: Mapped[str] = mapped_column(String(200), primary_key=True)  # host:pid:nonce
    hostname: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int] = mapped_column(Integer)
    kind: Mapped[str] = mapped_column(String(16))  # celery | embedded
    queues: Mapped[list[str]] = mapped_column(JSON)
    engine_version: Mapped[str] = mapped_column(String(40))
    torch: Mapped[bool | None] = mapped_column(Boolean, nullable=True)
    cuda_devices: Mapped[int | None] = mapped_column(Integer, nullable=True)
    cuda_memory_bytes: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime())
    last_seen: Mapped[datetime] = mapped_column(UTCDateTime())
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime(), index=True)
