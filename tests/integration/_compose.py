"""Run the roles of docker-compose.yml as local processes, without Docker.

The compose file is the source of truth: each role's ``command`` and ``environment`` are read
from it and only the endpoints are rewritten (compose service host names to loopback, a fresh
PostgreSQL database, a private Redis, a free API port). So a command or variable that is wrong
in the compose file fails here too.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"

PG_HOST = "127.0.0.1"
PG_PORT = 5432
PG_ADMIN = f"host={PG_HOST} port={PG_PORT} user=postgres dbname=postgres connect_timeout=3"

# The roles a CPU deployment runs, in the order of their depends_on (api migrates first).
ROLES = ("api", "worker", "reaper")


def load_compose() -> dict[str, Any]:
    import yaml

    with COMPOSE_FILE.open() as f:
        return yaml.safe_load(f)


def unavailable(reason: str) -> None:
    """Skip, unless HSL_REQUIRE_SERVICES=1 says the services must be there (CI)."""
    if os.environ.get("HSL_REQUIRE_SERVICES") == "1":
        pytest.fail(f"HSL_REQUIRE_SERVICES=1 but {reason}", pytrace=False)
    pytest.skip(reason)


def require_services() -> None:
    import psycopg

    try:
        with psycopg.connect(PG_ADMIN):
            pass
    except psycopg.Error as exc:
        unavailable(f"PostgreSQL is not reachable at {PG_HOST}:{PG_PORT} as user postgres: {exc}")
    if shutil.which("redis-server") is None:
        unavailable("the redis-server binary is not on PATH")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def fresh_database() -> Iterator[str]:
    """A new, empty PostgreSQL database; dropped afterwards (its connections terminated first)."""
    import psycopg
    from psycopg import sql

    name = f"hsl_compose_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield name
    finally:
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = %s AND pid <> pg_backend_pid()",
                (name,),
            )
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(name)))


@dataclass(frozen=True)
class Endpoints:
    """Where the compose services postgres and redis, and the api port, live locally."""

    database: str
    redis_port: int
    api_port: int


def local_url(value: str, ep: Endpoints) -> str:
    """A compose-internal URL (``postgres:5432``, ``redis:6379``) pointed at the local services."""
    parts = urlsplit(value)
    if parts.hostname == "postgres" and parts.port == 5432:
        # The local server trusts user postgres; the compose user and password do not exist.
        return urlunsplit(
            (parts.scheme, f"postgres@{PG_HOST}:{PG_PORT}", f"/{ep.database}", parts.query, "")
        )
    if parts.hostname == "redis" and parts.port == 6379:
        return urlunsplit((parts.scheme, f"127.0.0.1:{ep.redis_port}", parts.path, parts.query, ""))
    return value


def local_environment(service: Mapping[str, Any], ep: Endpoints) -> dict[str, str]:
    env = service.get("environment") or {}
    assert isinstance(env, Mapping), "environment must be a mapping"
    return {k: local_url(str(v), ep) for k, v in env.items()}


def local_command(service: Mapping[str, Any], ep: Endpoints) -> list[str]:
    """The service's command as compose would exec it (shell-like split, no shell added)."""
    command = service["command"]
    if isinstance(command, str):
        command = command.replace("--port 8000", f"--port {ep.api_port}")
        command = command.replace("0.0.0.0", "127.0.0.1")
        return shlex.split(command)
    return [
        str(a).replace("0.0.0.0", "127.0.0.1").replace("8000", str(ep.api_port)) for a in command
    ]


def base_environment(extra: Mapping[str, str]) -> dict[str, str]:
    """This process's environment without inherited HSL_* settings, plus ``extra``.

    The venv's scripts come first on PATH so ``hsl`` is the one under test.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("HSL_")}
    env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", "")])
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


@dataclass
class Process:
    name: str
    popen: subprocess.Popen
    log: Path


@dataclass
class ProcessGroups:
    """Processes each in its own session; all of them are stopped by `stop_all`."""

    workdir: Path
    procs: list[Process] = field(default_factory=list)

    def start(self, name: str, argv: list[str], env: Mapping[str, str]) -> Process:
        log = self.workdir / f"{name}.log"
        with log.open("wb") as out:
            popen = subprocess.Popen(
                argv,
                cwd=self.workdir,
                env=dict(env),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        proc = Process(name, popen, log)
        self.procs.append(proc)
        return proc

    def assert_alive(self) -> None:
        for p in self.procs:
            code = p.popen.poll()
            assert code is None, f"{p.name} exited early with status {code}"

    def stop_all(self, grace: float = 10.0) -> None:
        for p in self.procs:
            _signal_group(p.popen, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for p in self.procs:
            try:
                p.popen.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for p in self.procs:
            # The group too: a leader that exited may leave children (Celery's pool) behind.
            _signal_group(p.popen, signal.SIGKILL)
            p.popen.wait()

    def tails(self, lines: int = 40) -> str:
        out = []
        for p in self.procs:
            text = p.log.read_text(errors="replace") if p.log.exists() else ""
            tail = "\n".join(text.splitlines()[-lines:])
            out.append(f"----- {p.name} (exit {p.popen.poll()}) {p.log} -----\n{tail}")
        return "\n".join(out)


def _signal_group(popen: subprocess.Popen, sig: signal.Signals) -> None:
    # start_new_session=True makes the child a session and group leader: its pgid is its pid.
    try:
        os.killpg(popen.pid, sig)
    except ProcessLookupError:
        pass


def run_once(argv: list[str], env: Mapping[str, str], cwd: Path, timeout: float = 120.0) -> str:
    """Run a one-shot command (``hsl db upgrade``, ``hsl keys create``); its stdout."""
    done = subprocess.run(
        argv,
        cwd=cwd,
        env=dict(env),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, (
        f"{shlex.join(argv)} exited with {done.returncode}\n"
        f"stdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    )
    return done.stdout
