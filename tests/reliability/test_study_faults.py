"""Issue 13: the reliability invariants hold for studies too. A whole Celery worker is
SIGKILLed while it computes a study's member; a new worker takes over. Every member must
complete with each point stored exactly once (real PostgreSQL, Redis, uvicorn and Celery
processes on loopback, as in test_faults.py)."""

from __future__ import annotations

import signal
import time

from sqlalchemy import func, select

from service.db import Point

from .stack import SLOW_SPEC


def test_15_sigkill_a_worker_during_a_study(stack, scenario):
    scenario("15-sigkill-worker-during-study")
    st = stack().start(workers=1)
    base = {**SLOW_SPEC, "name": "study-kill", "sweep": {**SLOW_SPEC["sweep"], "seed": 15}}
    resp = st.client.post(
        "/v1/studies",
        json={"name": "kill", "base": base, "axes": {"model.gamma": [0.6, 1.0]}},
    )
    assert resp.status_code == 201, resp.text
    study = resp.json()
    ids = [m["experiment_id"] for m in study["members"]]
    assert len(set(ids)) == 2

    def stored() -> int:
        return sum(len(st.points(i)) for i in ids)

    st.wait_for(lambda: stored() >= 1, what="a first point of the study")
    run = next(r for i in ids if (r := st.running_run(i)) is not None)
    victim, _ = st.worker_of(run)
    before = stored()
    victim.kill(signal.SIGKILL)
    killed = time.monotonic()
    st.worker()

    deadline = time.monotonic() + 400
    doc = study
    while time.monotonic() < deadline:
        doc = st.client.get(f"/v1/studies/{study['id']}").json()
        if doc["status"] in ("succeeded", "failed", "cancelled"):
            break
        time.sleep(0.5)
    finished = time.monotonic() - killed
    assert doc["status"] == "succeeded", f"{doc}\n{st.procs.logs()}"

    sizes = sorted(SLOW_SPEC["sweep"]["n_values"])
    for member in doc["members"]:
        assert member["status"] == "succeeded"
        points = st.points(member["experiment_id"])
        # each (run, n) exactly once, and the whole sweep
        assert sorted(p.n for p in points) == sizes
        assert len({(p.run_id, p.n) for p in points}) == len(points)
    with st.sessions() as s:
        total = s.execute(
            select(func.count()).select_from(Point).where(Point.experiment_id.in_(ids))
        ).scalar_one()
    assert total == doc["progress"]["points_total"] == 2 * len(sizes)
    attempts = {r.id: r.attempts for i in ids for r in st.runs(i)}
    assert attempts[run.id] >= 2  # the killed run was claimed again
    results = st.client.get(f"/v1/studies/{study['id']}/results").json()
    assert results["complete"] is True
    scenario.figures.update(
        members=len(ids),
        points_stored_before_kill=before,
        points_total=total,
        seconds_from_kill_to_study_done=round(finished, 2),
        attempts_of_killed_run=attempts[run.id],
    )
    scenario.service(st.url)
