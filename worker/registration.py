"""Worker registration: a row in ``workers`` while this worker lives (service/db/workers.py).

`Registration` inserts the row when the worker starts, renews it from a daemon thread every
heartbeat (lease/3 seconds; alive for `Settings.worker_ttl_seconds` after each), and deletes
it on an orderly stop. The devices are probed in a child process (`probe_devices`): a Celery
worker forks its pool after it starts, and CUDA initialised in the parent would be unusable
in the children.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import threading
import uuid

from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker

import hsl_engine as he
from service.config import Settings
from service.db import workers
from service.db.workers import Devices

log = logging.getLogger("hsl.worker")

PROBE_TIMEOUT_SECONDS = 120.0
_PROBE = (
    "import json, hsl_engine as he\n"
    "n = he.cuda_devices()\n"
    "memory = [m for m in (he.cuda_memory_bytes(i) for i in range(n)) if m]\n"
    "print(json.dumps({'torch': he.torch_available(), 'cuda_devices': n,\n"
    "                  'cuda_memory_bytes': min(memory) if memory else None}))\n"
)


def probe_devices(timeout: float = PROBE_TIMEOUT_SECONDS) -> Devices | None:
    """PyTorch, the CUDA devices and the smallest one's memory, asked of the engine in a child
    process (so this one never initialises CUDA). None when the probe fails."""
    try:
        out = subprocess.run(
            [sys.executable, "-c", _PROBE],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=True,
        )
        data = json.loads(out.stdout.strip().splitlines()[-1])
        memory = data["cuda_memory_bytes"]
        return Devices(
            torch=bool(data["torch"]),
            cuda_devices=int(data["cuda_devices"]),
            cuda_memory_bytes=None if memory is None else int(memory),
        )
    except (OSError, subprocess.SubprocessError, ValueError, KeyError, IndexError) as exc:
        detail = getattr(exc, "stderr", None) or exc
        log.warning("probing the devices failed: %s", str(detail).strip()[-500:])
        return None


def gpu_queue_problem(devices: Devices | None) -> str | None:
    """Why this machine cannot serve the gpu queue, or None when it can."""
    if devices is None:
        return "could not tell whether this machine has a CUDA device (the probe failed)"
    if not devices.torch:
        return (
            "PyTorch is not installed here, so no run can use CUDA (install the 'gpu' extra, "
            "e.g. the hsl:gpu image)"
        )
    if devices.cuda_devices == 0:
        return "PyTorch sees no CUDA device on this machine"
    return None


class Registration:
    """This worker's row in ``workers``, kept alive by a daemon thread."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        settings: Settings,
        *,
        kind: str,
        queues: list[str],
        devices: Devices | None = None,
        probe: bool = True,
    ):
        self.sessions, self.settings = sessions, settings
        self.kind, self.queues = kind, list(queues)
        self.devices, self.probe = devices, probe
        self.hostname, self.pid = socket.gethostname(), os.getpid()
        self.id = f"{self.hostname}:{self.pid}:{uuid.uuid4().hex[:8]}"
        self.stop_event = threading.Event()
        self.lock = threading.Lock()  # no registering after the goodbye
        self.thread: threading.Thread | None = None

    def start(self) -> None:
        """Register now (a database that is away is retried by the thread), then keep the
        row alive; the devices, unless given, are probed by the thread and added."""
        self._register()
        self.thread = threading.Thread(
            target=self._run, name=f"hsl-registration-{self.pid}", daemon=True
        )
        self.thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the heartbeat and delete the row (an orderly goodbye)."""
        with self.lock:
            self.stop_event.set()
        if self.thread is not None:
            self.thread.join(timeout)
        with self.lock:
            try:
                with self.sessions.begin() as session:
                    workers.unregister(session, self.id)
            except DBAPIError as exc:  # the row expires by itself
                log.warning("worker %s: could not unregister (%s)", self.id, exc)

    def _register(self) -> bool:
        with self.lock:
            if self.stop_event.is_set():
                return False
            return self._register_locked()

    def _register_locked(self) -> bool:
        try:
            with self.sessions.begin() as session:
                workers.register(
                    session,
                    worker_id=self.id,
                    hostname=self.hostname,
                    pid=self.pid,
                    kind=self.kind,
                    queues=self.queues,
                    engine_version=he.ENGINE_VERSION,
                    ttl_seconds=self.settings.worker_ttl_seconds,
                    devices=self.devices,
                )
                workers.prune(session)
            return True
        except DBAPIError as exc:
            log.warning("worker %s: could not register (%s); retrying", self.id, exc)
            return False

    def _run(self) -> None:
        registered = True
        if self.devices is None and self.probe:
            self.devices = probe_devices()
            registered = self._register()
            if self.devices is not None:
                log.info(
                    "worker %s (queues %s): torch %s, %d CUDA device(s)",
                    self.id,
                    ",".join(self.queues),
                    "yes" if self.devices.torch else "no",
                    self.devices.cuda_devices,
                )
        while not self.stop_event.wait(self.settings.heartbeat_seconds):
            try:
                if registered:
                    with self.sessions.begin() as session:
                        registered = workers.heartbeat(
                            session, self.id, ttl_seconds=self.settings.worker_ttl_seconds
                        )
                if not registered:  # pruned, or the database was away: insert it again
                    registered = self._register()
            except DBAPIError as exc:
                log.warning("worker %s: heartbeat failed (%s)", self.id, exc)
