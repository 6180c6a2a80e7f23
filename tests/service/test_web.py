"""The web page over plain HTTP: ``/`` is HTML under a same-origin Content-Security-Policy,
every file it loads is served with its media type, and nothing else is."""

from __future__ import annotations

import re

from service.web import ASSETS

from .api import assert_problem


def test_page_is_html_with_a_self_only_content_security_policy(client):
    resp = client.get("/")

    assert resp.status_code == 200
    assert resp.headers["content-type"] == "text/html; charset=utf-8"
    csp = {d.split()[0]: d.split()[1:] for d in resp.headers["content-security-policy"].split("; ")}
    assert csp["default-src"] == ["'none'"]
    assert csp["script-src"] == ["'self'"]
    assert csp["style-src"] == ["'self'"]
    assert csp["connect-src"] == ["'self'"]
    assert csp["img-src"] == ["'self'", "blob:"]
    assert csp["frame-ancestors"] == ["'none'"]
    header = resp.headers["content-security-policy"]
    assert "unsafe" not in header and "http" not in header and "*" not in header
    assert resp.headers["x-content-type-options"] == "nosniff"
    # no inline script or style, nothing from another origin
    assert not re.search(r"<script(?![^>]*\bsrc=)", resp.text)
    assert "<style" not in resp.text and "style=" not in resp.text
    assert not re.search(r"(src|href)=\"(https?:)?//", resp.text)


def test_every_file_the_page_loads_has_its_media_type(client):
    html = client.get("/").text
    loaded = set(re.findall(r"(?:src|href)=\"/static/([^\"]+)\"", html))
    assert loaded == {"app.css", "app.js", "favicon.svg"}
    icon = client.get("/static/favicon.svg")
    assert icon.status_code == 200 and icon.headers["content-type"] == "image/svg+xml"
    # the modules import each other by relative name: every one is served
    seen, todo = set(), ["app.js"]
    while todo:
        name = todo.pop()
        seen.add(name)
        resp = client.get(f"/static/{name}")
        assert resp.status_code == 200, name
        assert resp.headers["content-type"] == "text/javascript; charset=utf-8"
        assert "content-security-policy" in resp.headers
        for dep in re.findall(r"from \"\./([\w.-]+\.js)\"", resp.text):
            if dep not in seen:
                todo.append(dep)
    assert seen == {n for n in ASSETS if n.endswith(".js")}
    css = client.get("/static/app.css")
    assert css.status_code == 200
    assert css.headers["content-type"] == "text/css; charset=utf-8"
    assert "url(" not in css.text and "@import" not in css.text


def test_other_static_paths_are_404_problems(client):
    for path in ("/static/index.html", "/static/nope.js", "/static/../app.py", "/static/"):
        assert client.get(path).status_code == 404, path
    assert_problem(client.get("/static/nope.js"), 404, "not-found")


def test_page_says_whether_keys_are_required_and_needs_none_itself(make_client):
    keyed = make_client()  # keys required
    resp = keyed.get("/")
    assert resp.status_code == 200
    assert '<meta name="hsl-keys" content="required">' in resp.text
    assert keyed.get("/static/app.js").status_code == 200

    keyless = make_client(require_keys=False)
    assert '<meta name="hsl-keys" content="optional">' in keyless.get("/").text


def test_page_is_not_an_api_route(client):
    paths = client.get("/openapi.json").json()["paths"]
    assert "/" not in paths and not any(p.startswith("/static") for p in paths)


def test_keyless_page_answers_only_its_own_host(make_client):
    keyless = make_client(require_keys=False)
    assert keyless.get("/").status_code == 200
    assert_problem(keyless.get("/", headers={"Host": "evil.example"}), 400, "host-not-allowed")
