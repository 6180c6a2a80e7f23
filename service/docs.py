"""``/docs`` (Swagger UI) and ``/redoc`` (ReDoc) with no request leaving the machine.

FastAPI's own pages load Swagger UI, ReDoc and a favicon from public CDNs, so behind a
firewall they are blank. Here the pages are FastAPI's documented self-hosting recipe
(``get_swagger_ui_html``, ``get_redoc_html``) pointed at this service, and the JavaScript, CSS
and icon come from the installed package ``fastapi-offline`` (MIT), which ships the Swagger UI
(Apache-2.0) and ReDoc (MIT) bundles as package data and is updated as they are released. Only
its files are used, not its application factory, so the app keeps its own construction.

The assets are served at ``/docs/assets/{version}/{name}``, where ``version`` is the
installed fastapi-offline version: a URL names one file for ever, so it is cached as
immutable for a year, with a strong ``ETag`` for the revalidations browsers still make. An
upgrade changes the URL, never the bytes behind one.

These routes need no key, like ``/openapi.json`` (the schema is no secret; every call the
page makes is checked as usual), and they pass through the same guards as every other route
(``service/guards.py``: ``Host`` and cross-site checks, load shedding). The pages make no
request to any other host: Swagger UI's online validator badge is switched off, ReDoc's
Google Fonts link is left out, and the one image ReDoc's bundle loads from Redocly's CDN (the
logo of its attribution line) is replaced by an inline one as the bundle is read
(`ASSET_SUBSTITUTIONS`).
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from importlib import metadata, resources

from fastapi import APIRouter, FastAPI, Request, Response
from fastapi.openapi.docs import (
    get_redoc_html,
    get_swagger_ui_html,
    get_swagger_ui_oauth2_redirect_html,
)
from fastapi.responses import HTMLResponse

from .errors import NotFound

ASSETS_PACKAGE = "fastapi-offline"
ASSETS_PREFIX = "/docs/assets"
# name in the package's static folder -> media type
ASSET_TYPES: dict[str, str] = {
    "swagger-ui-bundle.js": "text/javascript; charset=utf-8",
    "swagger-ui.css": "text/css; charset=utf-8",
    "redoc.standalone.js": "text/javascript; charset=utf-8",
    "favicon.png": "image/png",
}
CACHE_CONTROL = "public, max-age=31536000, immutable"
# ReDoc's side menu always shows "API docs by Redocly" with a logo image from Redocly's CDN
# (no option turns it off). Offline the image fails quietly, but the browser still tries the
# internet on every visit, which a firewalled lab's proxy logs. The served bundle shows an
# empty inline image there instead; nothing else in it is changed (MIT licence: modification
# allowed, the notice stays in the bundle).
ASSET_SUBSTITUTIONS: dict[str, tuple[tuple[bytes, bytes], ...]] = {
    "redoc.standalone.js": (
        (
            b'"https://cdn.redoc.ly/redoc/logo-mini.svg"',
            b'"data:image/svg+xml,%3Csvg xmlns=%27http://www.w3.org/2000/svg%27/%3E"',
        ),
    ),
}


@dataclass(frozen=True)
class Asset:
    body: bytes
    media_type: str
    etag: str


@functools.cache
def assets_version() -> str:
    return metadata.version(ASSETS_PACKAGE)


@functools.cache
def load_assets() -> dict[str, Asset]:
    """The asset files, read once per process (about 2.8 MB); a missing one is an error at
    start, not a blank page later."""
    try:
        static = resources.files("fastapi_offline").joinpath("static")
    except ModuleNotFoundError as exc:  # pragma: no cover - a declared dependency
        raise RuntimeError(
            f"the docs pages need the package {ASSETS_PACKAGE!r} (a dependency of hsl)"
        ) from exc
    out: dict[str, Asset] = {}
    for name, media_type in ASSET_TYPES.items():
        file = static.joinpath(name)
        if not file.is_file():
            raise RuntimeError(
                f"{ASSETS_PACKAGE} {assets_version()} does not ship static/{name}; "
                "install a version in the range pyproject.toml names"
            )
        body = file.read_bytes()
        for old, new in ASSET_SUBSTITUTIONS.get(name, ()):
            body = body.replace(old, new)
        etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
        out[name] = Asset(body, media_type, etag)
    return out


def asset_url(root: str, name: str) -> str:
    return f"{root}{ASSETS_PREFIX}/{assets_version()}/{name}"


def install(app: FastAPI) -> None:
    """Add ``/docs``, ``/docs/oauth2-redirect``, ``/redoc`` and the asset route to ``app``
    (created with ``docs_url=None, redoc_url=None``)."""
    load_assets()
    router = APIRouter(include_in_schema=False)
    oauth2_redirect = app.swagger_ui_oauth2_redirect_url or "/docs/oauth2-redirect"

    @router.get("/docs")
    async def swagger_ui(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_swagger_ui_html(
            openapi_url=f"{root}{app.openapi_url}",
            title=f"{app.title} - Swagger UI",
            swagger_js_url=asset_url(root, "swagger-ui-bundle.js"),
            swagger_css_url=asset_url(root, "swagger-ui.css"),
            swagger_favicon_url=asset_url(root, "favicon.png"),
            oauth2_redirect_url=f"{root}{oauth2_redirect}",
            # the badge would send the schema's URL to validator.swagger.io
            swagger_ui_parameters={"validatorUrl": None},
        )

    @router.get(oauth2_redirect)
    async def swagger_ui_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    @router.get("/redoc")
    async def redoc(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_redoc_html(
            openapi_url=f"{root}{app.openapi_url}",
            title=f"{app.title} - ReDoc",
            redoc_js_url=asset_url(root, "redoc.standalone.js"),
            redoc_favicon_url=asset_url(root, "favicon.png"),
            with_google_fonts=False,
        )

    @router.api_route(ASSETS_PREFIX + "/{version}/{name}", methods=["GET", "HEAD"])
    async def asset(version: str, name: str, request: Request) -> Response:
        found = load_assets().get(name)
        if found is None or version != assets_version():
            raise NotFound(
                f"no docs asset {version}/{name}; this service serves "
                f"{ASSETS_PREFIX}/{assets_version()}/{{{', '.join(ASSET_TYPES)}}}"
            )
        headers = {"Cache-Control": CACHE_CONTROL, "ETag": found.etag}
        if _matches(request.headers.get("if-none-match"), found.etag):
            return Response(status_code=304, headers=headers)
        body = b"" if request.method == "HEAD" else found.body
        headers["Content-Length"] = str(len(found.body))
        return Response(body, media_type=found.media_type, headers=headers)

    app.include_router(router)


def _matches(if_none_match: str | None, etag: str) -> bool:
    """RFC 9110 section 13.1.2: weak comparison against each listed tag, or ``*``."""
    if not if_none_match:
        return False
    if if_none_match.strip() == "*":
        return True
    return etag in {t.strip().removeprefix("W/") for t in if_none_match.split(",")}
