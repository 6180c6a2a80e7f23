"""The reliability scenarios of issue 4 (docs/reliability.md).

Each scenario test takes the ``scenario`` fixture, names itself, adds its figures, and
registers the databases (and service URLs) it used. After the test, the fixture runs the
invariant check on each database and fails the test if one is broken:

- every experiment is terminal or holds a live lease;
- every point is stored once, and belongs to its experiment's sweep;
- no run was claimed more than ``max_attempts`` times;
- a succeeded experiment has all its points;
- every service the test registers still answers /healthz.

Records go to ``reports/reliability.json`` (one per scenario: id, passed, figures), written
at the end of the session and merged with records of scenarios not run this time.
"""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select

import hsl_engine as he
from service.db import Experiment, Point, Run, make_engine, make_session_factory, utcnow
from service.db.models import TERMINAL
from tests.reliability.loopfs import loopfs  # noqa: F401 (a fixture of this folder)
from tests.reliability.server import start_server  # noqa: F401 (a fixture of this folder)
from tests.reliability.stack import Stack

REPORT = Path(__file__).resolve().parents[2] / "reports" / "reliability.json"
_RECORDS: dict[str, dict[str, Any]] = {}


class Scenario:
    def __init__(self) -> None:
        self.id: str | None = None
        self.figures: dict[str, Any] = {}
        self.databases: list[tuple[str, int]] = []  # (url, max_attempts)
        self.services: list[str] = []

    def __call__(self, scenario_id: str) -> Scenario:
        self.id = scenario_id
        return self

    def database(self, url: str, max_attempts: int = 3) -> None:
        self.databases.append((url, max_attempts))

    def service(self, url: str) -> None:
        """Check after the test that this service still answers. (The fixtures that run
        the service must be set up before ``scenario``, so they outlive its check.)"""
        self.services.append(url)


def check_invariants(url: str, max_attempts: int) -> dict[str, Any]:
    engine = make_engine(url)
    try:
        with make_session_factory(engine)() as s:
            now = utcnow()
            problems = []
            experiments = s.execute(select(Experiment)).scalars().all()
            for exp in experiments:
                if exp.status in TERMINAL:
                    continue
                live = s.execute(
                    select(func.count())
                    .select_from(Run)
                    .where(
                        Run.experiment_id == exp.id,
                        Run.status == "running",
                        Run.lease_expires_at > now,
                    )
                ).scalar_one()
                if not live:
                    problems.append(f"experiment {exp.id} is {exp.status} without a live lease")
            total = s.execute(select(func.count()).select_from(Point)).scalar_one()
            distinct = s.execute(
                select(func.count()).select_from(
                    select(Point.run_id, Point.n).distinct().subquery()
                )
            ).scalar_one()
            if distinct != total:
                problems.append(f"{total - distinct} points stored twice")
            for exp in experiments:
                sizes = {n for n, _ in he.parse_spec(exp.spec).sample_sizes()}
                ns = s.execute(select(Point.n).where(Point.experiment_id == exp.id)).scalars()
                stray = set(ns) - sizes
                if stray:
                    problems.append(f"experiment {exp.id} has points outside its sweep: {stray}")
                if exp.status == "succeeded":
                    count = s.execute(
                        select(func.count()).select_from(Point).where(Point.experiment_id == exp.id)
                    ).scalar_one()
                    if count != exp.points_total:
                        problems.append(
                            f"succeeded experiment {exp.id}: {count}/{exp.points_total} points"
                        )
            over = s.execute(
                select(func.count()).select_from(Run).where(Run.attempts > max_attempts)
            ).scalar_one()
            if over:
                problems.append(f"{over} runs claimed more than {max_attempts} times")
            return {"experiments": len(experiments), "points": total, "problems": problems}
    finally:
        engine.dispose()


@pytest.fixture
def stack(request, tmp_path, postgres_url, redis_server):
    """``stack(**settings)``; set up before ``scenario`` (tests list it first), so the
    processes and the database still exist when the scenario's checks run."""
    stacks = []

    def make(db_url=None, **settings):
        db_url = db_url or postgres_url
        s = Stack(tmp_path, db_url, redis_server.url, **settings)
        stacks.append(s)
        request.getfixturevalue("scenario").database(db_url)
        return s

    yield make
    for s in stacks:
        s.close()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    setattr(item, f"rep_{rep.when}", rep)


@pytest.fixture
def scenario(request):
    sc = Scenario()
    started = time.monotonic()
    yield sc
    problems = []
    for url in sc.services:
        try:
            if httpx.get(f"{url}/healthz", timeout=5).status_code != 200:
                problems.append(f"{url} does not answer /healthz")
        except httpx.TransportError as exc:
            problems.append(f"{url} does not answer /healthz: {exc}")
    for url, max_attempts in sc.databases:
        problems += check_invariants(url, max_attempts)["problems"]
    rep = getattr(request.node, "rep_call", None)
    passed = bool(rep is not None and rep.passed and not problems)
    if sc.id is not None:
        _RECORDS[sc.id] = {
            "id": sc.id,
            "passed": passed,
            "figures": sc.figures,
            "invariants": "ok" if not problems else problems,
            "test": request.node.nodeid,
            "seconds": round(time.monotonic() - started, 2),
            "at": datetime.now(UTC).isoformat(timespec="seconds"),
        }
    if problems:
        pytest.fail("invariants broken after the scenario: " + "; ".join(problems))


def pytest_sessionfinish(session, exitstatus):
    if not _RECORDS:
        return
    records: dict[str, dict[str, Any]] = {}
    if REPORT.exists():
        try:
            records = {r["id"]: r for r in json.loads(REPORT.read_text())["scenarios"]}
        except (ValueError, KeyError, TypeError):
            records = {}
    records.update(_RECORDS)
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    ordered = sorted(records.values(), key=lambda r: r["id"])
    REPORT.write_text(json.dumps({"scenarios": ordered}, indent=1) + "\n")
