"""The distributed stack for fault scenarios: hsl api, Celery workers and the reaper as
processes on loopback, against a given PostgreSQL database and Redis server."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import select

from service.db import Experiment, Point, Run, make_engine, make_session_factory
from tests.integration.processes import Proc, Processes, base_env, wait_http, wait_status
from tests.servers import free_port

SLOW_SPEC: dict[str, Any] = {
    "name": "slow",
    "model": {"d": 30, "q": 2, "epsilon": 0.5, "features": "gaussian"},
    "sweep": {"n_values": [2000, 8000, 30000, 60000, 90000], "seeds": 1, "seed": 1, "n_test": 500},
    "methods": [{"name": "layerwise_spectral"}],
}
TINY_SPEC: dict[str, Any] = {
    "name": "tiny",
    "model": {"d": 12, "q": 2, "epsilon": 0.5, "features": "gaussian"},
    "sweep": {"alphas": [1.5, 2.0], "seeds": 1, "seed": 0, "n_test": 300},
    "methods": [{"name": "layerwise_spectral"}],
}


def variant(spec: dict[str, Any], i: int, **sweep: Any) -> dict[str, Any]:
    """A distinct copy (another root seed), so it is not deduplicated."""
    return {
        **spec,
        "name": f"{spec['name']}-{i}",
        "sweep": {**spec["sweep"], "seed": 100 + i, **sweep},
    }


class Stack:
    def __init__(self, tmp_path: Path, db_url: str, broker_url: str, **settings: Any):
        self.db_url = db_url
        env = {
            "HSL_DATABASE_URL": db_url,
            "HSL_BROKER_URL": broker_url,
            "HSL_LEASE_SECONDS": 3,
            "HSL_REAPER_INTERVAL": 1,
            "HSL_THREADS": 1,
            **settings,
        }
        self.settings = env
        self.procs = Processes(tmp_path, base_env(**env))
        self.procs.hsl("db", "upgrade")
        self.key = self.procs.hsl("keys", "create", "--tenant", "lab").split()[-1]
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.engine = make_engine(db_url)
        self.sessions = make_session_factory(self.engine)
        self.client = httpx.Client(
            base_url=self.url, timeout=30, headers={"Authorization": f"Bearer {self.key}"}
        )
        self.workers: list[Proc] = []

    # -- roles ---------------------------------------------------------------------------
    def api(self, **env: Any) -> Proc:
        proc = self.procs.start(
            "api", "api", "--port", str(self.port), env={k: str(v) for k, v in env.items()}
        )
        wait_http(f"{self.url}/healthz", procs=self.procs)
        return proc

    def worker(self, concurrency: int = 1, **env: Any) -> Proc:
        name = f"worker{len(self.workers) + 1}"
        proc = self.procs.start(
            name,
            "worker",
            "--concurrency",
            str(concurrency),
            env={k: str(v) for k, v in env.items()},
        )
        self.workers.append(proc)
        return proc

    def reaper(self) -> Proc:
        return self.procs.start("reaper", "reaper")

    def start(self, workers: int = 1) -> Stack:
        self.api()
        for _ in range(workers):
            self.worker()
        self.reaper()
        wait_http(f"{self.url}/readyz", procs=self.procs)
        return self

    def close(self) -> None:
        self.client.close()
        self.procs.stop_all()
        self.engine.dispose()

    # -- client and database views ------------------------------------------------------
    def submit(self, spec: dict[str, Any]) -> str:
        r = self.client.post("/v1/experiments", json=spec)
        assert r.status_code == 201, r.text
        return r.json()["id"]

    def wait(self, exp_id: str, timeout: float = 300, **kw: Any) -> dict[str, Any]:
        return wait_status(self.client, exp_id, procs=self.procs, timeout=timeout, **kw)

    def runs(self, exp_id: str) -> list[Run]:
        with self.sessions() as s:
            return list(
                s.execute(select(Run).where(Run.experiment_id == exp_id).order_by(Run.id)).scalars()
            )

    def points(self, exp_id: str) -> list[Point]:
        with self.sessions() as s:
            return list(
                s.execute(
                    select(Point).where(Point.experiment_id == exp_id).order_by(Point.id)
                ).scalars()
            )

    def experiment(self, exp_id: str) -> Experiment:
        with self.sessions() as s:
            return s.get(Experiment, exp_id)

    def wait_for(
        self, predicate, timeout: float = 120, interval: float = 0.02, what: str = "condition"
    ) -> float:
        """Poll ``predicate`` until true; returns the seconds it took."""
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            if predicate():
                return time.monotonic() - start
            time.sleep(interval)
        raise AssertionError(f"{what} not reached in {timeout} s\n{self.procs.logs()}")

    def running_run(self, exp_id: str) -> Run | None:
        return next((r for r in self.runs(exp_id) if r.status == "running" and r.lease_owner), None)

    def worker_of(self, run: Run) -> tuple[Proc, int]:
        """The worker (process group) executing ``run``, and the pid of its pool process."""
        pid = int(run.lease_owner.split(":")[1])
        pgid = os.getpgid(pid)
        return next(w for w in self.workers if w.popen.pid == pgid), pid

    def claims(self, run_id: int) -> int:
        """How many times workers logged claiming this run."""
        pattern = re.compile(rf"run {run_id} \(.*\) claimed by")
        return sum(
            len(pattern.findall(w.log_path.read_text(errors="replace"))) for w in self.workers
        )

    def log_count(self, text: str) -> int:
        return sum(p.log_path.read_text(errors="replace").count(text) for p in self.procs.procs)
