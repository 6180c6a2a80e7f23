"""``/docs`` and ``/redoc`` with their assets served by the service itself (issue 11 item 3).

The pages must name no other host (a lab behind a firewall gets a blank page otherwise), the
asset route must serve the installed package's files byte for byte with their media types and
cache headers, and the pages keep the policy of the rest of the service: no key needed, the
keyless service's ``Host`` guard applies. The browser tests (tests/browser/test_docs.py) check
that the pages render.
"""

from __future__ import annotations

import re
from importlib import metadata, resources

import pytest

from service import docs

from .api import assert_problem

VERSION = metadata.version("fastapi-offline")
STATIC = resources.files("fastapi_offline").joinpath("static")
EXPECTED_TYPES = {
    "swagger-ui-bundle.js": "text/javascript",
    "swagger-ui.css": "text/css",
    "redoc.standalone.js": "text/javascript",
    "favicon.png": "image/png",
}


URL_RE = re.compile(r"""(?:src|href|spec-url)=["']([^"']+)["']|url:\s*["']([^"']+)["']""")


def _urls(html: str) -> list[str]:
    """The URLs a page loads: src, href and spec-url attributes, Swagger UI's ``url:``."""
    return [a or b for a, b in URL_RE.findall(html)]


@pytest.mark.parametrize(
    ("path", "assets"),
    [
        ("/docs", ["swagger-ui-bundle.js", "swagger-ui.css", "favicon.png"]),
        ("/redoc", ["redoc.standalone.js", "favicon.png"]),
    ],
)
def test_pages_load_only_local_assets(client, path, assets):
    resp = client.get(path)
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/html")
    html = resp.text
    # no absolute URL anywhere in the page: no CDN, no fonts, no favicon from elsewhere
    assert re.findall(r"https?://", html) == [], html
    urls = _urls(html)
    for name in assets:
        assert f"/docs/assets/{VERSION}/{name}" in urls, urls
    assert "/openapi.json" in html
    if path == "/docs":
        # Swagger UI's validator badge would send the schema URL to validator.swagger.io
        assert '"validatorUrl": null' in html


@pytest.mark.parametrize("name", sorted(EXPECTED_TYPES))
def test_asset_is_the_package_file_with_type_and_cache_headers(client, name):
    url = f"/docs/assets/{VERSION}/{name}"
    resp = client.get(url)

    assert resp.status_code == 200
    expected = STATIC.joinpath(name).read_bytes()
    for old, new in docs.ASSET_SUBSTITUTIONS.get(name, ()):
        expected = expected.replace(old, new)
    assert resp.content == expected and len(expected) > 0
    media = resp.headers["content-type"].split(";")[0].strip()
    assert media == EXPECTED_TYPES[name]
    assert resp.headers["content-length"] == str(len(expected))
    # a versioned URL names one file for ever
    cache = {p.strip() for p in resp.headers["cache-control"].split(",")}
    assert {"public", "immutable", "max-age=31536000"} <= cache
    etag = resp.headers["etag"]
    assert re.fullmatch(r'"[0-9a-f]{32}"', etag)

    again = client.get(url, headers={"If-None-Match": etag})
    assert again.status_code == 304 and again.content == b""
    assert again.headers["etag"] == etag
    assert client.get(url, headers={"If-None-Match": f'W/{etag}, "other"'}).status_code == 304
    assert client.get(url, headers={"If-None-Match": '"other"'}).status_code == 200

    head = client.head(url)
    assert head.status_code == 200 and head.content == b""
    assert head.headers["content-length"] == str(len(expected))


@pytest.mark.parametrize(
    "path",
    [
        f"/docs/assets/{VERSION}/index.html",
        f"/docs/assets/{VERSION}/..%2Fcore.py",
        f"/docs/assets/{VERSION}/swagger-ui.js",
        "/docs/assets/0.0.0/swagger-ui.css",
    ],
)
def test_unknown_asset_or_version_is_a_404_problem(client, path):
    body = assert_problem(client.get(path), 404, "not-found")
    if "0.0.0" in path:
        assert VERSION in body["detail"]


@pytest.mark.parametrize(
    "path", ["/docs", "/redoc", "/docs/oauth2-redirect", f"/docs/assets/{VERSION}/swagger-ui.css"]
)
def test_docs_need_no_key_where_keys_are_required(client, path):
    request = client.build_request("GET", path)
    del request.headers["authorization"]
    assert client.send(request).status_code == 200


@pytest.mark.parametrize("path", ["/docs", "/redoc", f"/docs/assets/{VERSION}/favicon.png"])
def test_keyless_service_guards_docs_like_every_route(make_client, path):
    client = make_client(require_keys=None, host="127.0.0.1", broker_url=None)
    assert client.get(path).status_code == 200
    # a page whose name was rebound to 127.0.0.1 sends its own name: refused
    assert_problem(client.get(path, headers={"Host": "evil.example"}), 400, "host-not-allowed")


def test_docs_routes_stay_out_of_the_openapi_document(client):
    paths = client.get("/openapi.json").json()["paths"]
    assert not [p for p in paths if p.startswith(("/docs", "/redoc"))]


def test_openapi_description_points_to_the_guides(client):
    info = client.get("/openapi.json").json()["info"]
    for guide in ("docs/model.md", "docs/theory.md", "docs/reference.md", "docs/reliability.md"):
        assert guide in info["description"]
    assert not re.search(r"shared[/]|MODEL\.md|API\.md", info["description"])


def test_redoc_bundle_loads_no_image_from_elsewhere(client):
    body = client.get(f"/docs/assets/{VERSION}/redoc.standalone.js").content
    assert re.findall(rb'src:"https?://', body) == []
    assert b"cdn.redoc.ly" not in body
    # the licence notice of the bundle is kept
    assert body.startswith(STATIC.joinpath("redoc.standalone.js").read_bytes()[:60])


def test_asset_list_matches_the_package(client):
    # every file the pages name is one the package ships (a new release that moved them
    # would fail here, not as a blank page)
    assert set(docs.load_assets()) == set(EXPECTED_TYPES)
    for name in EXPECTED_TYPES:
        assert STATIC.joinpath(name).is_file()
