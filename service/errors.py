"""Typed errors and the one handler that renders them as RFC 9457 problem+json.

Every error response of the service, including framework ones (404 route, 405, payload
validation) and unexpected ones, goes out as ``application/problem+json``.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DBAPIError, IntegrityError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("hsl.service")

PROBLEM = "application/problem+json"
TYPE_BASE = "https://hsl.dev/problems/"

# An error response as the OpenAPI document declares it: problem+json alone, with its schema
# (a route's ``"model"`` would also advertise an application/json error that never comes).
# The app's OpenAPI builder adds the ``Problem`` schema to the components.
PROBLEM_RESPONSE: dict[str, Any] = {
    "content": {PROBLEM: {"schema": {"$ref": "#/components/schemas/Problem"}}}
}


class ProblemError(Exception):
    status: int = 500
    type: str = "internal"
    title: str = "Internal error"

    def __init__(
        self,
        detail: str,
        *,
        errors: list[dict[str, str]] | None = None,
        headers: dict[str, str] | None = None,
        **extra: Any,
    ):
        super().__init__(detail)
        self.detail = detail
        self.errors = errors
        self.headers = headers or {}
        self.extra = extra


class BadRequest(ProblemError):
    status, type, title = 400, "bad-request", "Bad request"


class Unauthorized(ProblemError):
    status, type, title = 401, "unauthorized", "Missing or invalid API key"

    def __init__(self, detail: str, **kw: Any):
        kw.setdefault("headers", {"WWW-Authenticate": "Bearer"})
        super().__init__(detail, **kw)


class NotFound(ProblemError):
    status, type, title = 404, "not-found", "Not found"


class Conflict(ProblemError):
    status, type, title = 409, "conflict", "Conflict"


class PayloadTooLarge(ProblemError):
    status, type, title = 413, "too-large", "Request body too large"


class UnsupportedMediaType(ProblemError):
    status, type, title = 415, "unsupported-media-type", "Unsupported media type"


class InvalidSpec(ProblemError):
    status, type, title = 422, "invalid-spec", "Invalid experiment spec"


class TooLarge(ProblemError):
    """The spec is valid but asks for more than this deployment allows."""

    status, type, title = 422, "resource-limit", "Experiment exceeds the deployment's limits"


class Unavailable(ProblemError):
    status, type, title = 503, "unavailable", "Service temporarily unavailable"

    def __init__(self, detail: str, **kw: Any):
        kw.setdefault("headers", {"Retry-After": "5"})
        super().__init__(detail, **kw)


def problem(
    status: int,
    title: str,
    detail: str,
    *,
    type_: str,
    instance: str | None = None,
    headers: dict[str, str] | None = None,
    **extra: Any,
) -> JSONResponse:
    body: dict[str, Any] = {
        "type": TYPE_BASE + type_,
        "title": title,
        "status": status,
        "detail": detail,
    }
    if instance:
        body["instance"] = instance
    body.update({k: v for k, v in extra.items() if v is not None})
    return JSONResponse(body, status_code=status, media_type=PROBLEM, headers=headers)


_HTTP_TYPES = {
    400: ("bad-request", "Bad request"),
    401: ("unauthorized", "Missing or invalid API key"),
    404: ("not-found", "Not found"),
    405: ("method-not-allowed", "Method not allowed"),
    413: ("too-large", "Request body too large"),
    415: ("unsupported-media-type", "Unsupported media type"),
    422: ("invalid-request", "Invalid request"),
    429: ("rate-limited", "Too many requests"),
}


def _field(loc: tuple[Any, ...] | list[Any]) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    out = ""
    for p in parts:
        out += f"[{p}]" if p.isdigit() else (f".{p}" if out else p)
    return out or "body"


def is_outage(exc: DBAPIError) -> bool:
    """Whether a database error means the database is unreachable or overloaded (503, retry),
    rather than that it refused the statement (a data or integrity error: never an outage).
    Operational errors cover lost connections, refused connections, lock and statement
    timeouts, deadlocks and serialization failures (worth a retry); interface errors a broken
    driver connection."""
    return bool(exc.connection_invalidated) or isinstance(exc, (OperationalError, InterfaceError))


def install(app: FastAPI) -> None:
    @app.exception_handler(ProblemError)
    async def _problem(request: Request, exc: ProblemError) -> JSONResponse:
        return problem(
            exc.status,
            exc.title,
            exc.detail,
            type_=exc.type,
            instance=request.url.path,
            headers=exc.headers,
            errors=exc.errors,
            **exc.extra,
        )

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [
            {"field": _field(e.get("loc", ())), "message": e.get("msg", "")} for e in exc.errors()
        ]
        return problem(
            422,
            "Invalid request",
            "; ".join(f"{e['field']}: {e['message']}" for e in errors),
            type_="invalid-request",
            instance=request.url.path,
            errors=errors,
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        type_, title = _HTTP_TYPES.get(exc.status_code, ("http-error", "HTTP error"))
        return problem(
            exc.status_code,
            title,
            str(exc.detail),
            type_=type_,
            instance=request.url.path,
            headers=getattr(exc, "headers", None),
        )

    @app.exception_handler(DBAPIError)
    async def _database(request: Request, exc: DBAPIError) -> JSONResponse:
        if not is_outage(exc):
            # the database answered and refused this statement: a bug or input that slipped
            # past validation, not an outage; a 503 would tell the client to retry for ever
            if isinstance(exc, IntegrityError):
                log.warning("integrity error on %s: %s", request.url.path, exc)
                return problem(
                    409,
                    "Conflict",
                    "the request conflicts with the stored state; read it and retry",
                    type_="conflict",
                    instance=request.url.path,
                )
            log.error("database refused a statement on %s: %s", request.url.path, exc)
            return problem(
                500,
                "Internal error",
                "an unexpected error occurred; it has been logged",
                type_="internal",
                instance=request.url.path,
            )
        log.warning("database error on %s: %s", request.url.path, exc)
        return problem(
            503,
            "Service temporarily unavailable",
            "the database is unavailable; retry shortly",
            type_="unavailable",
            instance=request.url.path,
            headers={"Retry-After": "5"},
        )

    @app.exception_handler(PoolTimeout)
    async def _pool(request: Request, exc: PoolTimeout) -> JSONResponse:
        log.warning("no database connection free for %s: %s", request.url.path, exc)
        return problem(
            503,
            "Service overloaded",
            "no database connection was free in time; retry shortly",
            type_="overloaded",
            instance=request.url.path,
            headers={"Retry-After": "1"},
        )

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        return problem(
            500,
            "Internal error",
            "an unexpected error occurred; it has been logged",
            type_="internal",
            instance=request.url.path,
        )
