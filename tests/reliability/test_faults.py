"""Faults the stack must survive (issue 4, items 1-8): real PostgreSQL, Redis, uvicorn and
Celery worker processes on loopback, killed or stopped at chosen points."""

from __future__ import annotations

import os
import signal
import time

import httpx

from .stack import SLOW_SPEC, TINY_SPEC, variant


def _points_by_attempt(points):
    out = {}
    for p in points:
        out.setdefault(p.attempt, set()).add(p.n)
    return out


def test_01_sigkill_the_process_executing_a_run(stack, scenario):
    scenario("01-sigkill-task-process")
    st = stack().start(workers=1)
    exp_id = st.submit(SLOW_SPEC)
    st.wait_for(lambda: len(st.points(exp_id)) >= 1, what="a first point")
    run = st.running_run(exp_id)
    _, pid = st.worker_of(run)
    stored_before = {p.n for p in st.points(exp_id)}
    os.kill(pid, signal.SIGKILL)  # the pool process only; the worker's main process lives
    killed = time.monotonic()
    st.wait_for(
        lambda: st.runs(exp_id)[0].attempts >= 2,
        timeout=60,
        interval=0.1,
        what="the run claimed again",
    )
    resumed = time.monotonic() - killed
    doc = st.wait(exp_id)
    assert doc["status"] == "succeeded", doc
    by_attempt = _points_by_attempt(st.points(exp_id))
    recomputed = len(by_attempt.get(2, set()) & stored_before)
    assert by_attempt[1] >= stored_before and recomputed == 0
    assert sorted(by_attempt[1] | by_attempt.get(2, set())) == SLOW_SPEC["sweep"]["n_values"]
    bound = 3 + 1 + 5  # lease + reaper interval + republish and pick-up slack
    assert resumed < bound
    scenario.figures.update(
        seconds_to_resumption=round(resumed, 2),
        bound_seconds=bound,
        points_stored_before_kill=len(stored_before),
        points_recomputed=recomputed,
        attempts=st.runs(exp_id)[0].attempts,
    )
    scenario.service(st.url)


def test_02_sigkill_a_whole_worker_and_start_a_new_one(stack, scenario):
    scenario("02-sigkill-whole-worker")
    st = stack().start(workers=1)
    exp_id = st.submit(SLOW_SPEC)
    st.wait_for(lambda: len(st.points(exp_id)) >= 1, what="a first point")
    victim, _ = st.worker_of(st.running_run(exp_id))
    victim.kill(signal.SIGKILL)
    killed = time.monotonic()
    st.worker()
    st.wait_for(
        lambda: st.runs(exp_id)[0].attempts >= 2,
        timeout=150,
        interval=0.1,
        what="the run claimed again",
    )
    recovered = time.monotonic() - killed
    doc = st.wait(exp_id)
    assert doc["status"] == "succeeded", doc
    # lease (3 s) + reaper interval (1 s) + a new worker's start-up; kombu alone: ~100 s
    bound = 3 + 1 + 15
    assert recovered < bound, recovered
    scenario.figures.update(seconds_to_recovery=round(recovered, 2), bound_seconds=bound)
    scenario.service(st.url)


def test_03_duplicate_deliveries_execute_once(stack, scenario):
    scenario("03-duplicate-delivery")
    st = stack().start(workers=2)
    exp_id = st.submit(SLOW_SPEC)
    run_id = st.runs(exp_id)[0].id
    from service.config import Settings
    from worker.celery_app import TASK_NAME, make_celery

    app = make_celery(Settings(broker_url=st.settings["HSL_BROKER_URL"]))
    for _ in range(2):  # the same run, twice more, at once
        app.send_task(TASK_NAME, args=[run_id], queue="cpu")
    doc = st.wait(exp_id)
    assert doc["status"] == "succeeded", doc
    st.wait_for(
        lambda: st.log_count("nothing_to_do") >= 2,
        timeout=30,
        what="the duplicate deliveries handled",
    )
    executions = st.claims(run_id)
    assert executions == 1 and st.runs(exp_id)[0].attempts == 1
    assert len(st.points(exp_id)) == len(SLOW_SPEC["sweep"]["n_values"])
    scenario.figures.update(
        deliveries=3,
        duplicate_executions=executions - 1,
        nothing_to_do=st.log_count("nothing_to_do"),
    )
    scenario.service(st.url)


def test_03b_a_run_that_outlives_the_visibility_timeout(stack, scenario):
    scenario("03b-visibility-timeout")
    st = stack(HSL_VISIBILITY_TIMEOUT_SECONDS=2, HSL_LEASE_SECONDS=30).start(workers=2)
    exp_id = st.submit(variant(SLOW_SPEC, 7))
    doc = st.wait(exp_id)
    assert doc["status"] == "succeeded", doc
    run_id = st.runs(exp_id)[0].id
    executions = st.claims(run_id)
    redelivered = st.log_count("nothing_to_do")
    assert executions == 1 and st.runs(exp_id)[0].attempts == 1
    scenario.figures.update(
        visibility_timeout_seconds=2,
        run_seconds=round(sum(p.seconds for p in st.points(exp_id)), 1),
        redeliveries_seen=redelivered,
        duplicate_executions=executions - 1,
    )
    scenario.service(st.url)


def test_04_redis_restarted_empty_while_work_is_queued_and_running(stack, scenario, redis_server):
    scenario("04-redis-restart-empty")
    st = stack().start(workers=1)
    ids = [st.submit(variant(SLOW_SPEC, i, n_values=[2000, 8000, 30000])) for i in range(3)]
    st.wait_for(lambda: any(st.running_run(i) for i in ids), what="a running run")
    # the reaper must know the broker before it restarts, or its first look sees only the
    # new one (it then republishes everything queued as a new reaper does, undetected)
    st.wait_for(lambda: st.log_count("reaper: watching the broker") >= 1, what="the reaper")
    redis_server.stop(signal.SIGKILL)
    redis_server.start()  # same port, empty: every queued message is gone
    restarted = time.monotonic()
    docs = [st.wait(i, timeout=300) for i in ids]
    recovered = sum(d["status"] == "succeeded" for d in docs)
    assert recovered == len(ids), docs
    # found by the broker's new identity, not by the hour-long republish backstop
    detected = st.log_count("the broker restarted")
    assert detected >= 1
    scenario.figures.update(
        submitted=len(ids),
        recovered=recovered,
        restart_detected_by_reaper=detected >= 1,
        seconds_to_all_done=round(time.monotonic() - restarted, 1),
    )
    scenario.service(st.url)


def test_05_broker_down_at_submit_time(stack, scenario, redis_server):
    scenario("05-broker-down-at-submit")
    st = stack().start(workers=1)
    redis_server.stop(signal.SIGKILL)
    ids, codes, latencies = [], [], []
    for i in range(3):
        t0 = time.monotonic()
        r = st.client.post("/v1/experiments", json=variant(TINY_SPEC, i))
        latencies.append(time.monotonic() - t0)
        codes.append(r.status_code)
        assert r.status_code in (201, 503), r.text
        assert r.status_code == 201 or r.headers["content-type"] == "application/problem+json"
        if r.status_code == 201:
            ids.append(r.json()["id"])
    ready = st.client.get("/readyz")
    assert ready.status_code == 503
    assert ready.headers["content-type"] == "application/problem+json"
    redis_server.start()
    docs = [st.wait(i, timeout=180) for i in ids]
    assert all(d["status"] == "succeeded" for d in docs), docs
    scenario.figures.update(
        accepted=len(ids),
        answered_503=codes.count(503),
        completed=sum(d["status"] == "succeeded" for d in docs),
        max_submit_seconds_while_down=round(max(latencies), 2),
    )
    scenario.service(st.url)


def test_06_postgresql_stopped_during_writes(private_postgres, stack, scenario):
    scenario("06-postgres-stopped-10s")
    st = stack(db_url=private_postgres.url, HSL_LEASE_SECONDS=30).start(workers=1)
    exp_id = st.submit(SLOW_SPEC)
    st.wait_for(lambda: len(st.points(exp_id)) >= 1, what="a first point")
    st.engine.dispose()
    private_postgres.stop()
    stopped = time.monotonic()
    codes, transport_errors = [], 0
    while time.monotonic() - stopped < 10:
        try:
            r = st.client.get(f"/v1/experiments/{exp_id}", timeout=10)
            codes.append(r.status_code)
            if r.status_code >= 500:
                assert r.status_code == 503, r.text
                assert r.headers["content-type"] == "application/problem+json"
        except httpx.TransportError:
            transport_errors += 1
        time.sleep(0.5)
    private_postgres.start()
    started = time.monotonic()
    while st.client.get(f"/v1/experiments/{exp_id}").status_code != 200:
        time.sleep(0.1)
    recover = time.monotonic() - started
    doc = st.wait(exp_id)
    assert doc["status"] == "succeeded", doc
    ns = [p.n for p in st.points(exp_id)]
    assert sorted(ns) == SLOW_SPEC["sweep"]["n_values"]  # none lost, none doubled
    failed = sum(c not in (200, 503) for c in codes) + transport_errors
    assert failed == 0 and 503 in codes
    scenario.figures.update(
        requests_during_outage=len(codes) + transport_errors,
        answered_503=codes.count(503),
        failed_requests=failed,
        seconds_to_recover=round(recover, 2),
    )
    scenario.service(st.url)


def test_07_worker_killed_after_storing_a_point_before_acknowledging(stack, scenario):
    scenario("07-kill-between-store-and-ack")
    st = stack().start(workers=1)
    exp_id = st.submit(SLOW_SPEC)
    st.wait_for(lambda: len(st.points(exp_id)) >= 2, interval=0.005, what="a stored point")
    victim, _ = st.worker_of(st.running_run(exp_id))
    victim.kill(signal.SIGKILL)  # right after a commit, long before the task's ack
    stored_before = {p.n: (p.id, p.attempt) for p in st.points(exp_id)}
    st.worker()
    doc = st.wait(exp_id)
    assert doc["status"] == "succeeded", doc
    after = {p.n: (p.id, p.attempt) for p in st.points(exp_id)}
    unchanged = all(after[n] == v for n, v in stored_before.items())
    recomputed = sum(1 for n, (_, a) in after.items() if n in stored_before and a > 1)
    assert unchanged and recomputed == 0
    assert "points stored" in st.workers[-1].log_path.read_text()
    scenario.figures.update(
        points_stored_before_kill=len(stored_before),
        points_recomputed=recomputed,
        points_total=len(after),
    )
    scenario.service(st.url)


def test_08_memory_and_time_limits_fail_the_run_not_the_worker(stack, scenario):
    scenario("08-resource-limits")
    # 12 s: the hog must reach its allocation within the limit even on a loaded machine
    # (at load 10 it took more than 4 s and failed on time instead). The slow run must take
    # well beyond it however fast the engine and the host get: Gaussian d = 30 up to
    # n = 250000 took 6-8 s with engine 0.7.1 on a quick spell of the 2-core host (and
    # ~30 s when this test was written), so this scenario failed when the run succeeded in
    # time. Now the dense solver on Hermite d = 56 (D = 1596, its sums 4 D^2 flops a
    # sample: 4.5e12 flops by the estimate, quoted 2 min; its first two points took 8.4 s
    # and 8.5 s here), 0.82 GiB by the estimate: far inside the 3 GiB, so it fails on
    # time, never on memory.
    st = stack(HSL_MEMORY_LIMIT_BYTES=3 * 2**30, HSL_RUN_TIME_LIMIT=12).start(workers=1)
    # Samples stream beyond a budget now, so a large n no longer hogs memory. The dense
    # solver's two D x D sums at d = 200 (D = 20100) take 6.5 GB at once: within the
    # service's 64 GiB estimate limit, beyond the worker's 3 GiB address space.
    hog = {
        **SLOW_SPEC,
        "name": "hog",
        "model": {"d": 200, "q": 2, "features": "hermite"},
        "sweep": {**SLOW_SPEC["sweep"], "n_values": [500]},
        "solver": {"eigensolver": "dense"},
    }
    slow = {
        **variant(SLOW_SPEC, 3, n_values=[100000, 200000, 300000, 400000]),
        "model": {"d": 56, "q": 2, "epsilon": 0.5, "features": "hermite"},
        "solver": {"eigensolver": "dense"},
    }
    small = variant(TINY_SPEC, 1)
    hog_id, slow_id = st.submit(hog), st.submit(slow)
    hog_doc, slow_doc = st.wait(hog_id), st.wait(slow_id)
    small_doc = st.wait(st.submit(small))
    assert hog_doc["status"] == "failed" and hog_doc["error"]["reason"] == "resource_exhausted"
    assert slow_doc["status"] == "failed" and slow_doc["error"]["reason"] == "timeout"
    assert small_doc["status"] == "succeeded"  # the same worker goes on serving
    attempts = [st.runs(hog_id)[0].attempts, st.runs(slow_id)[0].attempts]
    assert attempts == [1, 1]  # never retried
    scenario.figures.update(
        memory_limit_bytes=3 * 2**30,
        time_limit_seconds=12,
        memory_hog=hog_doc["error"]["reason"],
        too_slow=slow_doc["error"]["reason"],
        attempts=attempts,
        worker_still_serving=small_doc["status"] == "succeeded",
    )
    scenario.service(st.url)
