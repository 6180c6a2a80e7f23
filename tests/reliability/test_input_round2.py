"""Hostile input, round 2 (issue 10, items 7-12): forged cursors, exotic and hostile names,
the Idempotency-Key race, DNS rebinding and cross-site requests against the keyless service,
and request smuggling. Every scenario drives real ``hsl serve`` processes over loopback (on
SQLite under the test's folder, or on a fresh PostgreSQL database where the issue names
both), writes its figures to ``reports/reliability.json`` and is followed by the invariant
check of ``conftest.py``.
"""

from __future__ import annotations

import base64
import copy
import json
import re
import socket
import threading
import time
import urllib.parse
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from email.message import Message
from typing import Any

import httpx
import pytest

from service.config import Settings
from tests.factories import TINY_SPEC
from tests.reliability.server import Server

PROBLEM = "application/problem+json"
DATABASES = ["sqlite", "postgresql"]
GENEROUS = {"submit_rate": 1e6, "submit_burst": 10**6, "embedded_workers": 0}


def spec(name: str, seed: int = 3) -> dict[str, Any]:
    out = copy.deepcopy(TINY_SPEC)
    out["name"] = name
    out["sweep"]["seed"] = seed
    return out


def problem(resp: httpx.Response, status: int) -> dict[str, Any]:
    assert resp.status_code == status, (resp.status_code, resp.text[:500])
    assert resp.headers["content-type"].startswith(PROBLEM), resp.headers
    body = resp.json()
    assert body["status"] == status and body["type"].startswith("https://") and body["detail"]
    return body


@pytest.fixture(params=DATABASES)
def database(request) -> tuple[str, str | None]:
    """(kind, URL): a fresh PostgreSQL database, or None for the server's own SQLite file.
    Requested before ``start_server`` and ``scenario``, so the database outlives both."""
    if request.param == "postgresql":
        return request.param, request.getfixturevalue("postgres_url")
    return request.param, None


def serve(start_server, database, name: str, **settings: Any) -> tuple[Server, str]:
    kind, url = database
    if url is not None:
        settings["database_url"] = url
    server = start_server(f"{name}-{kind}", **settings)
    return server, url or server.database_url


def cursor(created: Any, exp_id: Any) -> str:
    raw = json.dumps([created, exp_id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


# --- 7: forged list cursors ------------------------------------------------------------------


def test_r2_07_forged_cursors_get_400_on_both_databases(database, start_server, scenario):
    server, url = serve(start_server, database, "cursor", **GENEROUS)
    sc = scenario(f"r2-07-forged-cursors-{database[0]}")
    sc.database(url)
    sc.service(server.url)
    (key,) = server.keys("a")
    valid_id = "0" * 32
    forged = {
        "max-date-minus-14h": cursor("9999-12-31T23:59:59-14:00", valid_id),
        "min-date-plus-14h": cursor("0001-01-01T00:00:00+14:00", valid_id),
        "year-10000": cursor("10000-01-01T00:00:00+00:00", valid_id),
        "naive": cursor("2026-01-01T00:00:00", valid_id),
        "number-timestamp": cursor(1e308, valid_id),
        "nul-in-id": cursor("2026-01-01T00:00:00+00:00", "a\x00b"),
        "non-hex-id": cursor("2026-01-01T00:00:00+00:00", "'; DROP TABLE experiments; --"),
        "object-id": cursor("2026-01-01T00:00:00+00:00", {"$gt": ""}),
        "three-items": base64.urlsafe_b64encode(b'["a","b","c"]').decode(),
        "not-base64": "!!!",
        "not-json": base64.urlsafe_b64encode(b"\xff\xfe").decode(),
    }
    statuses: Counter[int] = Counter()
    with server.client(key) as c:
        ids = [
            c.post("/v1/experiments", json=spec(f"c-{i}", seed=i)).json()["id"] for i in range(3)
        ]
        for kind, value in forged.items():
            resp = c.get("/v1/experiments", params={"cursor": value})
            statuses[resp.status_code] += 1
            body = problem(resp, 400)
            assert body["errors"] == [
                {"field": "cursor", "message": "invalid cursor; use next_cursor as given"}
            ], kind
        # extreme but representable instants are valid cursors: before or after everything
        early = c.get(
            "/v1/experiments", params={"cursor": cursor("0001-01-01T00:00:00-14:00", valid_id)}
        )
        late = c.get(
            "/v1/experiments", params={"cursor": cursor("9999-12-31T23:59:59+14:00", valid_id)}
        )
        assert early.status_code == 200 and early.json()["items"] == []
        assert late.status_code == 200 and len(late.json()["items"]) == 3
        # the cursors the service issues still page through everything
        seen, next_cursor = [], None
        while True:
            params = {"limit": 1} | ({"cursor": next_cursor} if next_cursor else {})
            page = c.get("/v1/experiments", params=params).json()
            seen += [e["id"] for e in page["items"]]
            next_cursor = page["next_cursor"]
            if not next_cursor:
                break
        assert sorted(seen) == sorted(ids) and len(seen) == 3
    sc.figures.update(
        database=database[0],
        forged_cursors=sorted(forged),
        statuses={str(s): n for s, n in statuses.items()},
        five_xx=sum(n for s, n in statuses.items() if s >= 500),
        pages_walked=len(seen),
    )
    assert statuses == {400: len(forged)}


# --- 8: non-ASCII and hostile names in Content-Disposition ------------------------------------

EXOTIC_NAMES = {
    "cjk": "实验-スケーリング-실험",
    "emoji": "🧪 run 👩\u200d🔬",
    "bidi-marks": "\u200fעברית\u200e-mixed",
    "zero-width": "zero\u200bwidth\u200cjoin\u2060",
    "quote-injection": 'a"; filename="evil.sh',
    "backslash-semicolon-percent": "c:\\tmp\\x; y=%41%00 100%",
    "long-cjk": "验" * 200,
}
# RFC 6266 with RFC 5987: a quoted ASCII fallback, then the UTF-8 name percent-encoded
DISPOSITION = re.compile(
    r"attachment; filename=\"(?P<fallback>[\x20\x21\x23-\x5b\x5d-\x7e]*)\"; "
    r"filename\*=UTF-8''(?P<encoded>[A-Za-z0-9!#$&+\-.^_`|~%]+)"
)


def test_r2_08_exotic_names_get_a_safe_content_disposition(database, start_server, scenario):
    server, url = serve(start_server, database, "names", **GENEROUS)
    sc = scenario(f"r2-08-content-disposition-{database[0]}")
    sc.database(url)
    sc.service(server.url)
    (key,) = server.keys("a")
    headers: dict[str, str] = {}
    with server.client(key) as c:
        for i, (kind, name) in enumerate(EXOTIC_NAMES.items()):
            created = c.post("/v1/experiments", json=spec(name, seed=10 + i))
            assert created.status_code == 201, (kind, created.text)
            doc = created.json()
            assert doc["name"] == name
            resp = c.get(f"/v1/experiments/{doc['id']}/results.csv")
            assert resp.status_code == 200, (kind, resp.status_code, resp.text[:300])
            assert resp.headers["content-type"].startswith("text/csv")
            raw = resp.headers["content-disposition"]
            headers[kind] = raw
            match = DISPOSITION.fullmatch(raw)
            assert match, (kind, raw)
            expected = f"{name}-{doc['id'][:8]}.csv"
            assert urllib.parse.unquote(match["encoded"], errors="strict") == expected
            assert raw.count("filename=") == 1 and raw.count("filename*=") == 1, raw
            assert len(match["fallback"]) == len(expected)
            # the standard library's RFC 2231 decoder (RFC 5987's parent) reads filename* as
            # the full name (it does not know RFC 6266's precedence: filename* alone)
            msg = Message()
            msg["content-disposition"] = "attachment; filename*=UTF-8''" + match["encoded"]
            assert msg.get_filename() == expected, (kind, msg.get_filename())
            msg = Message()
            msg["content-disposition"] = raw
            assert msg.get_content_disposition() == "attachment"
            # the list filter finds it by its exact name
            listed = c.get("/v1/experiments", params={"name": name})
            assert [e["id"] for e in listed.json()["items"]] == [doc["id"]], kind
    sc.figures.update(
        database=database[0],
        names=sorted(EXOTIC_NAMES),
        csv_statuses={"200": len(headers)},
        example_headers={k: headers[k] for k in ("quote-injection", "cjk")},
    )


# --- 9: names with control characters ----------------------------------------------------------

CONTROL_NAMES = {
    "nul": "a\x00b",
    "cr-lf": "x\r\nSet-Cookie: a=b",
    "lf": "line\nbreak",
    "tab": "a\tb",
    "del": "del\x7f",
    "c1-nel": "c1\x85",
    "c1-csi": "c1\x9b31m",
    "line-separator": "a\u2028b",
    "rtl-override": "evil\u202egpj.sh",
    "bidi-isolate": "a\u2066b\u2069",
}


def test_r2_09_control_characters_in_names_get_422_never_503(database, start_server, scenario):
    server, url = serve(start_server, database, "control", **GENEROUS)
    sc = scenario(f"r2-09-control-names-{database[0]}")
    sc.database(url)
    sc.service(server.url)
    (key,) = server.keys("a")
    statuses: dict[str, Counter[int]] = {"body": Counter(), "filter": Counter(), "path": Counter()}
    with server.client(key) as c:
        for kind, name in CONTROL_NAMES.items():
            resp = c.post("/v1/experiments", json=spec(name))
            statuses["body"][resp.status_code] += 1
            body = problem(resp, 422)
            assert body["type"].endswith("/invalid-spec"), kind
            assert [e["field"] for e in body["errors"]] == ["name"], (kind, body)
            assert "printable" in body["errors"][0]["message"]
            resp = c.get("/v1/experiments", params={"name": name})
            statuses["filter"][resp.status_code] += 1
            body = problem(resp, 422)
            assert [e["field"] for e in body["errors"]] == ["name"], (kind, body)
        for bad in ("", "x" * 201):
            resp = c.get("/v1/experiments", params={"name": bad})
            statuses["filter"][resp.status_code] += 1
            assert problem(resp, 422)["errors"][0]["field"] == "name"
        # a NUL in a path or in an Idempotency-Key-free body field never reaches the database
        for path in (
            "/v1/experiments/%00",
            "/v1/experiments/a%00b/results",
            "/v1/experiments/%C2%85",
        ):
            for method in ("GET", "POST", "DELETE"):
                target = path + ("/cancel" if method == "POST" and path.count("/") == 3 else "")
                resp = c.request(method, target)
                statuses["path"][resp.status_code] += 1
                assert resp.status_code in (404, 405), (method, target, resp.status_code)
        listed = c.get("/v1/experiments").json()["items"]
        assert listed == []
        good = c.post("/v1/experiments", json=spec("after"))
        assert good.status_code == 201
    five_xx = sum(n for counts in statuses.values() for s, n in counts.items() if s >= 500)
    sc.figures.update(
        database=database[0],
        names=sorted(CONTROL_NAMES),
        statuses={k: {str(s): n for s, n in v.items()} for k, v in statuses.items()},
        five_xx=five_xx,
        stored_after=0,
    )
    assert five_xx == 0


# --- 10: the Idempotency-Key race ------------------------------------------------------------


def test_r2_10_idempotency_key_race_loser_gets_409_never_503(database, start_server, scenario):
    server, url = serve(start_server, database, "idem", **GENEROUS)
    sc = scenario(f"r2-10-idempotency-race-{database[0]}")
    sc.database(url)
    sc.service(server.url)
    (key,) = server.keys("a")
    racers, rounds = 16, 6
    per_round: list[dict[str, int]] = []
    odd: list[list[str]] = []
    limits = httpx.Limits(max_connections=racers, max_keepalive_connections=racers)
    with server.client(key, limits=limits) as c:
        c.get("/v1/experiments")
        for r in range(rounds):
            gate = threading.Barrier(racers)
            idem = f"race-{r}"

            def submit(i: int, r: int = r, idem: str = idem, gate=gate) -> httpx.Response:
                body = spec(f"race-{r}-{i}", seed=1000 * r + i)
                gate.wait(10)
                return c.post("/v1/experiments", json=body, headers={"Idempotency-Key": idem})

            with ThreadPoolExecutor(racers) as pool:
                answers = list(pool.map(submit, range(racers)))
            counts = Counter(a.status_code for a in answers)
            per_round.append({str(s): n for s, n in sorted(counts.items())})
            for a in answers:
                if a.status_code == 409:
                    body = problem(a, 409)
                    assert body["errors"][0]["field"] == "Idempotency-Key"
            if counts != {201: 1, 409: racers - 1}:
                odd.append([a.text[:200] for a in answers if a.status_code not in (201, 409)])
                continue
            # the winner's retry gets the winner's experiment
            w = next(i for i, a in enumerate(answers) if a.status_code == 201)
            again = c.post(
                "/v1/experiments",
                json=spec(f"race-{r}-{w}", seed=1000 * r + w),
                headers={"Idempotency-Key": idem},
            )
            assert again.status_code == 200 and again.json()["id"] == answers[w].json()["id"]
        stored = c.get("/v1/experiments", params={"limit": 200}).json()["items"]
    sc.figures.update(
        database=database[0],
        racers=racers,
        rounds=rounds,
        statuses_per_round=per_round,
        five_xx=sum(n for d in per_round for s, n in d.items() if s.startswith("5")),
        stored=len(stored),
    )
    assert all(d == {"201": 1, "409": racers - 1} for d in per_round), (per_round, odd)
    assert len(stored) == rounds


# --- 11: DNS rebinding and cross-site requests against the keyless service -----------------


def raw_exchange(port: int, request: bytes, wait: float = 3.0) -> tuple[list[bytes], bool]:
    """Send ``request`` (possibly several pipelined ones) on one connection; the status lines
    of the responses read until the server closes or stays silent for ``wait`` s, and
    whether it closed the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as sock:
        sock.sendall(request)
        data, closed = b"", False
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                part = sock.recv(65536)
            except TimeoutError:
                break
            except ConnectionResetError:
                closed = True
                break
            if not part:
                closed = True
                break
            data += part
    return re.findall(rb"HTTP/1\.1 \d{3}[^\r]*", data), closed, data


def test_r2_11_keyless_service_refuses_foreign_hosts_and_cross_site_writes(
    start_server, scenario, tmp_path
):
    server = start_server("keyless", require_keys=None, allowed_hosts="lab.example", **GENEROUS)
    keyed = start_server("keyed-proxy", **GENEROUS)
    sc = scenario("r2-11-host-and-csrf")
    sc.database(server.database_url)
    sc.database(keyed.database_url)
    sc.service(server.url)
    sc.service(keyed.url)
    port = server.port
    refused_hosts = [
        "evil.example",
        f"evil.example:{port}",
        f"127.0.0.1.evil.example:{port}",
        f"localhost.evil.example:{port}",
        "[::1",
        "a:b:c",
    ]
    allowed_hosts = [
        f"127.0.0.1:{port}",
        f"localhost:{port}",
        f"LOCALHOST.:{port}",
        f"[::1]:{port}",
        "127.0.0.2",
        f"lab.example:{port}",
    ]
    host_statuses: dict[str, int] = {}
    csrf: dict[str, int] = {}
    with server.client() as c:
        for host in refused_hosts:
            resp = c.get("/v1/experiments", headers={"Host": host})
            host_statuses[host] = resp.status_code
            body = problem(resp, 400)
            assert (
                body["type"].endswith("/host-not-allowed") and body["errors"][0]["field"] == "Host"
            )
            resp = c.post("/v1/experiments", json=spec("rebound"), headers={"Host": host})
            assert problem(resp, 400)["type"].endswith("/host-not-allowed")
        for host in allowed_hosts:
            resp = c.get("/v1/experiments", headers={"Host": host})
            host_statuses[host] = resp.status_code
            assert resp.status_code == 200, (host, resp.text)
        assert c.get("/v1/experiments").json()["items"] == []  # nothing rebound was stored

        target = c.post("/v1/experiments", json=spec("target")).json()["id"]
        cancel = f"/v1/experiments/{target}/cancel"
        evil = "http://evil.example"
        attacks = {
            "form-post-foreign-origin": (
                "POST",
                cancel,
                {"Origin": evil, "Content-Type": "application/x-www-form-urlencoded"},
                b"x=1",
                403,
            ),
            "multipart-same-site-origin": (
                "POST",
                cancel,
                {
                    "Origin": "http://localhost:3000",
                    "Content-Type": "multipart/form-data; boundary=b",
                },
                b"--b--",
                403,
            ),
            "text-plain-no-origin": ("POST", cancel, {"Content-Type": "text/plain"}, b"{}", 415),
            "no-content-type-no-origin": ("POST", cancel, {}, b"", 415),
            "json-foreign-origin": (
                "POST",
                cancel,
                {"Origin": evil, "Content-Type": "application/json"},
                b"{}",
                403,
            ),
            "null-origin": ("POST", cancel, {"Origin": "null"}, b"", 403),
            "sec-fetch-cross-site": (
                "POST",
                cancel,
                {"Sec-Fetch-Site": "cross-site", "Content-Type": "application/json"},
                b"",
                403,
            ),
            "delete-foreign-origin": (
                "DELETE",
                f"/v1/experiments/{target}",
                {"Origin": evil},
                b"",
                403,
            ),
            "submit-form-foreign-origin": (
                "POST",
                "/v1/experiments",
                {"Origin": evil, "Content-Type": "text/plain"},
                json.dumps(spec("csrf")).encode(),
                403,
            ),
        }
        for name, (method, path, headers, content, status) in attacks.items():
            resp = c.request(method, path, headers=headers, content=content)
            csrf[name] = resp.status_code
            problem(resp, status)
        after = c.get(f"/v1/experiments/{target}").json()
        assert after["status"] == "queued", after  # no attack cancelled or deleted it
        assert [e["id"] for e in c.get("/v1/experiments").json()["items"]] == [target]

        # what must keep working: the browser on /docs (same origin, no JSON type on a
        # bodyless POST), JSON clients without an Origin (curl, hsl), the docs themselves
        assert c.get("/docs").status_code == 200 and c.get("/openapi.json").status_code == 200
        same_origin = c.post(cancel, headers={"Origin": server.url})
        csrf["same-origin-docs-cancel"] = same_origin.status_code
        assert same_origin.status_code == 200 and same_origin.json()["status"] == "cancelled"
        other = c.post("/v1/experiments", json=spec("other")).json()["id"]
        json_cancel = c.post(f"/v1/experiments/{other}/cancel", json={})
        csrf["json-cancel-no-origin"] = json_cancel.status_code
        assert json_cancel.status_code == 200
        # a request with a key is checked by its key (never a CSRF vector)
        with_key = c.post(cancel, headers={"Authorization": "Bearer nope", "Origin": evil})
        assert problem(with_key, 401)

    # the hsl client commands against the keyless service
    spec_file = tmp_path / "client-spec.json"
    spec_file.write_text(json.dumps(spec("from-cli")))
    out = server.procs.hsl("submit", str(spec_file), "--url", server.url)
    exp_id = out.strip().split()[-1]
    assert re.fullmatch(r"[0-9a-f]{32}", exp_id), out
    assert "queued" in server.procs.hsl("status", exp_id, "--url", server.url)
    with server.client() as c:  # nothing runs here: end it for the invariant check
        assert c.post(f"/v1/experiments/{exp_id}/cancel", json={}).status_code == 200

    # a keyed API (hsl api behind a reverse proxy) answers its public name by default
    (key,) = keyed.keys("a")
    with keyed.client(key) as k:
        proxied = k.get("/v1/experiments", headers={"Host": "hsl.example.org"})
        assert proxied.status_code == 200, proxied.text
        assert (
            k.post(
                "/v1/experiments", json=spec("via-proxy"), headers={"Host": "hsl.example.org"}
            ).status_code
            == 201
        )
    assert Settings(require_keys=True).host_names is None
    assert (
        "hsl.example.org" in Settings(require_keys=True, allowed_hosts="hsl.example.org").host_names
    )
    assert Settings(require_keys=False, allowed_hosts="*").host_names is None

    sc.figures.update(
        host_statuses=host_statuses,
        refused_hosts=len(refused_hosts),
        allowed_hosts=len(allowed_hosts),
        cross_site_statuses=csrf,
        attacks_refused=sum(1 for n, s in csrf.items() if n in attacks and s in (403, 415)),
        target_status_after_attacks=after["status"],
        proxy_host_on_keyed_api=proxied.status_code,
    )


# --- 12: Content-Length with Transfer-Encoding -------------------------------------------------


def test_r2_12_content_length_with_transfer_encoding_closes_the_connection(start_server, scenario):
    server = start_server("smuggle", **GENEROUS)
    sc = scenario("r2-12-request-smuggling")
    sc.database(server.database_url)
    sc.service(server.url)
    (key,) = server.keys("a")
    smuggled = (
        b"GET /v1/experiments HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer "
        + key.encode()
        + b"\r\n\r\n"
    )
    body = json.dumps(spec("smuggle")).encode()
    head = (
        "POST /v1/experiments HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer {key}\r\n"
    ).encode()
    variants = {
        # CL.TE: the CL-counted body hides the second request from a CL-framing proxy
        "cl-te": head
        + f"Content-Length: {5 + len(smuggled)}\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
        + b"0\r\n\r\n"
        + smuggled,
        # TE.CL: the chunked body, then a request a TE-framing proxy saw as the next one
        "te-cl": head
        + b"Transfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n"
        + f"{len(body):x}\r\n".encode()
        + body
        + b"\r\n0\r\n\r\n"
        + smuggled,
        "te-cl-zero": head
        + b"Content-Length: 0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
        + smuggled,
    }
    results: dict[str, dict[str, Any]] = {}
    for name, request in variants.items():
        statuses, closed, data = raw_exchange(server.port, request)
        results[name] = {
            "responses": len(statuses),
            "statuses": [s.decode() for s in statuses],
            "closed": closed,
        }
        assert statuses == [b"HTTP/1.1 400 Bad Request"], (name, data[:600])
        assert b"content-type: application/problem+json" in data.lower(), data[:600]
        assert b"connection: close" in data.lower(), data[:600]
        assert closed, name
    # keep-alive and pipelining still work for requests that are not ambiguous
    pipelined = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" + smuggled
    statuses, closed, _ = raw_exchange(server.port, pipelined, wait=1.5)
    assert statuses == [b"HTTP/1.1 200 OK", b"HTTP/1.1 200 OK"] and not closed
    with server.client(key) as c:
        assert c.get("/v1/experiments").json()["items"] == []  # nothing was submitted
    server.procs.assert_alive()
    sc.figures.update(
        variants=results,
        pipelined_control={"responses": len(statuses), "closed": closed},
        smuggled_answered=sum(r["responses"] - 1 for r in results.values()),
    )
