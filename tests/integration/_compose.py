"""Run the roles of docker-compose.yml as local processes, without Docker.

The compose file is the source of truth: each role's ``command`` and ``environment`` are read
from it and only the endpoints are rewritten (compose service host names to the test's fresh
PostgreSQL database and private Redis, a free API port). So a command or variable that is wrong
in the compose file fails here too.
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"

# The roles a CPU deployment runs, in the order of their depends_on (api migrates first).
ROLES = ("api", "worker", "reaper")


def load_compose() -> dict[str, Any]:
    import yaml

    with COMPOSE_FILE.open() as f:
        return yaml.safe_load(f)


@dataclass(frozen=True)
class Endpoints:
    """Where the compose services postgres and redis, and the api port, live locally."""

    database_url: str  # the test's own database (its user, host, port and name are used)
    redis_url: str  # the test's own Redis (its host and port are used)
    api_port: int


def local_url(value: str, ep: Endpoints) -> str:
    """A compose-internal URL (``postgres:5432``, ``redis:6379``) pointed at the local services.

    Scheme (driver) and query stay the compose file's; so does Redis's database number.
    """
    parts = urlsplit(value)
    if parts.hostname == "postgres" and parts.port == 5432:
        # The local server trusts user postgres; the compose user and password do not exist.
        db = urlsplit(ep.database_url)
        return urlunsplit((parts.scheme, db.netloc, db.path, parts.query, ""))
    if parts.hostname == "redis" and parts.port == 6379:
        redis = urlsplit(ep.redis_url)
        return urlunsplit((parts.scheme, redis.netloc, parts.path, parts.query, ""))
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
