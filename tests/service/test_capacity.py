"""Status ETags and load shedding (issue 10, item 1); the load itself is measured against real
processes in tests/reliability/test_load.py."""

from __future__ import annotations

import asyncio
import json

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
