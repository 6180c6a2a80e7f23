"""The web page at ``GET /``: plain HTML, CSS and JavaScript modules shipped in this package
(``static/``), served by the API itself. No build step, no CDN, no external fonts.

The page calls the same ``/v1`` routes as any client, with ``Authorization: Bearer`` when the
user gave a key. It is served keyless (it holds no data); the ``<meta name="hsl-keys">`` it
carries tells the script whether this service requires keys, so the key prompt shows before
the first request instead of after a 401.

Every answer carries a Content-Security-Policy of this origin only: scripts, styles and
fetches from ``'self'``, images from ``'self'`` and ``blob:`` (figures are fetched with the key
and shown as blob URLs), no inline script or style, no frames, forms post nowhere else.
"""

from __future__ import annotations

import functools
from importlib import resources

from fastapi import APIRouter, Request, Response

from ..errors import NotFound

router = APIRouter(include_in_schema=False)

CSP = "; ".join(
    [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' blob:",
        "connect-src 'self'",
        "base-uri 'none'",
        "form-action 'self'",
        "frame-ancestors 'none'",
    ]
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}
# the files under static/ and their media types: nothing else is served
ASSETS = {
    "app.css": "text/css; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "api.js": "text/javascript; charset=utf-8",
    "live.js": "text/javascript; charset=utf-8",
    "views.js": "text/javascript; charset=utf-8",
    "format.js": "text/javascript; charset=utf-8",
    "favicon.svg": "image/svg+xml",
}


@functools.cache
def _read(name: str) -> bytes:
    return resources.files(__package__).joinpath("static", name).read_bytes()


@router.get("/")
def index(request: Request) -> Response:
    """The page; the key prompt shows at once where this service requires keys."""
    required = "required" if request.app.state.settings.keys_required else "optional"
    body = _read("index.html").replace(b"{{keys}}", required.encode())
    return Response(
        body,
        media_type="text/html; charset=utf-8",
        headers={**SECURITY_HEADERS, "Cache-Control": "no-cache"},
    )


@router.get("/static/{name}")
def asset(name: str) -> Response:
    """One of the page's files (``ASSETS``), with its media type."""
    media = ASSETS.get(name)
    if media is None:
        raise NotFound(f"no static file {name!r}")
    return Response(
        _read(name), media_type=media, headers={**SECURITY_HEADERS, "Cache-Control": "no-cache"}
    )
