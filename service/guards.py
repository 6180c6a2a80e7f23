"""A pure ASGI guard in front of the application, for what must be refused before routing:

- **Request smuggling.** A request with both ``Content-Length`` and ``Transfer-Encoding``
  is ambiguous: h11 (uvicorn's HTTP/1.1 parser) frames it by ``Transfer-Encoding`` and keeps
  the connection open, so bytes a proxy counted as this request's body are read as a second
  request. RFC 9112 section 6.1 says such a request may be refused and the connection MUST
  be closed after the answer: the guard answers 400 with ``Connection: close``, which makes
  h11 and uvicorn close the connection after the response, whatever bytes follow it.
- **DNS rebinding.** Where ``Settings.host_names`` is set (by default: the keyless service),
  a ``Host`` header naming another host gets 400: a page of ``evil.example`` whose name was
  rebound to 127.0.0.1 reaches the port, but its requests carry its own name. IP addresses
  cannot be rebound; the loopback ones are allowed, the port is not checked (the attacker
  controls the name, not the port the browser connects to).
- **Cross-site requests (CSRF).** On the keyless service a browser's requests need no
  credentials, so a state-changing request (POST, PUT, PATCH, DELETE) without an
  ``Authorization`` header is refused with 403 when its ``Origin`` is another origin (or
  ``null``) or ``Sec-Fetch-Site`` says cross-site or same-site, and with 415 when it carries
  no ``Origin`` of its own host and is not ``application/json``: an HTML form can only send
  form or text bodies, and a cross-site script cannot send JSON without a CORS preflight,
  which this service never grants. The browser on ``/docs`` sends its own origin and passes;
  ``curl`` and the ``hsl`` client send JSON. A request with a key is not a CSRF vector (a
  browser never adds a bearer key by itself) and the key is checked as usual.
"""

from __future__ import annotations

import ipaddress
import json
from typing import Any
from urllib.parse import urlsplit

from .config import Settings
from .errors import PROBLEM, TYPE_BASE

UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


def host_name(value: str) -> str | None:
    """The name of a ``Host`` header value (lower case, no port, no brackets, no final dot),
    or None when it is malformed."""
    value = value.strip().lower()
    if value.startswith("["):
        end = value.find("]")
        rest = value[end + 1 :] if end > 0 else "x"
        if rest and not (rest.startswith(":") and rest[1:].isdigit()):
            return None
        return value[1:end]
    name, sep, port = value.rpartition(":")
    if not sep:
        name = value
    elif not port.isdigit() or ":" in name:
        return None
    name = name.rstrip(".")
    return name or None


def host_allowed(name: str | None, allowed: frozenset[str]) -> bool:
    if name is None:
        return False
    if name in allowed:
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


class RequestGuard:
    def __init__(self, app: Any, settings: Settings):
        self.app = app
        self.allowed = settings.host_names
        self.keyless = not settings.keys_required

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers: dict[bytes, list[bytes]] = {}
        for key, value in scope["headers"]:
            headers.setdefault(key.lower(), []).append(value)

        def one(name: bytes) -> str | None:
            values = headers.get(name)
            return values[0].decode("latin-1") if values else None

        if b"content-length" in headers and b"transfer-encoding" in headers:
            await _refuse(
                send,
                scope,
                400,
                "bad-request",
                "Bad request",
                "a request may not carry both Content-Length and Transfer-Encoding "
                "(RFC 9112 section 6.1); the connection is closed",
                field="Transfer-Encoding",
                close=True,
            )
            return
        host = one(b"host")
        if self.allowed is not None and not host_allowed(host_name(host or ""), self.allowed):
            await _refuse(
                send,
                scope,
                400,
                "host-not-allowed",
                "Host not allowed",
                f"this service does not answer to the host {host!r}; use localhost or "
                "127.0.0.1, or add the name to HSL_ALLOWED_HOSTS",
                field="Host",
            )
            return
        if self.keyless and scope["method"] in UNSAFE_METHODS and b"authorization" not in headers:
            origin = one(b"origin")
            fetch_site = (one(b"sec-fetch-site") or "").strip().lower()
            same_origin = origin is not None and _netloc(origin) == (host or "").strip().lower()
            if (origin is not None and not same_origin) or fetch_site in (
                "cross-site",
                "same-site",
            ):
                await _refuse(
                    send,
                    scope,
                    403,
                    "cross-site-request",
                    "Cross-site request refused",
                    f"a state-changing request from another origin ({origin or fetch_site}) is "
                    "refused by the keyless service",
                    field="Origin",
                )
                return
            ctype = (one(b"content-type") or "").split(";")[0].strip().lower()
            if not same_origin and ctype != "application/json":
                await _refuse(
                    send,
                    scope,
                    415,
                    "unsupported-media-type",
                    "Unsupported media type",
                    f"state-changing requests to the keyless service must be application/json "
                    f"(got {ctype or 'no content type'!r}); a browser cannot send that from "
                    "another site",
                    field="Content-Type",
                )
                return
        await self.app(scope, receive, send)


def _netloc(origin: str) -> str | None:
    try:
        parts = urlsplit(origin.strip())
    except ValueError:
        return None
    if parts.scheme not in ("http", "https") or not parts.netloc:
        return None
    return parts.netloc.lower()


async def _refuse(
    send,
    scope,
    status: int,
    type_: str,
    title: str,
    detail: str,
    *,
    field: str,
    close: bool = False,
) -> None:
    body = json.dumps(
        {
            "type": TYPE_BASE + type_,
            "title": title,
            "status": status,
            "detail": detail,
            "instance": scope.get("path", ""),
            "errors": [{"field": field, "message": detail}],
        }
    ).encode()
    headers = [
        (b"content-type", PROBLEM.encode()),
        (b"content-length", str(len(body)).encode()),
    ]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
