"""Status ETags and load shedding (issue 10, item 1); the load itself is measured against real
processes in tests/reliability/test_load.py."""

from __future__ import annotations

import asyncio
import json
import socket

from hsl.connections import head_waiting
from service.shedding import LoadShedder

from .api import tiny_spec


def test_status_and_results_carry_an_etag_and_answer_304_while_nothing_changed(client):
    doc = client.post("/v1/experiments", json=tiny_spec()).json()
    url = f"/v1/experiments/{doc['id']}"
    first = client.get(url)
    etag = first.headers["etag"]
    assert first.status_code == 200 and first.json() == client.get(url).json()
    again = client.get(url, headers={"If-None-Match": etag})
    assert again.status_code == 304 and again.content == b"" and again.headers["etag"] == etag
    assert client.get(url, headers={"If-None-Match": '"other"'}).status_code == 200

    client.post(f"{url}/cancel")
    changed = client.get(url, headers={"If-None-Match": etag})
    assert changed.status_code == 200 and changed.headers["etag"] != etag
    assert changed.json()["status"] == "cancelled"

    results = client.get(f"{url}/results")
    tag = results.headers["etag"]
    assert client.get(f"{url}/results", headers={"If-None-Match": tag}).status_code == 304


def test_a_list_page_is_the_status_documents_of_its_experiments(client):
    ids = [
        client.post("/v1/experiments", json=tiny_spec(name=f"e{i}")).json()["id"] for i in range(3)
    ]
    items = client.get("/v1/experiments", params={"limit": 2}).json()
    assert [i["id"] for i in items["items"]] == ids[::-1][:2] and items["next_cursor"]
    for item in items["items"]:
        assert item == client.get(f"/v1/experiments/{item['id']}").json()


def _shedder_round(active: int, queued: int, wait: float, clients: int) -> list[tuple]:
    release = asyncio.Event()

    async def slow_app(scope, receive, send):
        await release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    shedder = LoadShedder(slow_app, active=active, queued=queued, wait=wait)

    async def call() -> tuple:
        sent = []

        async def send(message):
            sent.append(message)

        loop = asyncio.get_running_loop()
        start = loop.time()
        await shedder({"type": "http", "path": "/v1/experiments"}, None, send)
        head = sent[0]
        return head["status"], dict(head["headers"]), sent[1]["body"], loop.time() - start

    async def main() -> list[tuple]:
        tasks = [asyncio.create_task(call()) for _ in range(clients)]
        await asyncio.sleep(0.2)
        release.set()
        return await asyncio.gather(*tasks)

    return asyncio.run(main())


def test_requests_beyond_the_active_and_queued_slots_get_503_problem_json_at_once():
    answers = _shedder_round(active=2, queued=3, wait=5.0, clients=8)
    statuses = sorted(a[0] for a in answers)
    assert statuses == [200] * 5 + [503] * 3
    for status, headers, body, seconds in answers:
        if status == 503:
            assert headers[b"content-type"] == b"application/problem+json"
            assert headers[b"retry-after"] == b"1"
            assert json.loads(body)["status"] == 503
            assert seconds < 0.1  # refused at once, not after the others finished


def test_a_request_waiting_longer_than_the_queue_wait_gets_503():
    answers = _shedder_round(active=1, queued=5, wait=0.05, clients=3)
    assert sorted(a[0] for a in answers) == [200, 503, 503]


def test_a_whole_request_head_waiting_unread_is_told_from_a_slow_clients_trickle():
    """At the connection cap, the connection guard closes the oldest connection still sending
    its head, but not one whose request has arrived unread (the event loop fell behind). A
    slow client whose latest bytes wait unread (a busy or starved server) must still count as
    slow: only a finished head protects a connection. The peek must leave the bytes for the
    protocol."""
    limit = 16 * 1024 + 4

    async def waiting(unread: bytes, buffered: bytes = b"") -> bool:
        """``head_waiting`` on a real connection whose reader has fallen behind: ``unread``
        sent and not read, ``buffered`` what h11 would hold. Checks the bytes stay there."""
        ours, theirs = socket.socketpair()
        received = bytearray()

        class Recorder(asyncio.Protocol):
            def data_received(self, data: bytes) -> None:
                received.extend(data)

        loop = asyncio.get_running_loop()
        transport, _ = await loop.connect_accepted_socket(Recorder, ours)
        transport.pause_reading()
        try:
            theirs.sendall(unread)
            await asyncio.sleep(0.02)
            answer = head_waiting(transport, buffered, limit)
            transport.resume_reading()
            for _ in range(200):
                if len(received) >= len(unread):
                    break
                await asyncio.sleep(0.01)
            assert bytes(received) == unread  # peeked, not taken
            return answer
        finally:
            transport.close()
            theirs.close()

    async def check() -> None:
        head = b"GET /v1/experiments HTTP/1.1\r\nhost: x\r\n"
        assert not await waiting(b"")
        assert not await waiting(head + b"x-slow: aaaa")  # a trickle with bytes waiting
        assert not await waiting(b"a", buffered=head + b"x-slow: aaa")
        assert await waiting(head + b"\r\n")
        assert await waiting(b"\r\n", buffered=head)  # the blank line split across both
        assert await waiting(b"\n", buffered=head + b"\r")
        assert await waiting(b"GET / HTTP/1.1\nhost: x\n\n")  # bare newlines end it too
        assert not await waiting(b"GET / HTTP/1.1\nhost: x\n")

    asyncio.run(check())
