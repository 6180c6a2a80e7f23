"""A real uvicorn server in a thread of the test process, for what the test client cannot do:
streams that stay open (Server-Sent Events), several at once, and a graceful shutdown.

It runs the real application on the test's migrated database, with the real connection guard
(`hsl.connections.uvicorn_options`); the broker is outside the unit (a recording publisher),
and the test executes runs with the worker's own function (`api.execute`). Two servers on
one database stand for two API processes.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI

from hsl.connections import uvicorn_options
from service.app import create_app
from service.config import Settings
from service.db import keys

from .api import RecordingPublisher


class LiveServer:
    def __init__(self, app: FastAPI, settings: Settings):
        self.app = app
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(
            app,
            log_level="warning",
            timeout_graceful_shutdown=60,
            lifespan="on",
            **uvicorn_options(settings),
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, args=([sock],), daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)

    def key(self, tenant: str) -> str:
        with self.app.state.sessions.begin() as session:
            return keys.create_key(session, tenant)

    def client(self, key: str | None = None, **kw: Any) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30, **kw)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(90)


@pytest.fixture
def live(database_url) -> Iterator[Any]:
    """``live(**settings)``: a started server on the test's database (keys required unless
    the settings say otherwise); stopped at the end of the test."""
    servers: list[LiveServer] = []

    def start(**overrides: Any) -> LiveServer:
        fields: dict[str, Any] = {
            "database_url": database_url,
            "require_keys": True,
            "auto_migrate": False,
            "events_poll_seconds": 0.05,
        }
        fields.update(overrides)
        settings = Settings(**fields)
        pub = RecordingPublisher()
        server = LiveServer(create_app(settings, lambda _s, _t: pub), settings)
        servers.append(server)
        return server

    try:
        yield start
    finally:
        for s in servers:
            s.stop()
