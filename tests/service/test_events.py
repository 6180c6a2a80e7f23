"""``GET /v1/experiments/{id}/events``: Server-Sent Events from the database, against a real
server (uvicorn in a thread, `live.py`) on a real database, runs executed by the worker's own
function."""

from __future__ import annotations

import threading
import time
from typing import Any

import httpx
import pytest
from sqlalchemy import event

from hsl.client import _sse

from .api import assert_problem, execute_all, tiny_spec
from .conftest import both_databases


def events_of(r: httpx.Response) -> list[Any]:
    assert r.status_code == 200, r.read()
    assert r.headers["content-type"].startswith("text/event-stream")
    return list(_sse(r.iter_lines()))


def submit(c: httpx.Client, **top: Any) -> dict[str, Any]:
    r = c.post("/v1/experiments", json=tiny_spec(**top))
    assert r.status_code == 201, r.text
    return r.json()


def wait_until(predicate, what: str, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


@both_databases
def test_a_finished_experiment_replays_every_point_once_then_its_status_and_ends(live):
    server = live()
    with server.client(server.key("alice")) as c:
        exp = submit(c)
        assert set(execute_all(server.app, exp["id"])) == {"succeeded"}
        with c.stream("GET", f"/v1/experiments/{exp['id']}/events") as r:
            events = events_of(r)
        results = c.get(f"/v1/experiments/{exp['id']}/results").json()
    points = [e for e in events if e.event == "point"]
    assert [e.event for e in events] == ["point"] * len(points) + ["status"]
    ids = [int(e.id) for e in points]
    assert ids == sorted(set(ids))  # monotone, each once
    assert len(points) == exp["progress"]["points_total"]
    key = lambda p: (p["method"], p["seed"], p["n"])  # noqa: E731
    assert sorted(map(key, (e.data for e in points))) == sorted(map(key, results["points"]))
    by_key = {key(p): p for p in results["points"]}
    for e in points:  # the point as in the results document
        assert e.data == by_key[key(e.data)]
    final = events[-1]
    assert final.data["status"] == "succeeded" and final.id == points[-1].id
    assert final.data["progress"]["points_done"] == len(points)


def test_last_event_id_resumes_after_that_point(live):
    server = live()
    with server.client(server.key("alice")) as c:
        exp = submit(c)
        execute_all(server.app, exp["id"])
        url = f"/v1/experiments/{exp['id']}/events"
        with c.stream("GET", url) as r:
            everything = [e for e in events_of(r) if e.event == "point"]
        k = 1
        with c.stream("GET", url, headers={"Last-Event-ID": everything[k].id}) as r:
            resumed = events_of(r)
        with c.stream("GET", url, params={"last_event_id": everything[-1].id}) as r:
            at_end = events_of(r)
    assert [e.id for e in resumed if e.event == "point"] == [e.id for e in everything[k + 1 :]]
    assert resumed[-1].event == "status" and resumed[-1].data["status"] == "succeeded"
    assert [e.event for e in at_end] == ["status"]


def test_points_stream_live_across_api_processes_while_the_runs_execute(live):
    """Server B streams what is stored through server A's sessions (another process's
    engine and pool): events come from the database, not from memory."""
    a = live()
    b = live(database_url=str(a.app.state.settings.database_url))
    key = a.key("alice")
    with a.client(key) as ca, b.client(key) as cb:
        exp = submit(ca)
        seen: list[Any] = []
        worker_error: list[BaseException] = []

        def work() -> None:
            try:
                execute_all(a.app, exp["id"])
            except BaseException as exc:  # pragma: no cover - reported below
                worker_error.append(exc)

        worker = threading.Thread(target=work)
        with cb.stream("GET", f"/v1/experiments/{exp['id']}/events") as r:
            for e in _sse(r.iter_lines()):
                seen.append(e)
                if len(seen) == 1:
                    assert e.event == "status" and e.data["status"] == "queued"
                    worker.start()  # the runs execute only once the stream is open
        worker.join()
    assert not worker_error, worker_error
    points = [e for e in seen if e.event == "point"]
    statuses = [e.data["status"] for e in seen if e.event == "status"]
    assert len(points) == exp["progress"]["points_total"]
    assert len({e.id for e in points}) == len(points)
    assert statuses[0] == "queued" and statuses[-1] == "succeeded"
    assert len(statuses) >= 2


def test_other_tenants_unknown_ids_and_missing_keys_are_refused(live):
    server = live()
    alice, bob = server.key("alice"), server.key("bob")
    with server.client(alice) as c:
        exp = submit(c)
    url = f"/v1/experiments/{exp['id']}/events"
    with server.client(bob) as c:
        theirs = c.get(url)
        unknown = c.get(f"/v1/experiments/{'0' * 32}/events")
        malformed = c.get("/v1/experiments/not-an-id/events")
    with server.client() as c:
        keyless = c.get(url)
    body = assert_problem(theirs, 404, "not-found")
    assert body["detail"] == assert_problem(unknown, 404, "not-found")["detail"].replace(
        "0" * 32, exp["id"]
    )
    assert_problem(malformed, 404, "not-found")
    assert_problem(keyless, 401, "unauthorized")


def test_streams_are_capped_per_tenant_and_per_process_and_freed_on_disconnect(live):
    server = live(max_event_streams=2, max_event_streams_per_tenant=1)
    alice, bob, carol = server.key("alice"), server.key("bob"), server.key("carol")
    with server.client(alice) as ca, server.client(bob) as cb, server.client(carol) as cc:
        ea, eb, ec = submit(ca), submit(cb), submit(cc)
        slots = lambda: server.app.state.event_slots  # noqa: E731
        with ca.stream("GET", f"/v1/experiments/{ea['id']}/events") as first:
            assert first.status_code == 200
            assert_problem(ca.get(f"/v1/experiments/{ea['id']}/events"), 429, "too-many-streams")
            with cb.stream("GET", f"/v1/experiments/{eb['id']}/events") as second:
                assert second.status_code == 200
                full = cc.get(f"/v1/experiments/{ec['id']}/events")
                body = assert_problem(full, 503, "overloaded")
                assert "HSL_MAX_EVENT_STREAMS" in body["detail"]
                assert int(full.headers["retry-after"]) >= 1
                assert slots().count == 2
        # both clients went away: their slots are free again
        wait_until(lambda: slots().count == 0, "the slots of closed streams to be released")
        with cc.stream("GET", f"/v1/experiments/{ec['id']}/events") as again:
            assert again.status_code == 200


def test_open_streams_hold_no_request_slot_and_one_query_per_poll_serves_them_all(live):
    # one request at a time: a stream that kept its slot would make the rest wait for it,
    # then shed them (503); the wait is long so that a loaded machine does not shed them
    server = live(max_active_requests=1, queue_wait_seconds=30, max_event_streams_per_tenant=8)
    key = server.key("alice")
    with server.client(key) as c:
        exps = [submit(c, name=f"e{i}") for i in range(4)]
        engine = server.app.state.engine
        statements: list[str] = []

        def count(conn, cursor, statement, *args: Any) -> None:
            statements.append(statement)

        clients = [server.client(key) for _ in exps]
        streams = [
            cl.stream("GET", f"/v1/experiments/{e['id']}/events") for cl, e in zip(clients, exps)
        ]
        opened = [s.__enter__() for s in streams]
        try:
            assert all(r.status_code == 200 for r in opened)
            for _ in range(3):  # ordinary requests are still served
                assert c.get(f"/v1/experiments/{exps[0]['id']}").status_code == 200
            hub = server.app.state.event_hub
            wait_until(lambda: set(hub.watchers) == {e["id"] for e in exps}, "4 watched")
            event.listen(engine, "before_cursor_execute", count)
            try:
                start = hub.polls
                wait_until(lambda: hub.polls >= start + 5, "5 polls")
                polls = hub.polls - start
                made = len(statements)
            finally:
                event.remove(engine, "before_cursor_execute", count)
        finally:
            for s in streams:
                s.__exit__(None, None, None)
            for cl in clients:
                cl.close()
    # nothing changed: each poll is one query for the 4 streams (one poll may be under way
    # at either end of the window: at the start, its query ran before the listener was added
    # and its count came after ``start`` was read; at the end, the reverse)
    assert polls - 1 <= made <= polls + 2, (polls, made, statements[:5])


def test_quiet_streams_send_heartbeats_and_a_deleted_experiment_ends_its_stream(live):
    server = live(events_heartbeat_seconds=0.1)
    with server.client(server.key("alice")) as c:
        exp = submit(c)
        lines: list[str] = []
        with c.stream("GET", f"/v1/experiments/{exp['id']}/events") as r:
            it = r.iter_lines()
            while sum(line == ": keep-alive" for line in lines) < 2:
                lines.append(next(it))
            assert c.delete(f"/v1/experiments/{exp['id']}").status_code == 204
            lines.extend(it)  # ends: the experiment is gone
    assert lines[0] == "retry: 2000"
    assert "event: status" in lines
    assert not any(line == "event: point" for line in lines)


def test_a_graceful_shutdown_closes_open_streams(live):
    server = live()
    with server.client(server.key("alice")) as c:
        exp = submit(c)
        with c.stream("GET", f"/v1/experiments/{exp['id']}/events") as r:
            it = _sse(r.iter_lines())
            assert next(it).event == "status"
            server.server.should_exit = True
            # closed by the server (mid-body: the client reconnects), not left open until
            # the graceful timeout (60 s here)
            with pytest.raises(httpx.RemoteProtocolError):
                next(it)
    server.thread.join(30)
    assert not server.thread.is_alive()


def test_a_cancel_ends_the_stream_with_the_cancelled_status(live):
    server = live()
    with server.client(server.key("alice")) as c:
        exp = submit(c)
        with c.stream("GET", f"/v1/experiments/{exp['id']}/events") as r:
            events = []
            for e in _sse(r.iter_lines()):
                events.append(e)
                if len(events) == 1:
                    assert c.post(f"/v1/experiments/{exp['id']}/cancel").status_code == 200
    assert [e.event for e in events] == ["status", "status"]
    assert events[0].data["status"] == "queued"
    assert events[-1].data["status"] == "cancelled"


def test_the_openapi_document_describes_the_event_stream(live):
    server = live()
    with server.client(server.key("alice")) as c:
        doc = c.get("/openapi.json").json()
    op = doc["paths"]["/v1/experiments/{experiment_id}/events"]["get"]
    assert "text/event-stream" in op["responses"]["200"]["content"]
    for code in ("401", "404", "429", "503"):
        assert "application/problem+json" in op["responses"][code]["content"]
    assert "Last-Event-ID" in op["description"]
    assert op["security"] == [{"bearer": []}]


def test_the_client_waits_by_polling_when_the_tenant_is_at_its_stream_cap(live):
    from hsl import Client

    server = live(max_event_streams_per_tenant=1)
    key = server.key("alice")
    with server.client(key) as c, Client(server.url, key) as client:
        exp = submit(c)
        with c.stream("GET", f"/v1/experiments/{exp['id']}/events") as held:
            assert held.status_code == 200  # the tenant's only stream
            assert c.get(f"/v1/experiments/{exp['id']}/events").status_code == 429
            worker = threading.Thread(target=execute_all, args=(server.app, exp["id"]))
            worker.start()
            seen: list[dict[str, Any]] = []
            doc = client.wait(exp["id"], on_status=seen.append, poll_interval=0.05)
            worker.join()
    assert doc["status"] == "succeeded" and seen[-1] == doc
