"""Settings: one pydantic-settings class; every field is an ``HSL_*`` environment variable.

FastAPI-free, so the worker, the reaper and the command line share it.
"""

from __future__ import annotations

import ipaddress
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

EMBEDDED_DATABASE_URL = "sqlite:///./.hsl/hsl.db"
# the GPU memory a gpu-queue run may use when neither HSL_GPU_MEMORY_BYTES nor a live GPU
# worker says (an 80 GB data-centre GPU)
DEFAULT_GPU_MEMORY_BYTES = 80 * 2.0**30
# a device 'auto' spec goes to the gpu queue from this much estimated work on (fig2-d120-cpu,
# 1.4e14 flops, takes 27 minutes on 2 cores)
DEFAULT_GPU_ROUTE_FLOPS = 1e14
# a worker is alive while its last heartbeat is younger than this many leases
WORKER_TTL_LEASES = 3.0


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="HSL_", extra="ignore")

    database_url: str = Field(
        EMBEDDED_DATABASE_URL,
        description="SQLAlchemy URL: sqlite:///PATH or postgresql+psycopg://USER@HOST/DB",
    )
    broker_url: SecretStr | None = Field(
        None,
        description="Celery broker (redis://HOST:PORT/DB). Unset: the in-process worker runs runs.",
    )
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    allowed_hosts: str | None = Field(
        None,
        description="Comma-separated host names (or IP addresses) the API answers in the Host "
        "header besides the bound address, localhost, 127.0.0.1 and [::1]; '*' turns the check "
        "off. Default: checked only where no API key is required (the keyless loopback "
        "service, against DNS rebinding); setting it turns the check on everywhere.",
    )
    require_keys: bool | None = Field(
        None,
        description="Require API keys. Default: yes, except the embedded service on loopback.",
    )
    auto_migrate: bool | None = Field(
        None, description="Migrate the database at start. Default: only the embedded service."
    )
    api_key: SecretStr | None = Field(None, description="The client's key (hsl submit/status/...)")
    url: str = Field("http://127.0.0.1:8000", description="The service the client talks to")

    # durability (docs/reliability.md)
    lease_seconds: float = Field(30.0, gt=0, description="A run's lease; heartbeats renew it")
    reaper_interval: float = Field(5.0, gt=0, description="Seconds between reaper sweeps")
    republish_after: float = Field(
        3600.0,
        gt=0,
        description="Publish a queued run nobody claimed again after this many seconds (a "
        "backstop: a broker restart is detected and republishes at once)",
    )
    max_attempts: int = Field(3, ge=1, le=100, description="Claims of one run before it fails")
    run_time_limit: float = Field(
        6 * 3600.0, gt=0, description="Hard time limit of one run (seconds)"
    )

    visibility_timeout_seconds: float | None = Field(
        None, gt=0, description="Redis visibility timeout. Default: run time limit + 600 s"
    )
    memory_limit_bytes: int | None = Field(
        None, ge=1 << 28, description="Address-space limit (RLIMIT_AS) of a worker process"
    )

    # per tenant (429 with Retry-After beyond them)
    submit_rate: float = Field(5.0, gt=0, description="Sustained submissions per second")
    submit_burst: int = Field(20, ge=1, description="Submissions allowed in a burst")
    max_active_experiments: int = Field(
        100, ge=1, description="Queued and running experiments per tenant"
    )

    # compute
    threads: int | None = Field(None, ge=1, le=1024, description="Engine threads per run")
    sample_budget_bytes: float = Field(
        2 * 2.0**30,
        ge=0,
        description="Training samples a run keeps in memory; beyond, they are regenerated "
        "at every pass (the estimate and the workers use the same figure)",
    )
    embedded_workers: int = Field(1, ge=0, le=64, description="In-process worker threads")
    shutdown_grace_seconds: float = Field(
        5.0,
        ge=0,
        description="On SIGTERM the embedded worker waits this long for its runs to reach a "
        "point boundary, then gives the runs still computing back to the queue (attempt "
        "refunded) before the process exits",
    )
    sqlite_synchronous: Literal["FULL", "EXTRA", "NORMAL", "OFF"] = Field(
        "FULL",
        description="SQLite's synchronous pragma. FULL: a commit (and so a 201) is on the disk "
        "when it returns; NORMAL loses acknowledged work on an OS crash or power loss",
    )
    min_free_disk_bytes: int = Field(
        16 << 20,
        ge=0,
        description="/readyz reports not ready when the SQLite database's filesystem has less "
        "free space than this (or is read-only, or refuses a write)",
    )

    # routing to GPU workers (service/experiments/repository.py: queue_for)
    gpu_route_flops: float = Field(
        DEFAULT_GPU_ROUTE_FLOPS,
        ge=0,
        description="A spec with device 'auto' goes to the gpu queue when its estimated work "
        "reaches this many flops and a GPU worker is alive (else to cpu)",
    )
    gpu_memory_bytes: float | None = Field(
        None,
        gt=0,
        description="The GPU memory a gpu-queue run may use; a spec for the gpu queue whose "
        "estimated peak exceeds it is refused. Default: the smallest GPU of the live GPU "
        "workers, or 80 GiB when none is known",
    )

    # what a submission may ask for (checked on the engine's estimate before storing)
    max_memory_bytes: float = Field(64 * 2.0**30, gt=0)
    max_flops: float = Field(1e18, gt=0)
    max_points: int = Field(100_000, ge=1)
    max_body_bytes: int = Field(1 << 20, ge=1024, description="Largest request body accepted")

    # capacity of one API process (README "Capacity and slow clients")
    api_threads: int = Field(
        32,
        ge=1,
        le=1024,
        description="Threads of the API process that run database work; the database pool "
        "holds as many connections, plus a few for the embedded worker and publishing",
    )
    max_active_requests: int | None = Field(
        None, ge=1, description="Requests handled at once. Default: HSL_API_THREADS"
    )
    max_queued_requests: int = Field(
        512,
        ge=0,
        description="Requests waiting for a slot; beyond, 503 problem+json with Retry-After",
    )
    queue_wait_seconds: float = Field(
        2.0, gt=0, description="Longest wait for a slot before 503 with Retry-After"
    )
    max_connections: int = Field(
        1000,
        ge=8,
        description="Open client connections; at the limit a new one closes the connection "
        "idle longest (no request under way), else it is refused with 503",
    )
    header_timeout: float = Field(
        10.0, gt=0, description="Seconds a connection may take to send a request's head"
    )
    keep_alive_seconds: float = Field(
        5.0, gt=0, description="Seconds an idle keep-alive connection stays open"
    )
    access_log: bool = Field(
        False,
        description="Log every request (uvicorn's access log; a proxy in front usually logs "
        "them, and on a busy API the log line costs as much as the request)",
    )
    max_header_bytes: int = Field(
        16 * 1024, ge=1024, description="Largest request head (request line and headers)"
    )

    @field_validator("database_url")
    @classmethod
    def _known_driver(cls, v: str) -> str:
        if not (v.startswith("sqlite") or v.startswith("postgresql")):
            raise ValueError("HSL_DATABASE_URL must be a sqlite:// or postgresql+psycopg:// URL")
        if v.startswith("postgresql://"):
            v = "postgresql+psycopg://" + v.removeprefix("postgresql://")
        return v

    @property
    def embedded(self) -> bool:
        """No broker: runs execute in the API process."""
        return self.broker_url is None

    @property
    def keys_required(self) -> bool:
        if self.require_keys is not None:
            return self.require_keys
        return not (self.embedded and _is_loopback(self.host))

    @property
    def host_names(self) -> frozenset[str] | None:
        """The host names the API answers to, or None when any Host is answered: the bound
        address, localhost and the loopback addresses, plus ``HSL_ALLOWED_HOSTS``. Checked by
        default only where no key is required (a DNS-rebinding page could otherwise use the
        keyless service); a keyed API behind a reverse proxy answers any Host unless
        ``HSL_ALLOWED_HOSTS`` names them."""
        extra = [h.strip() for h in (self.allowed_hosts or "").split(",") if h.strip()]
        if "*" in extra or (not extra and self.keys_required):
            return None
        names = {"localhost", "127.0.0.1", "::1", self.host, *extra}
        return frozenset(n.lower().strip("[]").rstrip(".") for n in names)

    @property
    def active_requests(self) -> int:
        return self.max_active_requests or self.api_threads

    @property
    def heartbeat_seconds(self) -> float:
        return self.lease_seconds / 3

    @property
    def worker_ttl_seconds(self) -> float:
        """A registered worker counts as alive this long after its last heartbeat (it beats
        every lease/3 seconds, so a few missed beats do not make it disappear)."""
        return WORKER_TTL_LEASES * self.lease_seconds

    @property
    def visibility_timeout(self) -> float:
        """Above the longest hard time limit, so Redis never redelivers a live run's message
        (a run that outlives it anyway is protected by its lease: the copy finds nothing)."""
        if self.visibility_timeout_seconds is not None:
            return self.visibility_timeout_seconds
        return self.run_time_limit + 600.0


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
