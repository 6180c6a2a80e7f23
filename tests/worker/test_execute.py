"""The run function, called directly against a real, migrated database (SQLite and
PostgreSQL): claims, resumption, duplicate delivery, fencing, failures, cancellation."""

from __future__ import annotations

import threading
import time
from datetime import timedelta

import pytest
from sqlalchemy import func, select, update

import hsl_engine as he
from hsl.document import point_to_dict
from service.db import Experiment, Point, Run, state, utcnow
from tests.factories import TINY_SPEC, store_experiment
from worker import execute
from worker.execute import execute_run
from worker.reaper import Reaper

N_VALUES = [n for n, _ in he.parse_spec(TINY_SPEC).sample_sizes()]


def _points(sessions, run_id):
    with sessions() as s:
        return (
            s.execute(select(Point).where(Point.run_id == run_id).order_by(Point.n)).scalars().all()
        )


def _run(sessions, run_id) -> Run:
    with sessions() as s:
        return s.get(Run, run_id)


def _experiment(sessions, exp_id) -> Experiment:
    with sessions() as s:
        return s.get(Experiment, exp_id)


def test_executes_every_point_then_the_experiment_succeeds(sessions, settings):
    exp_id, run_ids = store_experiment(sessions, TINY_SPEC)
    assert execute_run(run_ids[0], sessions=sessions, settings=settings) == execute.DONE
    assert [p.n for p in _points(sessions, run_ids[0])] == N_VALUES
    assert _run(sessions, run_ids[0]).status == "succeeded"
    assert _experiment(sessions, exp_id).status == "running"  # the other run is still queued

    assert execute_run(run_ids[1], sessions=sessions, settings=settings) == execute.DONE
    exp = _experiment(sessions, exp_id)
    assert exp.status == "succeeded" and exp.finished_at is not None and exp.error is None
    # a late duplicate delivery finds nothing to do and changes nothing
    assert execute_run(run_ids[0], sessions=sessions, settings=settings) == execute.NOTHING_TO_DO
    assert len(_points(sessions, run_ids[0])) == len(N_VALUES)


def test_points_equal_the_engine_run(sessions, settings):
    spec = he.parse_spec(TINY_SPEC)
    _, run_ids = store_experiment(sessions, spec)
    execute_run(run_ids[1], sessions=sessions, settings=settings)
    run = _run(sessions, run_ids[1])
    expected = [point_to_dict(p) for p in he.iter_run(spec, run.method, run.seed)]
    stored = [p.data for p in _points(sessions, run_ids[1])]
    for got, want in zip(stored, expected, strict=True):
        for key in ("n", "mse", "cos2", "eigenvalues", "recovered", "n_train_used"):
            assert got[key] == want[key], key


def test_points_record_what_computed_them_in_columns_and_json(sessions, settings):
    spec = he.parse_spec(TINY_SPEC)
    _, run_ids = store_experiment(sessions, spec)
    backend = he.get_backend(spec.device, threads=settings.threads)

    assert execute_run(run_ids[0], sessions=sessions, settings=settings) == execute.DONE

    points = _points(sessions, run_ids[0])
    assert len(points) == len(N_VALUES)
    expected = (he.ENGINE_VERSION, backend.device, backend.array_backend)
    for p in points:
        assert (p.engine_version, p.device, p.backend) == expected
        assert (p.data["engine_version"], p.data["device"], p.data["backend"]) == expected


def test_resumes_after_a_lost_worker_without_recomputing_stored_points(sessions, settings):
    spec = he.parse_spec(TINY_SPEC)
    exp_id, run_ids = store_experiment(sessions, spec)
    run_id = run_ids[0]
    # worker A claims the run, stores the first point, and dies (its lease runs out)
    with sessions.begin() as s:
        run = state.claim_run(s, run_id, owner="dead", lease_seconds=30, max_attempts=3)
        method, seed = run.method, run.seed
    first = next(he.iter_run(spec, method, seed))
    execute._store_point(sessions, run_id, exp_id, first, attempt=1)
    # still leased: a redelivered message finds nothing to do
    assert execute_run(run_id, sessions=sessions, settings=settings) == execute.NOTHING_TO_DO
    with sessions.begin() as s:
        s.execute(
            update(Run)
            .where(Run.id == run_id)
            .values(lease_expires_at=utcnow() - timedelta(seconds=1))
        )
    assert execute_run(run_id, sessions=sessions, settings=settings) == execute.DONE

    points = _points(sessions, run_id)
    assert [p.n for p in points] == N_VALUES
    assert points[0].attempt == 1 and all(p.attempt == 2 for p in points[1:])
    assert _run(sessions, run_id).attempts == 2
    # the resumed points match an uninterrupted run up to the eigensolver's tolerance
    # (the Krylov warm start of the first resumed n differs)
    reference = {p.n: p for p in he.iter_run(spec, method, seed)}
    for p in points:
        assert p.data["mse"] == pytest.approx(reference[p.n].mse, rel=1e-6, abs=1e-9)


def test_two_deliveries_at_once_execute_once(sessions, settings):
    _, run_ids = store_experiment(sessions, TINY_SPEC)
    outcomes = []
    barrier = threading.Barrier(2)

    def deliver():
        barrier.wait()
        outcomes.append(execute_run(run_ids[0], sessions=sessions, settings=settings))

    threads = [threading.Thread(target=deliver) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == sorted([execute.DONE, execute.NOTHING_TO_DO])
    assert len(_points(sessions, run_ids[0])) == len(N_VALUES)
    assert _run(sessions, run_ids[0]).attempts == 1


def test_final_state_change_is_fenced_on_the_lease_owner(sessions, settings):
    _, run_ids = store_experiment(sessions, TINY_SPEC)
    with sessions.begin() as s:
        assert state.claim_run(s, run_ids[0], owner="a", lease_seconds=-1, max_attempts=3)
    with sessions.begin() as s:  # a's lease expired: b takes over
        assert state.claim_run(s, run_ids[0], owner="b", lease_seconds=30, max_attempts=3)
    with sessions.begin() as s:
        assert not state.renew_lease(s, run_ids[0], owner="a", lease_seconds=30)
        assert not state.finish_run(s, run_ids[0], owner="a", status="succeeded")
        assert state.renew_lease(s, run_ids[0], owner="b", lease_seconds=30)
    assert _run(sessions, run_ids[0]).status == "running"


def test_engine_error_fails_the_experiment_and_is_not_retried(sessions, settings):
    spec = {**TINY_SPEC, "device": "cuda"}  # no GPU backend here: DeviceError
    exp_id, run_ids = store_experiment(sessions, spec)
    assert execute_run(run_ids[0], sessions=sessions, settings=settings) == execute.FAILED
    run = _run(sessions, run_ids[0])
    assert run.status == "failed" and run.error["reason"] == "engine_error"
    exp = _experiment(sessions, exp_id)
    assert exp.status == "failed" and exp.error["reason"] == "engine_error"
    assert exp.error["run"] == {"method": run.method, "seed": run.seed}
    assert _run(sessions, run_ids[1]).status == "cancelled"  # the rest never starts
    assert execute_run(run_ids[0], sessions=sessions, settings=settings) == execute.NOTHING_TO_DO
    assert execute_run(run_ids[1], sessions=sessions, settings=settings) == execute.NOTHING_TO_DO


def test_a_run_that_keeps_losing_its_worker_fails_after_max_attempts(sessions, settings):
    exp_id, run_ids = store_experiment(sessions, TINY_SPEC)
    for attempt in range(settings.max_attempts):
        with sessions.begin() as s:
            assert state.claim_run(
                s,
                run_ids[0],
                owner=f"w{attempt}",
                lease_seconds=-1,
                max_attempts=settings.max_attempts,
            )
    with sessions.begin() as s:
        assert (
            state.claim_run(
                s, run_ids[0], owner="late", lease_seconds=30, max_attempts=settings.max_attempts
            )
            is None
        )
        assert state.expire_leases(s, max_attempts=settings.max_attempts) == []
    run = _run(sessions, run_ids[0])
    assert run.status == "failed" and run.error["reason"] == "worker_lost"
    assert _experiment(sessions, exp_id).status == "failed"


def test_cancelled_before_start_never_runs(sessions, settings):
    exp_id, run_ids = store_experiment(sessions, TINY_SPEC)
    with sessions.begin() as s:
        state.request_cancel(s, exp_id)
    for run_id in run_ids:
        assert execute_run(run_id, sessions=sessions, settings=settings) == execute.NOTHING_TO_DO
        assert _points(sessions, run_id) == []
    assert _experiment(sessions, exp_id).status == "cancelled"


def test_cancel_stops_a_running_run_at_the_next_point(sessions, settings):
    spec = {
        **TINY_SPEC,
        "model": {**TINY_SPEC["model"], "d": 30},
        "sweep": {
            "n_values": [200, 400, 30000, 60000, 120000],
            "seeds": 1,
            "seed": 0,
            "n_test": 500,
        },
    }
    exp_id, run_ids = store_experiment(sessions, spec)
    outcome = []
    t = threading.Thread(
        target=lambda: outcome.append(execute_run(run_ids[0], sessions=sessions, settings=settings))
    )
    t.start()
    deadline = time.monotonic() + 60
    while not _points(sessions, run_ids[0]) and time.monotonic() < deadline:
        time.sleep(0.005)
    with sessions.begin() as s:
        state.request_cancel(s, exp_id)
    t.join(120)
    assert outcome == [execute.CANCELLED]
    assert 1 <= len(_points(sessions, run_ids[0])) < 5
    assert _run(sessions, run_ids[0]).status == "cancelled"
    exp = _experiment(sessions, exp_id)
    assert exp.status == "cancelled" and exp.dedupe_key is None


def test_shutdown_gives_the_run_back_without_spending_an_attempt(sessions, settings):
    _, run_ids = store_experiment(sessions, TINY_SPEC)
    stop = threading.Event()
    stop.set()
    assert (
        execute_run(run_ids[0], sessions=sessions, settings=settings, shutdown=stop)
        == execute.SHUTDOWN
    )
    run = _run(sessions, run_ids[0])
    assert run.status == "queued" and run.attempts == 0 and run.lease_owner is None


class _Recorder:
    """Stands in for the broker (outside the unit): records what it is asked to publish."""

    def __init__(self, epoch: str | None = "redis-1"):
        self.runs: list[tuple[int, str]] = []
        self.broker_epoch = epoch

    def publish(self, runs):
        self.runs.extend(runs)
        return [r for r, _ in runs]

    def epoch(self):
        return self.broker_epoch


def test_reaper_requeues_expired_leases_and_publishes_unclaimed_runs(sessions, settings):
    exp_id, run_ids = store_experiment(sessions, TINY_SPEC)
    with sessions.begin() as s:
        state.claim_run(s, run_ids[0], owner="dead", lease_seconds=-1, max_attempts=3)
    pub = _Recorder()
    reaper = Reaper(sessions, pub, settings)
    out = reaper.sweep()
    assert out["requeued"] == [run_ids[0]]
    # the expired run goes out at once; the never-published run of a just-submitted
    # experiment is left to the API for a grace period (no duplicate message)
    assert pub.runs == [(run_ids[0], "cpu")]
    with sessions.begin() as s:
        s.execute(
            update(Experiment)
            .where(Experiment.id == exp_id)
            .values(created_at=utcnow() - timedelta(seconds=60))
        )
    pub.runs.clear()
    assert reaper.sweep()["published"] == run_ids[1:]
    # published just now, same broker: left alone until republish_after
    pub.runs.clear()
    assert reaper.sweep()["published"] == [] and pub.runs == []
    with sessions() as s:
        assert s.execute(
            select(func.count()).select_from(Run).where(Run.published_at.is_not(None))
        ).scalar_one() == len(run_ids)


def _published_a_minute_ago(sessions) -> list:
    """A tiny experiment submitted a minute ago whose runs the API published."""
    exp_id, run_ids = store_experiment(sessions, TINY_SPEC)
    with sessions.begin() as s:
        s.execute(
            update(Experiment)
            .where(Experiment.id == exp_id)
            .values(created_at=utcnow() - timedelta(seconds=60))
        )
        state.mark_published(s, run_ids)
    return run_ids


def test_reaper_republishes_everything_queued_after_a_broker_restart(sessions, settings):
    run_ids = _published_a_minute_ago(sessions)  # by the API: in the broker's queue
    pub = _Recorder(epoch="redis-1")
    reaper = Reaper(sessions, pub, settings)
    # a new reaper cannot know what happened before it: it republishes once
    assert reaper.sweep() == {
        "requeued": [],
        "published": run_ids,
        "broker_restarted": True,
        "lost_queues": [],
    }
    assert reaper.sweep()["published"] == []  # a backlog is not re-sent
    pub.broker_epoch = None  # broker down: nothing can be decided
    assert reaper.sweep()["published"] == []
    pub.broker_epoch = "redis-2"  # back, restarted (possibly empty): everything again
    assert reaper.sweep() == {
        "requeued": [],
        "published": run_ids,
        "broker_restarted": True,
        "lost_queues": [],
    }
    assert reaper.sweep()["published"] == []
    # a run claimed meanwhile is not published again
    with sessions.begin() as s:
        state.claim_run(s, run_ids[0], owner="w", lease_seconds=30, max_attempts=3)
    pub.broker_epoch = "redis-3"
    assert reaper.sweep()["published"] == run_ids[1:]


class _CountingRecorder(_Recorder):
    """A broker that also says how many messages it holds per queue."""

    def __init__(self):
        super().__init__()
        self.held: dict[str, int] | None = {}

    def queue_messages(self, queues):
        return None if self.held is None else {q: self.held.get(q, 0) for q in queues}


def test_reaper_republishes_a_queue_whose_messages_vanished(sessions, settings):
    run_ids = _published_a_minute_ago(sessions)
    pub = _CountingRecorder()
    reaper = Reaper(sessions, pub, settings)
    reaper.sweep()  # the first sweep of a reaper republishes everything anyway
    old = utcnow() - timedelta(seconds=10)
    with sessions.begin() as s:
        s.execute(update(Run).values(published_at=old))
    pub.held = {"cpu": len(run_ids)}  # every message still there: nothing to do
    assert reaper.sweep()["published"] == []
    pub.held = None  # the broker cannot say: nothing decided
    assert reaper.sweep()["published"] == []
    pub.held = {"cpu": len(run_ids) - 1}  # one message evicted: the queue is republished
    out = reaper.sweep()
    assert out["lost_queues"] == ["cpu"] and out["published"] == run_ids
    with sessions() as s:  # published again just now: not counted until the grace passed
        assert all(r.published_at > old for r in s.execute(select(Run)).scalars())
    pub.held = {"cpu": 0}
    assert reaper.sweep()["published"] == []


def _numbers(sessions, run_ids) -> dict:
    out = {}
    for run_id in run_ids:
        for p in _points(sessions, run_id):
            out[(p.method, p.seed, p.n)] = p
    return out


def test_the_spec_chooses_the_array_backend_torch_on_cpu_matches_numpy(sessions, settings):
    if not he.torch_available():
        pytest.skip("PyTorch is not installed here")
    torch_spec = {**TINY_SPEC, "device": "cpu", "solver": {"backend": "torch"}}
    numpy_spec = {**TINY_SPEC, "device": "cpu", "solver": {"backend": "numpy"}}
    _, torch_runs = store_experiment(sessions, torch_spec)
    _, numpy_runs = store_experiment(sessions, numpy_spec)
    for run_id in torch_runs + numpy_runs:
        assert execute_run(run_id, sessions=sessions, settings=settings) == execute.DONE

    torch_points, numpy_points = _numbers(sessions, torch_runs), _numbers(sessions, numpy_runs)
    assert torch_points.keys() == numpy_points.keys() and len(torch_points) == 2 * len(N_VALUES)
    for key, p in torch_points.items():
        q = numpy_points[key]
        assert (p.device, p.backend) == ("cpu", "torch"), key
        assert (p.data["device"], p.data["backend"]) == ("cpu", "torch"), key
        assert (q.device, q.backend) == ("cpu", "numpy"), key
        # the same sample streams on the CPU: float64 numbers agree to rounding
        assert p.data["mse"] == pytest.approx(q.data["mse"], rel=0, abs=1e-6), key
        assert p.data["cos2"] == pytest.approx(q.data["cos2"], rel=0, abs=1e-6), key


def test_a_cuda_index_the_machine_lacks_fails_naming_it(sessions, settings):
    device = f"cuda:{he.cuda_devices() + 1}"  # missing everywhere
    exp_id, run_ids = store_experiment(sessions, {**TINY_SPEC, "device": device})
    assert execute_run(run_ids[0], sessions=sessions, settings=settings) == execute.FAILED
    error = _run(sessions, run_ids[0]).error
    assert error["reason"] == "engine_error"
    assert error["message"].startswith("DeviceError:") and repr(device) in error["message"]


def test_the_last_two_runs_finishing_at_once_succeed_the_experiment(sessions, settings):
    """Two workers end the last two runs in concurrent transactions. Without a lock each
    would count the other's run as still running and both leave the experiment running."""
    exp_id, run_ids = store_experiment(sessions, TINY_SPEC)
    for owner, run_id in zip(("a", "b"), run_ids, strict=True):
        with sessions.begin() as s:
            assert state.claim_run(s, run_id, owner=owner, lease_seconds=30, max_attempts=3)

    first_synced, second_done = threading.Event(), threading.Event()
    outcome: dict[str, object] = {}

    def second() -> None:
        try:
            first_synced.wait(10)
            with sessions.begin() as s:
                assert state.finish_run(s, run_ids[1], owner="b", status="succeeded")
                outcome["second"] = state.sync_experiment(s, exp_id)
        except BaseException as exc:  # reported by the main thread
            outcome["error"] = exc
        finally:
            second_done.set()

    thread = threading.Thread(target=second)
    thread.start()
    with sessions.begin() as s:
        assert state.finish_run(s, run_ids[0], owner="a", status="succeeded")
        outcome["first"] = state.sync_experiment(s, exp_id)  # run b still running here
        first_synced.set()
        # the second transaction has its UPDATE and its count ready to go; it must wait
        assert not second_done.wait(1.0)
    thread.join(30)
    assert "error" not in outcome, outcome.get("error")
    assert outcome["first"] == "running" and outcome["second"] == "succeeded"
    assert _experiment(sessions, exp_id).status == "succeeded"
