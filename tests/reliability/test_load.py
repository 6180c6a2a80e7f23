"""Load and slow clients (issue 10, items 1 and 2), against real processes on loopback.

- ``hsl api`` on PostgreSQL (Redis as its broker, no workers: the experiments stay queued,
  so every status document also reads the worker rows): a list page of 200, 20 clients
  listing at once, a closed-loop throughput phase, 200 pollers for ``HSL_LOAD_SECONDS`` (30),
  then an overload burst beyond the shedding queue and the time until the API answers again.
- ``hsl serve`` with a connection cap of 100 and a 2 s request-head deadline, under 300
  slowloris connections (headers a byte at a time, reopened 0.5 s after the server closes
  one), probed all along by a client in its own thread.

Timing targets are recorded in reports/reliability.json; the assertions are the
load-independent properties (no errors, 503 problem+json with Retry-After, recovery) and
generous sanity bounds.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import time

import httpx
import pytest

from .load import Answer, Conn, Tally
from .stack import TINY_SPEC, Stack, variant

EXPERIMENTS = 200
POLLERS = 200
POLL_INTERVAL = 0.5  # twice as often as `hsl wait`
LOAD_SECONDS = float(os.environ.get("HSL_LOAD_SECONDS", "30"))


def _load() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:  # pragma: no cover
        return None


@pytest.fixture
def api_stack(tmp_path, postgres_url, redis_server):
    st = Stack(
        tmp_path,
        postgres_url,
        redis_server.url,
        HSL_SUBMIT_RATE=10_000,
        HSL_SUBMIT_BURST=10_000,
        HSL_MAX_ACTIVE_EXPERIMENTS=10_000,
    )
    yield st
    st.close()


def _is_problem_503(a) -> bool:
    return (
        a.status == 503
        and a.headers.get("content-type", "").startswith("application/problem+json")
        and a.headers.get("retry-after", "").isdigit()
        and json.loads(a.body)["status"] == 503
    )


async def _submit_all(port: int, key: str) -> list[str]:
    auth = {"authorization": f"Bearer {key}", "content-type": "application/json"}
    ids: list[str] = []

    async def submitter(worker: int) -> None:
        conn = Conn(port, auth)
        for i in range(worker, EXPERIMENTS, 8):
            a = await conn.request(
                "POST", "/v1/experiments", json.dumps(variant(TINY_SPEC, i)).encode()
            )
            assert a.status == 201, a.body
            ids.append(json.loads(a.body)["id"])
        conn.close()

    await asyncio.gather(*(submitter(w) for w in range(8)))
    return ids


async def _scenario(port: int, key: str, figures: dict) -> None:
    auth = {"authorization": f"Bearer {key}"}
    ids = await _submit_all(port, key)

    # -- a list page of 200: first (every document rendered), then cached ---------------
    conn = Conn(port, auth)
    cold = await conn.request("GET", "/v1/experiments?limit=200")
    assert cold.status == 200 and len(json.loads(cold.body)["items"]) == EXPERIMENTS
    warm = Tally()
    for _ in range(20):
        a = await conn.request("GET", "/v1/experiments?limit=200")
        assert a.status == 200
        warm.add(a)
    conn.close()
    concurrent = Tally()
    lists = [Conn(port, auth) for _ in range(20)]
    for _ in range(3):
        for a in await asyncio.gather(
            *(c.request("GET", "/v1/experiments?limit=200") for c in lists)
        ):
            concurrent.add(a)
    for c in lists:
        c.close()
    assert concurrent.statuses == {200: 60}
    figures["list_page_200"] = {
        "first_ms": round(cold.seconds * 1000, 1),
        "cached": warm.summary(),
        "20_clients_at_once": concurrent.summary(),
    }

    # ETag: a poller that sends it back gets 304 without a body while nothing changed
    conn = Conn(port, auth)
    first = await conn.request("GET", f"/v1/experiments/{ids[0]}")
    again = await conn.request(
        "GET", f"/v1/experiments/{ids[0]}", headers={"if-none-match": first.headers["etag"]}
    )
    assert (
        again.status == 304 and again.body == b"" and again.headers["etag"] == first.headers["etag"]
    )
    conn.close()

    # -- throughput: 32 closed-loop clients, no pause ----------------------------------
    tally, stop = Tally(), time.monotonic() + 5

    async def closed_loop(i: int) -> None:
        c = Conn(port, auth)
        rnd = random.Random(i)
        while time.monotonic() < stop:
            try:
                tally.add(await c.request("GET", f"/v1/experiments/{rnd.choice(ids)}"))
            except (TimeoutError, OSError, asyncio.IncompleteReadError) as exc:
                tally.error(exc)
        c.close()

    start = time.monotonic()
    await asyncio.gather(*(closed_loop(i) for i in range(32)))
    figures["throughput_32_clients"] = tally.summary(time.monotonic() - start)
    assert not tally.errors and set(tally.statuses) == {200}, tally.summary()

    # -- 200 pollers ---------------------------------------------------------------------
    polls, stop = Tally(), time.monotonic() + LOAD_SECONDS

    async def poller(i: int) -> None:
        c = Conn(port, auth)
        exp_id = ids[i % len(ids)]
        await asyncio.sleep(POLL_INTERVAL * i / POLLERS)  # spread over one interval
        while time.monotonic() < stop:
            began = time.monotonic()
            try:
                polls.add(await c.request("GET", f"/v1/experiments/{exp_id}"))
            except (TimeoutError, OSError, asyncio.IncompleteReadError) as exc:
                polls.error(exc)
            await asyncio.sleep(max(0.0, POLL_INTERVAL - (time.monotonic() - began)))
        c.close()

    start = time.monotonic()
    await asyncio.gather(*(poller(i) for i in range(POLLERS)))
    figures["pollers_200"] = {
        **polls.summary(time.monotonic() - start),
        "poll_interval_s": POLL_INTERVAL,
    }
    assert not polls.errors, polls.errors[:5]
    assert set(polls.statuses) == {200}, polls.statuses
    assert figures["pollers_200"]["p99_ms"] < 2000, figures["pollers_200"]  # sanity bound

    # -- overload: 900 requests at once, beyond 32 active + 512 queued (below the 1000
    # connections of the cap: the slow-client scenario tests that one) ---------------
    burst, conns = Tally(), [Conn(port, auth) for _ in range(900)]
    refused = []

    async def one(c: Conn, i: int) -> None:
        try:
            a = await c.request("GET", f"/v1/experiments/{ids[i % len(ids)]}")
            burst.add(a)
            if a.status == 503:
                assert _is_problem_503(a), (a.headers, a.body)
                refused.append(a.seconds)
        except (TimeoutError, OSError, asyncio.IncompleteReadError) as exc:
            burst.error(exc)

    start = time.monotonic()
    await asyncio.gather(*(one(c, i) for i, c in enumerate(conns)))
    ended = time.monotonic()
    for c in conns:
        c.close()
    probe = Conn(port, auth)
    while True:
        a = await probe.request("GET", f"/v1/experiments/{ids[0]}")
        if a.status == 200:
            break
        assert time.monotonic() - ended < 30, "the API did not recover within 30 s"
        await asyncio.sleep(0.02)
    recovered = time.monotonic() - ended
    probe.close()
    figures["overload_900_at_once"] = {
        **burst.summary(ended - start),
        "refused_503": len(refused),
        "refused_max_ms": round(max(refused) * 1000, 1) if refused else None,
        "seconds_to_recovery": round(recovered, 3),
    }
    assert not burst.errors, burst.errors[:5]
    assert set(burst.statuses) <= {200, 503} and refused, burst.statuses
    assert max(refused) < 5, "a refused client waited more than the queue wait + slack"
    assert recovered < 5, recovered

    # -- the invariant check wants every experiment terminal: cancel them ---------------
    conn = Conn(port, auth)
    for exp_id in ids:
        assert (await conn.request("POST", f"/v1/experiments/{exp_id}/cancel")).status == 200
    conn.close()


def test_load_200_pollers_list_pages_and_overload(api_stack, scenario):
    scenario("11-load-status-pollers")
    st = api_stack
    st.api()
    scenario.database(st.db_url)
    scenario.service(st.url)
    scenario.figures["load_before"] = _load()
    asyncio.run(_scenario(st.port, st.key, scenario.figures))
    scenario.figures["load_after"] = _load()
    scenario.figures["cores"] = os.cpu_count()
    log = "".join(p.log_path.read_text(errors="replace") for p in st.procs.procs)
    assert "QueuePool limit" not in log and "Traceback" not in log, log[-3000:]


# -- slow clients --------------------------------------------------------------------------

MAX_CONNECTIONS = 100
HEADER_TIMEOUT = 2.0
ATTACKERS = 300  # three times the server's connection limit
ATTACK_SECONDS = 12.0
RECONNECT_DELAY = 0.5


async def _lifetime_of(port: int, trickle: bool) -> float:
    """Seconds until the server closes a connection that sends nothing (or its head a byte
    every 0.2 s)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    start = time.monotonic()
    head = b"GET /healthz HTTP/1.1\r\nhost: x\r\n" + b"x-slow: " + b"a" * 1000
    try:
        for i in range(200):  # 40 s at most
            if trickle:
                writer.write(head[i : i + 1])
            try:
                if await asyncio.wait_for(reader.read(1024), 0.2) == b"":
                    break
            except TimeoutError:
                continue
    except ConnectionError:
        pass
    finally:
        writer.close()
    return time.monotonic() - start


async def _slowloris(port: int, key: str, figures: dict) -> None:
    figures["silent_connection_closed_after_s"] = round(await _lifetime_of(port, False), 2)
    figures["trickling_connection_closed_after_s"] = round(await _lifetime_of(port, True), 2)

    # a request head past the size limit is refused at once
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /healthz HTTP/1.1\r\nhost: x\r\nx-big: " + b"a" * 40_000 + b"\r\n\r\n")
    answer = await asyncio.wait_for(reader.read(100), 5)
    writer.close()
    figures["oversized_head_answer"] = answer.split(b"\r\n")[0].decode()
    assert answer.startswith(b"HTTP/1.1 431"), answer

    stop = time.monotonic() + ATTACK_SECONDS
    opened, lifetimes, open_now, peak = 0, [], 0, 0

    async def attacker(i: int) -> None:
        nonlocal opened, open_now, peak
        head = b"GET /v1/experiments HTTP/1.1\r\nhost: 127.0.0.1\r\nx-pad: " + b"b" * 4000
        while time.monotonic() < stop:
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                await asyncio.sleep(0.1)
                continue
            opened += 1
            open_now += 1
            peak = max(peak, open_now)
            began = time.monotonic()
            try:
                for b in range(len(head)):
                    if time.monotonic() > stop:
                        break
                    writer.write(head[b : b + 1])
                    try:
                        if await asyncio.wait_for(reader.read(1024), 0.3) == b"":
                            break  # the server closed it
                    except TimeoutError:
                        continue
            except ConnectionError:
                pass
            finally:
                if time.monotonic() <= stop:
                    lifetimes.append(time.monotonic() - began)
                open_now -= 1
                writer.close()
            await asyncio.sleep(RECONNECT_DELAY)  # and again, as slowloris tools do

    probes = Tally()
    refusals: list[str] = []

    def probe() -> None:
        """A client of its own (a thread, blocking sockets: it sends its request as it
        connects, not when the attackers' event loop gets round to it)."""
        start = time.perf_counter()
        try:
            r = httpx.get(
                f"http://127.0.0.1:{port}/v1/experiments",
                headers={"Authorization": f"Bearer {key}"},
                timeout=10,
            )
            probes.add(
                Answer(r.status_code, dict(r.headers), r.content, time.perf_counter() - start)
            )
            if r.status_code != 200:
                refusals.append(r.text[:300])
        except httpx.HTTPError as exc:
            probes.error(exc)

    async def prober() -> None:
        await asyncio.sleep(1.0)  # the attack at full strength first
        while time.monotonic() < stop - 0.5:
            await asyncio.to_thread(probe)
            await asyncio.sleep(0.2)

    await asyncio.gather(prober(), *(attacker(i) for i in range(ATTACKERS)))
    figures["attack"] = {
        "attackers": ATTACKERS,
        "server_max_connections": MAX_CONNECTIONS,
        "header_timeout_s": HEADER_TIMEOUT,
        "seconds": ATTACK_SECONDS,
        "reconnect_delay_s": RECONNECT_DELAY,
        "connections_opened": opened,
        "peak_open_client_side": peak,
        "longest_attacker_connection_s": round(max(lifetimes), 2) if lifetimes else None,
    }
    figures["probes"] = probes.summary()
    assert not probes.errors, probes.errors[:5]
    assert set(probes.statuses) == {200}, (probes.statuses, refusals)
    assert figures["probes"]["max_ms"] < 3000, figures["probes"]
    assert lifetimes and max(lifetimes) < HEADER_TIMEOUT + 2, max(lifetimes)


def test_slow_clients_cannot_hold_the_server(start_server, scenario):
    scenario("12-slowloris")
    server = start_server(max_connections=MAX_CONNECTIONS, header_timeout=HEADER_TIMEOUT)
    key = server.keys("lab")[0]
    scenario.database(server.database_url)
    scenario.service(server.url)
    scenario.figures["load_before"] = _load()
    asyncio.run(_slowloris(server.port, key, scenario.figures))
    scenario.figures["load_after"] = _load()
    # and after the attack the server answers at once
    with server.client(key) as c:
        assert c.get("/v1/experiments").status_code == 200
