"""Durability of the embedded default and of the broker (issue 10, items 3-6 and 13).

Real processes: ``hsl serve`` on an ext4 filesystem of its own (a loop device mounted on
``./.hsl/``, see loopfs.py) that loses power or turns read-only; ``hsl api``, Celery workers
and the reaper against PostgreSQL and a private Redis that evicts or fills up.

``HSL_TEST_SQLITE_SYNCHRONOUS=NORMAL`` runs the two disk scenarios with the old setting:
they must then fail (acknowledged experiments lost), and pass with the default FULL.
"""

from __future__ import annotations

import errno
import os
import re
import time

import httpx
import redis
from sqlalchemy import select

from service.db import Point, Run, make_engine, make_session_factory
from tests.integration.processes import wait_until

from .loopfs import LoopFS
from .stack import TINY_SPEC, variant

SYNCHRONOUS = os.environ.get("HSL_TEST_SQLITE_SYNCHRONOUS")
DISK_SETTINGS = {
    "embedded_workers": 0,
    **({"sqlite_synchronous": SYNCHRONOUS} if SYNCHRONOUS else {}),
}


def _submit(client: httpx.Client, i: int) -> httpx.Response:
    return client.post("/v1/experiments", json=variant(TINY_SPEC, i))


def _found(client: httpx.Client, ids: list[str]) -> int:
    return sum(client.get(f"/v1/experiments/{i}").status_code == 200 for i in ids)


def test_r2_03_power_loss_right_after_201_loses_no_acknowledged_experiment(
    loopfs: LoopFS, tmp_path, start_server, scenario
):
    sc = scenario("r2-03-power-loss-after-201")
    folder = tmp_path / "serve"
    loopfs.mount(folder / ".hsl")
    server = start_server("serve", **DISK_SETTINGS)
    (key,) = server.keys("lab")
    with server.client(key) as c:
        ids = []
        for i in range(5):
            r = _submit(c, i)
            assert r.status_code == 201, r.text
            ids.append(r.json()["id"])
        acked = time.monotonic()
    time.sleep(2.0)  # the red team's 2 s: well inside the kernel's 30 s dirty expiry
    # power loss: the CPU stops (SIGKILL) and the device keeps what it had received
    for proc in server.procs.procs:
        proc.kill()
    lost_at = time.monotonic() - acked
    snap = tmp_path / "after-power-loss.img"
    copy_seconds = loopfs.snapshot(snap)
    loopfs.umount()
    fsck = loopfs.fsck(snap)
    loopfs.mount(folder / ".hsl", image=snap)
    server.restart()
    scenario.database(server.database_url)
    scenario.service(server.url)
    with server.client(key) as c:
        kept = _found(c, ids)
    sc.figures.update(
        sqlite_synchronous=SYNCHRONOUS or "FULL",
        accepted_201=len(ids),
        kept_after_power_loss=kept,
        seconds_from_last_201_to_power_loss=round(lost_at, 2),
        snapshot_copy_seconds=round(copy_seconds, 3),
        e2fsck_status=fsck,
        technique="ext4 on a loop device; its image copied after SIGKILL (dirty pages not on it)",
    )
    assert kept == len(ids), f"{len(ids) - kept} of {len(ids)} acknowledged experiments lost"


def test_r2_04_a_read_only_episode_loses_nothing_and_readyz_says_not_ready(
    loopfs: LoopFS, tmp_path, start_server, scenario
):
    sc = scenario("r2-04-read-only-episode")
    folder = tmp_path / "serve"
    loopfs.mount(folder / ".hsl")
    server = start_server("serve", **DISK_SETTINGS)
    (key,) = server.keys("lab")
    accepted: list[str] = []
    during: dict[int, int] = {}
    with server.client(key) as c:
        for i in range(3):
            r = _submit(c, i)
            assert r.status_code == 201, r.text
            accepted.append(r.json()["id"])
        loopfs.trigger_error()  # an I/O error: ext4 aborts its journal, turns read-only
        started = time.monotonic()
        readyz = []
        i = 100
        while time.monotonic() - started < 3.0:
            r = _submit(c, i)
            during[r.status_code] = during.get(r.status_code, 0) + 1
            if r.status_code == 201:  # acknowledged: it must survive as well
                accepted.append(r.json()["id"])
            else:
                assert r.status_code == 503 and "Retry-After" in r.headers, r.text
            readyz.append(httpx.get(f"{server.url}/readyz", timeout=10))
            i += 1
            time.sleep(0.2)
    stop_started = time.monotonic()
    for proc in server.procs.procs:
        proc.stop()
    stop_seconds = time.monotonic() - stop_started
    loopfs.umount()
    fsck = loopfs.fsck()
    loopfs.mount(folder / ".hsl")
    server.restart()
    scenario.database(server.database_url)
    scenario.service(server.url)
    with server.client(key) as c:
        kept = _found(c, accepted)
    not_ready = sum(r.status_code == 503 for r in readyz)
    sc.figures.update(
        sqlite_synchronous=SYNCHRONOUS or "FULL",
        accepted_before_episode=3,
        answers_during_episode=during,
        readyz_503_during_episode=f"{not_ready}/{len(readyz)}",
        readyz_detail=readyz[-1].json().get("detail") if readyz else None,
        seconds_to_stop_on_read_only_disk=round(stop_seconds, 2),
        e2fsck_status=fsck,
        kept_after_repair=f"{kept}/{len(accepted)}",
    )
    assert kept == len(accepted), f"{len(accepted) - kept} acknowledged experiments lost"
    assert not_ready == len(readyz), [r.text for r in readyz]


def test_r2_13_readyz_is_not_ready_on_a_full_or_read_only_disk(
    loopfs: LoopFS, tmp_path, start_server, scenario
):
    sc = scenario("r2-13-readyz-disk")
    folder = tmp_path / "serve"
    loopfs.mount(folder / ".hsl")
    server = start_server("serve", threads=1)
    scenario.database(server.database_url)
    scenario.service(server.url)
    (key,) = server.keys("lab")

    def ready() -> httpx.Response:
        return httpx.get(f"{server.url}/readyz", timeout=10)

    assert ready().status_code == 200
    filler = folder / ".hsl" / "filler"
    chunk = b"\0" * (1 << 20)
    with open(filler, "wb") as f:  # fill the filesystem to the last block
        try:
            while True:
                f.write(chunk)
                f.flush()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
    full = ready()
    with server.client(key) as c:
        submit_full = _submit(c, 1)
    filler.unlink()
    freed = wait_until(lambda: ready().status_code == 200, 10, "ready after freeing space")
    if submit_full.status_code == 201:  # accepted on the last free blocks: it must complete
        with server.client(key) as c:
            doc = c.get(f"/v1/experiments/{submit_full.json()['id']}").json()
            deadline = time.monotonic() + 30
            while doc["status"] != "succeeded" and time.monotonic() < deadline:
                time.sleep(0.2)
                doc = c.get(f"/v1/experiments/{submit_full.json()['id']}").json()
            assert doc["status"] == "succeeded", doc
    # read-only: an ext4 error (a clean 'mount -o remount,ro' is refused while SQLite has
    # the database open for writing)
    loopfs.trigger_error()
    read_only = ready()
    for proc in server.procs.procs:
        proc.stop()
    loopfs.umount()
    loopfs.fsck()
    loopfs.mount(folder / ".hsl")
    server.restart()
    again = ready()
    sc.figures.update(
        full={"status": full.status_code, "detail": full.json().get("detail")},
        submit_on_full_disk=submit_full.status_code,
        ready_after_freeing_space=bool(freed),
        read_only={"status": read_only.status_code, "detail": read_only.json().get("detail")},
        ready_after_repair=again.status_code,
    )
    assert full.status_code == 503 and "disk" in full.json()["detail"], full.text
    assert read_only.status_code == 503 and "disk" in read_only.json()["detail"], read_only.text
    assert again.status_code == 200


LONG_SPEC = {
    "name": "long-points",
    "model": {"d": 30, "q": 2, "epsilon": 0.5, "features": "gaussian"},
    # about 1 s, 1 s and 6 s a point on one thread: SIGTERM lands inside the third
    "sweep": {"n_values": [2000, 4000, 120000], "seeds": 1, "seed": 7, "n_test": 500},
    "methods": [{"name": "layerwise_spectral"}],
}


def test_r2_05_sigterm_of_the_embedded_service_gives_a_long_run_back(
    tmp_path, start_server, scenario
):
    sc = scenario("r2-05-sigterm-embedded-long-run")
    grace = 1.0
    server = start_server("serve", threads=1, shutdown_grace_seconds=grace, lease_seconds=30)
    scenario.database(server.database_url)
    scenario.service(server.url)
    (key,) = server.keys("lab")
    engine = make_engine(server.database_url)
    sessions = make_session_factory(engine)

    def run() -> Run:
        with sessions() as s:
            return s.execute(select(Run)).scalar_one()

    def stored() -> set[int]:
        with sessions() as s:
            return set(s.execute(select(Point.n)).scalars())

    try:
        with server.client(key) as c:
            r = c.post("/v1/experiments", json=LONG_SPEC)
            assert r.status_code == 201, r.text
            exp_id = r.json()["id"]
        wait_until(lambda: len(stored()) >= 2, 60, "two points stored", server.procs)
        exits, states = [], []
        for _ in range(3):
            time.sleep(1.0)  # inside the 6 s point
            assert run().status == "running" and len(stored()) == 2
            started = time.monotonic()
            for proc in server.procs.procs:
                proc.stop()  # SIGTERM, as an operator or an orchestrator would
            exits.append(round(time.monotonic() - started, 2))
            after = run()
            states.append((after.status, after.attempts))
            assert after.status == "queued" and after.attempts == 0, (after.status, after.attempts)
            server.restart(threads=1, shutdown_grace_seconds=grace)
            wait_until(lambda: run().status == "running", 30, "the run claimed again")
        with server.client(key) as c:
            doc = c.get(f"/v1/experiments/{exp_id}").json()
            deadline = time.monotonic() + 60
            while doc["status"] not in ("succeeded", "failed") and time.monotonic() < deadline:
                time.sleep(0.3)
                doc = c.get(f"/v1/experiments/{exp_id}").json()
        logs = "".join(p.log_path.read_text(errors="replace") for p in server.procs.procs)
        recomputed = len(re.findall(r"was already stored \(computed again\)", logs))
        given_back = logs.count("given back mid-point")
        at_boundary = logs.count("shutdown: stopped at a point boundary")
        claims = [int(n) for n in re.findall(r"attempt \d+, (\d+) points stored", logs)]
        final = run()
    finally:
        engine.dispose()
    sc.figures.update(
        shutdown_grace_seconds=grace,
        seconds_sigterm_to_exit=exits,
        run_after_each_exit=[f"{s}, attempts {a}" for s, a in states],
        given_back_mid_point=given_back,
        given_back_at_point_boundary=at_boundary,
        points_stored_at_each_claim=claims,
        stored_points_recomputed=recomputed,
        final_status=doc["status"],
        final_attempts=final.attempts,
    )
    assert doc["status"] == "succeeded", doc
    assert max(exits) < grace + 5, exits  # was 10-16 s
    assert given_back >= 1 and given_back + at_boundary == 3 and recomputed == 0
    assert claims == [0, 2, 2, 2] and final.attempts == 1


# --- the broker ------------------------------------------------------------------------


def _fill(client: redis.Redis, kilobytes: int, prefix: str) -> int:
    """Write ``kilobytes`` of other keys, 10 KB each; returns how many were written."""
    pipe = client.pipeline(transaction=False)
    n = kilobytes // 10
    for i in range(n):
        pipe.set(f"{prefix}:{i}", b"x" * 10_240)
    pipe.execute()
    return n


def test_r2_06_evicted_queued_messages_are_noticed_and_published_again(
    stack, scenario, redis_server
):
    sc = scenario("r2-06-redis-eviction")
    st = stack().start(workers=0)
    reaper = next(p for p in st.procs.procs if p.name == "reaper")
    # its first sweep republishes everything queued: let it pass before the eviction
    wait_until(lambda: "reaper: every" in reaper.log_path.read_text(), 30, "the reaper", st.procs)
    time.sleep(1.5)
    r = redis.Redis.from_url(redis_server.url)
    ids = [st.submit(variant(TINY_SPEC, i)) for i in range(20)]
    assert r.llen("cpu") == 20
    used = int(r.info("memory")["used_memory"])
    r.config_set("maxmemory", used + (2 << 20))
    r.config_set("maxmemory-policy", "allkeys-lru")
    not_ready = st.client.get("/readyz")
    written = 0
    for _ in range(4):  # 6000 KB of other keys, more until the queue's list is gone
        written += _fill(r, 6000, f"other{written}")
        if not r.exists("cpu"):
            break
    evicted_at = time.monotonic()
    assert not r.exists("cpu"), "the queue's list survived the eviction"
    with st.sessions() as s:
        queued = s.execute(select(Run).where(Run.status == "queued")).scalars().all()
    assert len(queued) == 20
    republished = st.wait_for(
        lambda: r.llen("cpu") >= 20,
        timeout=30,
        interval=0.1,
        what="the lost messages published again",
    )
    worker = st.worker()
    for exp_id in ids:
        assert st.wait(exp_id, timeout=120)["status"] == "succeeded"
    all_done = time.monotonic() - evicted_at
    worker_warned = "maxmemory-policy is allkeys-lru" in worker.log_path.read_text()
    r.config_set("maxmemory-policy", "noeviction")
    r.config_set("maxmemory", 0)
    ready_again = st.client.get("/readyz").status_code
    sc.figures.update(
        queued_messages_evicted=20,
        other_keys_kb=written * 10,
        seconds_eviction_to_republish=round(republished, 2),
        seconds_eviction_to_all_20_succeeded=round(all_done, 2),
        readyz_under_allkeys_lru=not_ready.status_code,
        readyz_detail=not_ready.json().get("detail"),
        readyz_after_noeviction=ready_again,
        worker_warned_at_start=worker_warned,
    )
    assert not_ready.status_code == 503 and "maxmemory-policy" in not_ready.json()["detail"]
    assert republished < 5 and ready_again == 200 and worker_warned
    assert st.log_count("publishing them again") >= 1
    scenario.service(st.url)


def test_r2_13_a_worker_started_on_a_full_redis_waits_instead_of_exiting(
    stack, scenario, redis_server
):
    sc = scenario("r2-13-worker-start-redis-oom")
    st = stack().start(workers=0)
    r = redis.Redis.from_url(redis_server.url)
    used = int(r.info("memory")["used_memory"])
    r.config_set("maxmemory-policy", "noeviction")
    r.config_set("maxmemory", used + (1 << 20))
    try:
        _fill(r, 4000, "other")
        raise AssertionError("Redis took 4 MB over its maxmemory")
    except redis.exceptions.OutOfMemoryError:
        pass
    exp_id = st.submit(TINY_SPEC)  # its publish fails (OOM): the reaper retries it
    worker = st.worker()
    # the worker must say it waits and stay alive; on a loaded machine its start alone can
    # take several seconds, so look for the line for up to 60 s, then 5 s more alive
    deadline = time.monotonic() + 60.0
    waiting = False
    while time.monotonic() < deadline and worker.popen.poll() is None:
        log = worker.log_path.read_text(errors="replace")
        if waiting := "refuses writes (OOM)" in log:
            break
        time.sleep(0.5)
    time.sleep(5.0)
    alive = worker.popen.poll() is None
    log = worker.log_path.read_text(errors="replace")
    freed = time.monotonic()
    r.config_set("maxmemory", 0)
    doc = st.wait(exp_id, timeout=60)
    done = time.monotonic() - freed
    sc.figures.update(
        worker_alive_after_5s_at_maxmemory=alive,
        logged_waiting=waiting,
        unrecoverable_error="Unrecoverable error" in log,
        seconds_from_memory_freed_to_succeeded=round(done, 2),
        final_status=doc["status"],
    )
    assert alive and waiting, log[-3000:]
    assert doc["status"] == "succeeded", doc
    scenario.service(st.url)
