"""Real PostgreSQL and Redis for the tests: a fresh database per test, a private Redis.

PostgreSQL: the server at ``HSL_TEST_PG`` (default 127.0.0.1:5432, trust auth, user postgres);
each test gets its own database, dropped afterwards. Redis: a private ``redis-server`` on a
free port in its own process group, so a test may kill or restart it.

Without the servers the tests skip with the reason; with ``HSL_REQUIRE_SERVICES=1`` (set by
``.ci/run``) they fail instead, so CI can never pass by skipping them.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

PG_HOSTPORT = os.environ.get("HSL_TEST_PG", "127.0.0.1:5432")
PG_ADMIN_DB = os.environ.get("HSL_TEST_PG_DB", "test")


def unavailable(reason: str) -> None:
    if os.environ.get("HSL_REQUIRE_SERVICES") == "1":
        pytest.fail(f"{reason} (HSL_REQUIRE_SERVICES=1: this test may not skip)")
    pytest.skip(reason)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _admin_conn():
    import psycopg

    host, port = PG_HOSTPORT.rsplit(":", 1)
    try:
        return psycopg.connect(
            host=host,
            port=int(port),
            user="postgres",
            dbname=PG_ADMIN_DB,
            autocommit=True,
            connect_timeout=3,
        )
    except psycopg.OperationalError as exc:
        unavailable(f"PostgreSQL is not reachable at {PG_HOSTPORT}: {exc}".strip())


def drop_database(name: str) -> None:
    with _admin_conn() as conn:
        conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,)
        )
        conn.execute(f'DROP DATABASE IF EXISTS "{name}"')


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A SQLAlchemy URL of a new, empty PostgreSQL database."""
    name = f"hsl_test_{uuid.uuid4().hex[:12]}"
    with _admin_conn() as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql+psycopg://postgres@{PG_HOSTPORT}/{name}"
    finally:
        drop_database(name)


# Migrated databases. Upgrading a fresh database through every Alembic revision costs about
# 0.2 s on SQLite (a synchronous commit per revision) and 0.6 s on PostgreSQL, per test; the
# service and worker tests start from a copy of one database upgraded once per session with
# the same revisions instead (a file copy; CREATE DATABASE ... TEMPLATE). The migration tests
# (tests/migrations) still upgrade and downgrade fresh databases themselves.


@pytest.fixture(scope="session")
def _migrated_sqlite_template(tmp_path_factory) -> Path:
    from service.db import migrate

    path = tmp_path_factory.mktemp("migrated") / "template.db"
    migrate.upgrade(f"sqlite:///{path}")  # its engine is disposed: the WAL is checkpointed
    assert not path.with_name(path.name + "-wal").exists()
    return path


@pytest.fixture
def migrated_sqlite_url(_migrated_sqlite_template, tmp_path) -> str:
    """A SQLAlchemy URL of a new SQLite file upgraded to the head revision."""
    path = tmp_path / "migrated.db"
    shutil.copyfile(_migrated_sqlite_template, path)
    return f"sqlite:///{path}"


@pytest.fixture(scope="session")
def _migrated_postgresql_template() -> Iterator[str]:
    """A database upgraded to head, only ever copied (no connection stays open to it)."""
    from service.db import migrate

    name = f"hsl_template_{uuid.uuid4().hex[:12]}"
    with _admin_conn() as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        migrate.upgrade(f"postgresql+psycopg://postgres@{PG_HOSTPORT}/{name}")
        yield name
    finally:
        drop_database(name)


@pytest.fixture
def migrated_postgresql_url(request) -> Iterator[str]:
    """A SQLAlchemy URL of a new PostgreSQL database upgraded to the head revision (the
    template is made on first use, so SQLite-only runs never need a server)."""
    with _admin_conn():  # skips (or fails) here when there is no server, as postgres_url
        pass
    template = request.getfixturevalue("_migrated_postgresql_template")
    name = f"hsl_test_{uuid.uuid4().hex[:12]}"
    with _admin_conn() as conn:
        conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
    try:
        yield f"postgresql+psycopg://postgres@{PG_HOSTPORT}/{name}"
    finally:
        drop_database(name)


class RedisServer:
    def __init__(self, workdir: Path):
        self.binary = shutil.which("redis-server")
        if self.binary is None:
            unavailable("redis-server is not installed")
        self.port = free_port()
        self.workdir = workdir
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.workdir),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            self.proc.wait(10)
        self.proc = None


@pytest.fixture
def redis_server(tmp_path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop(signal.SIGKILL)


class PostgresServer:
    """A private PostgreSQL cluster on a free port (initdb from the installed binaries), so a
    test may stop and start it. As root, the server runs as the ``postgres`` user."""

    def __init__(self):
        import glob

        bins = sorted(glob.glob("/usr/lib/postgresql/*/bin"))
        found = shutil.which("pg_ctl")
        self.bindir = Path(found).parent if found else (Path(bins[-1]) if bins else None)
        if self.bindir is None or not (self.bindir / "initdb").exists():
            unavailable("PostgreSQL server binaries (initdb, pg_ctl) are not installed")
        import tempfile

        self.port = free_port()
        # not under pytest's tmp_path: its parents are private to this user
        self.dir = Path(tempfile.mkdtemp(prefix="hsl-pg-"))
        self.as_postgres = os.geteuid() == 0
        if self.as_postgres:
            shutil.chown(self.dir, "postgres")
        self._run(
            "initdb",
            "-D",
            str(self.dir / "data"),
            "-A",
            "trust",
            "-U",
            "postgres",
            "--no-sync",
            "-E",
            "UTF8",
        )

    def _run(self, tool: str, *args: str) -> None:
        argv = [str(self.bindir / tool), *args]
        if self.as_postgres:
            argv = ["runuser", "-u", "postgres", "--", *argv]
        subprocess.run(argv, check=True, capture_output=True, timeout=120)

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def start(self) -> None:
        self._run(
            "pg_ctl",
            "-D",
            str(self.dir / "data"),
            "-l",
            str(self.dir / "log"),
            "-w",
            "start",
            "-o",
            f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off",
        )

    def stop(self, mode: str = "immediate") -> None:
        self._run("pg_ctl", "-D", str(self.dir / "data"), "-m", mode, "-w", "stop")


@pytest.fixture
def private_postgres() -> Iterator[PostgresServer]:
    server = PostgresServer()
    server.start()
    try:
        yield server
    finally:
        try:
            server.stop()
        except subprocess.CalledProcessError:
            pass  # already stopped
        shutil.rmtree(server.dir, ignore_errors=True)
