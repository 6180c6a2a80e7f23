"""A real ``hsl serve`` process for the reliability scenarios: the ``start_server`` fixture
(made available to every test of this folder by its conftest) and its helpers.

Each server runs in its own folder under the test's ``tmp_path``, on its own SQLite
database, with its settings as ``HSL_*`` environment variables, in its own process group.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.db import keys
from tests.integration.processes import Processes, base_env, wait_http
from tests.servers import free_port


@dataclass
class Server:
    procs: Processes
    url: str
    port: int
    folder: Path
    minted: list[str] = field(default_factory=list)

    @property
    def database_url(self) -> str:
        return f"sqlite:///{self.folder}/.hsl/hsl.db"

    def keys(self, *tenants: str) -> list[str]:
        """A new key per tenant name, minted with ``hsl keys create`` (concurrently)."""

        def mint(tenant: str) -> str:
            out = self.procs.hsl("keys", "create", "--tenant", tenant).strip()
            assert keys.KEY_PATTERN.match(out), out
            return out

        with ThreadPoolExecutor(len(tenants)) as pool:
            minted = list(pool.map(mint, tenants))
        self.minted += minted
        return minted

    def client(self, key: str | None = None, **kw: Any) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30, **kw)

    def restart(self, **settings: Any) -> None:
        """Stop the server (SIGTERM, as an operator would) and start it again on the same
        port, folder and database, with these settings changed; returns once it answers
        /readyz."""
        for proc in self.procs.procs:
            proc.stop()
        name = f"serve-{len(self.procs.procs)}"
        env = {f"HSL_{k.upper()}": str(v) for k, v in settings.items()}
        self.procs.start(name, "serve", "--port", str(self.port), env=env)
        wait_http(f"{self.url}/readyz", procs=self.procs, alive=True)


StartServer = Callable[..., Server]


@pytest.fixture
def start_server(request, tmp_path) -> Iterator[StartServer]:
    """``start_server(name, **HSL_settings)``: ``hsl serve`` in ``tmp_path/name``, keys required
    unless the settings say otherwise, answering /readyz.

    Request it before ``scenario``: the servers then stop after the scenario's checks. Before
    those checks, passed or failed, the experiments left live are cancelled (nothing executes
    them here, and the invariant check wants every experiment terminal)."""
    started: list[Processes] = []

    def start(name: str = "serve", **settings: Any) -> Server:
        folder = tmp_path / name
        folder.mkdir(exist_ok=True)  # a test may have mounted a filesystem in it
        env = {"HSL_REQUIRE_KEYS": "1", **{f"HSL_{k.upper()}": str(v) for k, v in settings.items()}}
        env = {k: v for k, v in env.items() if v != "None"}
        procs = Processes(folder, base_env(**env))
        started.append(procs)
        port = free_port()
        procs.start("serve", "serve", "--port", str(port))
        url = f"http://127.0.0.1:{port}"
        wait_http(f"{url}/readyz", procs=procs, alive=True)
        server = Server(procs, url, port, folder)
        # on the test's own finalizer stack: runs before the scenario's teardown
        request.node.addfinalizer(lambda: cancel_quietly(server))
        return server

    try:
        yield start
    finally:
        for procs in started:
            procs.stop_all()


def cancel_everything(server: Server, *api_keys: str) -> int:
    """Cancel every live experiment of these tenants (the invariant check wants them terminal)."""
    cancelled = 0
    for key in api_keys:
        with server.client(key) as c:
            for status in ("queued", "running"):
                while True:
                    items = c.get("/v1/experiments", params={"status": status, "limit": 200})
                    items = items.json()["items"]
                    if not items:
                        break
                    for item in items:
                        assert c.post(f"/v1/experiments/{item['id']}/cancel").status_code == 200
                        cancelled += 1
    return cancelled


def cancel_quietly(server: Server) -> None:
    """Cleanup after a test that may have failed: a dead server is the test's failure to report."""
    with contextlib.suppress(httpx.HTTPError, AssertionError, KeyError, ValueError):
        cancel_everything(server, *server.minted)
