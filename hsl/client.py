"""A client of the hsl service, for notebooks and for the command line.

``hsl.Client(url, key)`` submits experiments, follows them live and fetches their results::

    from hsl import Client
    c = Client("http://127.0.0.1:8000")
    exp = c.submit("fig2-cpu")                  # a preset, a spec dict or a spec file
    c.wait(exp["id"])                           # live progress (events stream, else polling)
    c.results(exp["id"]).points_frame()         # a pandas DataFrame

Errors are typed (`HslError` and its subclasses), never ``SystemExit``. Requests that are safe
to repeat (GET, DELETE, cancel, and a submit: it always carries an ``Idempotency-Key``) are
retried after a lost connection, a 429 or a 503, with exponential backoff and jitter, waiting
at least what ``Retry-After`` asks, until ``patience`` seconds have passed without an answer
(``HSL_CLIENT_PATIENCE``, default 300). Before the service has answered this client once, a
refused connection fails after ``connect_patience`` seconds (3): nothing is listening there.

The client commands of the command line (submit, status, wait, results, list, cancel, delete)
use this client; they turn its errors into messages and exit codes (`EXIT_CODES`).
"""

from __future__ import annotations

import argparse
import email.utils
import json
import logging
import os
import random
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from .results import Results

log = logging.getLogger("hsl.client")

TERMINAL = ("succeeded", "failed", "cancelled")
DEFAULT_URL = "http://127.0.0.1:8000"
DEFAULT_PATIENCE = 300.0
PROBLEM = "application/problem+json"
# a quiet event stream sends a comment every 15 s: this long without a byte is a lost stream
STREAM_READ_TIMEOUT = 60.0


# -- errors ---------------------------------------------------------------------------------
class HslError(Exception):
    """An error talking to the service. ``status`` is the HTTP status (None without an
    answer), ``problem`` the RFC 9457 problem document when the service sent one."""

    exit_code = 1

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        problem: dict[str, Any] | None = None,
        url: str | None = None,
    ):
        super().__init__(message)
        self.message = message
        self.after_lost_contact = False  # an earlier attempt of the request got no answer
        self.status = status
        self.problem = problem
        self.url = url

    @property
    def errors(self) -> list[dict[str, str]]:
        """The problem's ``errors: [{field, message}]`` (empty when it has none)."""
        return list((self.problem or {}).get("errors") or [])


ClientError = HslError  # the former name


class ValidationError(HslError):
    """The service refused the input (400, 413, 415, 422); ``errors`` names the fields."""

    exit_code = 2


class Unauthorized(HslError):
    """401: no key, or an unknown or revoked one (403: a cross-site request)."""


class NotFound(HslError):
    """404: no such experiment for this key's tenant (another tenant's id looks the same)."""


class Conflict(HslError):
    """409: e.g. an ``Idempotency-Key`` reused with another spec."""


class ServiceUnavailable(HslError):
    """The service stayed unreachable, overloaded or unavailable (503) for ``patience``."""

    exit_code = 4


class Unreachable(ServiceUnavailable):
    """No answer at all: the connection was refused, reset or timed out until ``patience``."""


class RateLimited(ServiceUnavailable):
    """429 for longer than ``patience`` (the tenant's submission rate or quota)."""


class NotAnHslService(HslError):
    """What answers at the URL is not an hsl service (another web server, a proxy's page)."""

    exit_code = 4


class WaitTimeout(HslError):
    """`Client.wait` ran past its ``timeout`` (the experiment goes on)."""

    exit_code = 3


_BY_STATUS: dict[int, type[HslError]] = {
    400: ValidationError,
    401: Unauthorized,
    403: Unauthorized,
    404: NotFound,
    409: Conflict,
    413: ValidationError,
    415: ValidationError,
    422: ValidationError,
    429: RateLimited,
    503: ServiceUnavailable,
}


def _problem_text(r: httpx.Response) -> str:
    """A problem document as the command line prints it (``hsl: Title (status): detail``
    and one line per field error)."""
    try:
        body = r.json()
    except ValueError:
        return f"hsl: HTTP {r.status_code}: {r.text[:300]}"
    if not isinstance(body, dict):
        return f"hsl: HTTP {r.status_code}: {r.text[:300]}"
    lines = [f"hsl: {body.get('title', 'error')} ({r.status_code}): {body.get('detail', '')}"]
    for err in body.get("errors") or []:
        lines.append(f"  {err.get('field')}: {err.get('message')}")
    return "\n".join(lines)


def _retry_after(r: httpx.Response) -> float | None:
    """``Retry-After`` in seconds (delta-seconds or an HTTP date), None when absent."""
    value = r.headers.get("retry-after")
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


# -- retries --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Retry:
    """One retry about to happen: what failed, which attempt this is, how long until it."""

    url: str
    attempt: int
    delay: float
    reason: str
    lost: bool  # no answer (connection refused, reset, timed out) rather than 429/503
    contacted: bool = True  # the service had answered this client before

    def message(self) -> str:
        if not self.lost:
            what = f"the service at {self.url} is busy"
        elif self.contacted:
            what = f"lost contact with the service at {self.url}"
        else:
            what = f"cannot reach the service at {self.url}"
        return (
            f"hsl: {what}, retrying (attempt {self.attempt}, in {self.delay:.1f} s): {self.reason}"
        )


def _log_retry(event: Retry) -> None:
    log.warning("%s", event.message().removeprefix("hsl: "))


class _Streak:
    """A run of failures of one operation: backoff with jitter, Retry-After honoured, and
    the deadline (``patience`` from the first failure; reset by any answer)."""

    def __init__(self, client: Client):
        self.client = client
        self.attempt = 0
        self.lost = 0  # attempts that got no answer
        self.first: float | None = None

    def ok(self) -> None:
        self.attempt, self.first = 0, None

    def fail(self, reason: str, *, lost: bool, retry_after: float | None = None) -> float | None:
        """Sleep before the next attempt; None (no sleep) when the deadline has passed."""
        c = self.client
        now = time.monotonic()
        if self.first is None:
            self.first = now
        self.attempt += 1
        self.lost += lost
        patience = c.patience if (c.contacted or not lost) else c.connect_patience
        left = patience - (now - self.first)
        if left <= 0:
            return None
        if retry_after is not None:  # never earlier than asked; spread a little
            delay = retry_after * random.uniform(1.0, 1.2)
        else:
            base = min(c.backoff_cap, c.backoff_base * 2 ** (self.attempt - 1))
            delay = random.uniform(base / 2, base)  # "equal jitter"
        delay = min(delay, left)
        c.on_retry(Retry(c.url, self.attempt, delay, reason, lost, c.contacted))
        c.sleep(delay)
        return delay

    def elapsed(self) -> float:
        return 0.0 if self.first is None else time.monotonic() - self.first


# -- events ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Event:
    """One Server-Sent Event: ``event`` (``point``, ``status``), ``data`` (parsed JSON), ``id``."""

    event: str
    data: Any
    id: str | None


def _sse(lines: Iterator[str]) -> Iterator[Event]:
    """Parse ``text/event-stream`` lines (the WHATWG format: fields, comments, blank line
    dispatches)."""
    name, data, event_id = "message", [], None
    for line in lines:
        if line == "":
            if data:
                text = "\n".join(data)
                try:
                    parsed = json.loads(text)
                except ValueError:
                    parsed = text
                yield Event(name, parsed, event_id)
            name, data = "message", []
            continue
        if line.startswith(":"):
            continue  # a comment: the heartbeat
        field, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if field == "event":
            name = value
        elif field == "data":
            data.append(value)
        elif field == "id":
            event_id = value


class _NoStream(Exception):
    """The service offers no event stream for this wait (an older one, or at its cap)."""


# -- the client -----------------------------------------------------------------------------
class Client:
    """A client of one hsl service.

    ``url`` defaults to ``$HSL_URL`` (else http://127.0.0.1:8000), ``key`` to
    ``$HSL_API_KEY``. ``patience``: how long a request keeps retrying after a lost
    connection, a 429 or a 503 before it raises (default ``$HSL_CLIENT_PATIENCE`` or 300 s).
    ``on_retry`` is told of each retry (default: a warning on the ``hsl.client`` logger).
    """

    def __init__(
        self,
        url: str | None = None,
        key: str | None = None,
        timeout: float = 30.0,
        *,
        patience: float | None = None,
        connect_patience: float = 3.0,
        backoff_base: float = 0.5,
        backoff_cap: float = 15.0,
        on_retry: Callable[[Retry], None] | None = None,
        transport: httpx.BaseTransport | None = None,
    ):
        url = url or os.environ.get("HSL_URL") or DEFAULT_URL
        key = key if key is not None else os.environ.get("HSL_API_KEY") or None
        if patience is None:
            raw = os.environ.get("HSL_CLIENT_PATIENCE")
            try:
                patience = float(raw) if raw else DEFAULT_PATIENCE
            except ValueError:
                raise ValueError(
                    f"HSL_CLIENT_PATIENCE must be a number of seconds, not {raw!r}"
                ) from None
        self.url = url.rstrip("/")
        self.patience = patience
        self.connect_patience = connect_patience
        self.backoff_base, self.backoff_cap = backoff_base, backoff_cap
        self.on_retry = on_retry or _log_retry
        self.sleep = time.sleep
        self.contacted = False  # the service has answered this client at least once
        self.last_submit_created = False  # whether the last submit created an experiment
        # every request says it is JSON: the keyless service refuses bodyless writes
        # without it (README, "The keyless service and browsers")
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if key:
            headers["Authorization"] = f"Bearer {key}"
        self.http = httpx.Client(
            base_url=self.url, headers=headers, timeout=timeout, transport=transport
        )

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    def __repr__(self) -> str:
        return f"<hsl.Client {self.url}>"

    # -- transport ------------------------------------------------------------------------
    def request(
        self, method: str, path: str, *, idempotent: bool | None = None, **kw: Any
    ) -> httpx.Response:
        """One request, retried as the class says; the response (2xx or 304), else a typed
        error. ``idempotent`` (default: GET, HEAD, PUT, DELETE, or a request with an
        ``Idempotency-Key``) allows retrying after a connection error once the request may
        have been sent; a refused connection (nothing sent) is always retried."""
        return self._send(method, path, idempotent=idempotent, stream=False, **kw)

    def get_json(self, path: str, **kw: Any) -> Any:
        return self._json(self.request("GET", path, **kw), path)

    def _send(
        self,
        method: str,
        path: str,
        *,
        idempotent: bool | None,
        stream: bool,
        retry_busy: bool = True,
        **kw: Any,
    ) -> httpx.Response:
        headers = kw.get("headers") or {}
        if idempotent is None:
            idempotent = method.upper() in ("GET", "HEAD", "PUT", "DELETE", "OPTIONS") or any(
                k.lower() == "idempotency-key" for k in headers
            )
        streak = _Streak(self)
        while True:
            try:
                req = self.http.build_request(method, path, **kw)
                r = self.http.send(req, stream=stream)
            except httpx.TransportError as exc:
                nothing_sent = isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout))
                if not (idempotent or nothing_sent) or streak.fail(_reason(exc), lost=True) is None:
                    raise self._unreachable(exc, streak, method, path) from None
                continue
            self.contacted = True
            transient = r.status_code in (429, 503) or (idempotent and r.status_code in (502, 504))
            if (
                transient
                and retry_busy
                and (idempotent or r.status_code == 429 or _problem_type(r) == "overloaded")
            ):
                if stream:
                    r.read()
                if (
                    streak.fail(_status_reason(r), lost=False, retry_after=_retry_after(r))
                    is not None
                ):
                    continue
            if r.status_code >= 400:
                if stream:
                    r.read()
                err = self._error(r, method, path, streak)
                err.after_lost_contact = streak.lost > 0
                raise err
            return r

    def _unreachable(self, exc: Exception, streak: _Streak, method: str, path: str) -> Unreachable:
        reason = _reason(exc)
        if not self.contacted:
            return Unreachable(
                f"cannot reach the service at {self.url} ({reason}); is it running? "
                "Start one with 'hsl serve', or pass --url (HSL_URL)",
                url=self.url,
            )
        return Unreachable(
            f"lost contact with the service at {self.url}: {method} {path} got no answer "
            f"for {streak.elapsed():.0f} s ({streak.attempt} attempts, patience "
            f"{self.patience:g} s, HSL_CLIENT_PATIENCE); last error: {reason}",
            url=self.url,
        )

    def _error(self, r: httpx.Response, method: str, path: str, streak: _Streak) -> HslError:
        ctype = r.headers.get("content-type", "").split(";")[0].strip().lower()
        problem = None
        if ctype in (PROBLEM, "application/json"):
            try:
                body = r.json()
            except ValueError:
                body = None
            if isinstance(body, dict) and "title" in body and "status" in body:
                problem = body
        if problem is None:
            if r.status_code in (502, 503, 504):  # a proxy in front, without the service
                return ServiceUnavailable(
                    f"the service at {self.url} is unavailable: {method} {path} answered "
                    f"{r.status_code} {r.reason_phrase} for {streak.elapsed():.0f} s "
                    f"({_snippet(r)})",
                    status=r.status_code,
                    url=self.url,
                )
            return self._not_hsl(r, method, path)
        cls = _BY_STATUS.get(r.status_code, HslError)
        text = _problem_text(r).removeprefix("hsl: ")
        if cls in (ServiceUnavailable, RateLimited):
            text += f" (still after {streak.elapsed():.0f} s, HSL_CLIENT_PATIENCE)"
        if cls is Unauthorized and r.status_code == 401:
            text += "\n  pass --key or set HSL_API_KEY (hsl keys create --tenant NAME mints one)"
        return cls(text, status=r.status_code, problem=problem, url=self.url)

    def _not_hsl(self, r: httpx.Response, method: str, path: str) -> NotAnHslService:
        ctype = r.headers.get("content-type") or "no content type"
        return NotAnHslService(
            f"{self.url} does not look like an hsl service: {method} {path} answered "
            f"{r.status_code} {r.reason_phrase} with {ctype} ({_snippet(r)}); check --url "
            "(HSL_URL)",
            status=r.status_code,
            url=self.url,
        )

    def _json(self, r: httpx.Response, path: str, *keys: str) -> Any:
        """The JSON body of a response that must carry ``keys`` (else: not an hsl service)."""
        ctype = r.headers.get("content-type", "").split(";")[0].strip().lower()
        try:
            body = r.json() if ctype == "application/json" else None
        except ValueError:
            body = None
        if body is None or (keys and not (isinstance(body, dict) and all(k in body for k in keys))):
            raise self._not_hsl(r, r.request.method, path)
        return body

    # -- experiments ----------------------------------------------------------------------
    def submit(
        self,
        spec: Any,
        *,
        name: str | None = None,
        overrides: Mapping[str, Any] | None = None,
        idempotency_key: str | None = None,
        wait: bool = False,
        **wait_options: Any,
    ) -> dict[str, Any]:
        """Submit ``spec``: a spec dict, an engine spec, a path to a spec JSON file, or the
        name of a preset (its spec comes from the service). ``name`` renames it;
        ``overrides`` sets fields by dotted path (``{"model.gamma": 0.8}``).

        Returns the status document (``["id"]`` is the experiment's id); the same spec
        submitted again returns the existing experiment. An ``Idempotency-Key`` (a new one
        unless given) makes a retry after a lost answer return what the first attempt
        created. With ``wait``, returns `wait`'s final status document instead.
        """
        body = self._spec_dict(spec)
        if name is not None:
            body["name"] = name
        for dotted, value in (overrides or {}).items():
            _set_path(body, dotted, value)
        key = idempotency_key or f"hsl-client-{uuid.uuid4().hex}"
        r = self.request("POST", "/v1/experiments", json=body, headers={"Idempotency-Key": key})
        doc = self._json(r, "/v1/experiments", "id", "status", "progress")
        self.last_submit_created = r.status_code == 201
        if wait:
            return self.wait(doc["id"], **wait_options)
        return doc

    def _spec_dict(self, spec: Any) -> dict[str, Any]:
        if isinstance(spec, Mapping):
            return json.loads(json.dumps(spec))  # a deep copy, JSON only
        if hasattr(spec, "model_dump"):
            return spec.model_dump(mode="json")
        if isinstance(spec, (str, Path)):
            path = Path(spec)
            if path.suffix == ".json" or path.exists():
                try:
                    return json.loads(path.read_text())
                except OSError as exc:
                    raise ValidationError(f"cannot read spec file {path}: {exc.strerror}") from None
                except json.JSONDecodeError as exc:
                    raise ValidationError(f"{path} is not valid JSON: {exc}") from None
            return self.preset(str(spec))["spec"]
        raise TypeError(f"a spec is a dict, a spec file path or a preset name, not {type(spec)}")

    def preset(self, name: str) -> dict[str, Any]:
        """A preset: ``{name, description, spec, estimate}``."""
        return self.get_json(f"/v1/presets/{_segment(name)}")

    def presets(self) -> list[dict[str, Any]]:
        return self.get_json("/v1/presets")

    def get(self, experiment_id: str) -> dict[str, Any]:
        """The status document: status, progress (points, fraction, ETA), error, links."""
        path = f"/v1/experiments/{_segment(experiment_id)}"
        return self._json(self.request("GET", path), path, "id", "status", "progress")

    def list(
        self, *, status: str | None = None, name: str | None = None, limit: int | None = None
    ) -> list[dict[str, Any]]:
        """The tenant's experiments, newest first (all of them, or the first ``limit``)."""
        out: list[dict[str, Any]] = []
        cursor = None
        while limit is None or len(out) < limit:
            params: dict[str, Any] = {"limit": 200 if limit is None else min(200, limit - len(out))}
            if status is not None:
                params["status"] = status
            if name is not None:
                params["name"] = name
            if cursor is not None:
                params["cursor"] = cursor
            page = self._json(
                self.request("GET", "/v1/experiments", params=params),
                "/v1/experiments",
                "items",
                "next_cursor",
            )
            out.extend(page["items"])
            cursor = page["next_cursor"]
            if cursor is None:
                break
        return out

    def cancel(self, experiment_id: str) -> dict[str, Any]:
        """Cancel (idempotent): queued runs never start, running ones stop at their next
        point. Returns the status document."""
        path = f"/v1/experiments/{_segment(experiment_id)}/cancel"
        return self._json(self.request("POST", path, idempotent=True), path, "id", "status")

    def delete(self, experiment_id: str) -> None:
        """Cancel if needed, then remove the experiment with its data."""
        path = f"/v1/experiments/{_segment(experiment_id)}"
        try:
            self.request("DELETE", path)
        except NotFound as exc:
            # a retry after a lost answer finds it gone: the lost attempt deleted it
            if not exc.after_lost_contact:
                raise

    def results(self, experiment_id: str) -> Results:
        """The results document (partial while it runs) as a `Results`."""
        path = f"/v1/experiments/{_segment(experiment_id)}/results"
        return Results(self._json(self.request("GET", path), path, "spec", "points"))

    def results_csv(self, experiment_id: str) -> str:
        return self.request("GET", f"/v1/experiments/{_segment(experiment_id)}/results.csv").text

    def points_frame(self, experiment_id: str):
        """The points as a pandas DataFrame (`Results.points_frame`)."""
        return self.results(experiment_id).points_frame()

    def plot(self, experiment_id: str, name: str, fmt: str = "png") -> bytes:
        """A figure: ``name`` in mse, overlap, cos2, spectrum; ``fmt`` png or svg."""
        path = f"/v1/experiments/{_segment(experiment_id)}/plots/{_segment(name)}.{fmt}"
        return self.request("GET", path).content

    # -- waiting --------------------------------------------------------------------------
    def wait(
        self,
        experiment_id: str,
        *,
        timeout: float | None = None,
        on_status: Callable[[dict[str, Any]], None] | None = None,
        on_point: Callable[[dict[str, Any]], None] | None = None,
        stream: bool = True,
        poll_interval: float = 1.0,
    ) -> dict[str, Any]:
        """Until the experiment is succeeded, failed or cancelled; returns its final status
        document (check ``["status"]``). Follows the events stream (``on_point`` gets each
        stored point, ``on_status`` each new status document); where the service offers
        none, polls the status document (``If-None-Match``: 304 while nothing changed).
        A lost connection or a restarted service is retried within ``patience``; past
        ``timeout`` seconds, `WaitTimeout` (the experiment goes on)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        doc = self.get(experiment_id)
        if on_status is not None:
            on_status(doc)
        if doc["status"] in TERMINAL:
            return doc
        if stream:
            try:
                return self._wait_stream(experiment_id, doc, deadline, on_status, on_point)
            except _NoStream:
                pass
        return self._wait_poll(experiment_id, doc, deadline, on_status, poll_interval)

    def _check_deadline(self, deadline: float | None, doc: dict[str, Any]) -> None:
        if deadline is not None and time.monotonic() >= deadline:
            raise WaitTimeout(
                f"experiment {doc['id']} still {doc['status']} at the timeout "
                f"({doc['progress']['points_done']}/{doc['progress']['points_total']} points)",
                url=self.url,
            )

    def _wait_poll(
        self,
        experiment_id: str,
        doc: dict[str, Any],
        deadline: float | None,
        on_status: Callable[[dict[str, Any]], None] | None,
        interval: float,
    ) -> dict[str, Any]:
        path = f"/v1/experiments/{_segment(experiment_id)}"
        etag = None
        while doc["status"] not in TERMINAL:
            self._check_deadline(deadline, doc)
            self.sleep(
                interval
                if deadline is None
                else max(0.0, min(interval, deadline - time.monotonic()))
            )
            r = self.request("GET", path, headers={"If-None-Match": etag} if etag else {})
            if r.status_code == 304:
                continue
            etag = r.headers.get("etag")
            doc = self._json(r, path, "id", "status", "progress")
            if on_status is not None:
                on_status(doc)
        return doc

    def _wait_stream(
        self,
        experiment_id: str,
        doc: dict[str, Any],
        deadline: float | None,
        on_status: Callable[[dict[str, Any]], None] | None,
        on_point: Callable[[dict[str, Any]], None] | None,
    ) -> dict[str, Any]:
        path = f"/v1/experiments/{_segment(experiment_id)}/events"
        last_id: str | None = None
        streak = _Streak(self)
        while True:
            self._check_deadline(deadline, doc)
            read = STREAM_READ_TIMEOUT
            if deadline is not None:
                read = max(0.5, min(read, deadline - time.monotonic()))
            headers = {"Accept": "text/event-stream"}
            if last_id is not None:
                headers["Last-Event-ID"] = last_id
            try:
                r = self._send(
                    "GET",
                    path,
                    idempotent=True,
                    stream=True,
                    retry_busy=False,  # at the stream cap: poll instead, at once
                    headers=headers,
                    timeout=httpx.Timeout(self.http.timeout.connect or 30.0, read=read),
                )
            except (NotFound, ServiceUnavailable) as exc:
                if isinstance(exc, NotFound):
                    doc = self.get(experiment_id)  # raises NotFound if it is gone
                    raise _NoStream() from None  # the experiment exists: no events route
                if exc.status in (429, 503):  # at the stream cap: polling is cheap
                    raise _NoStream() from None
                raise
            except HslError as exc:
                if exc.status in (405, 406):
                    raise _NoStream() from None
                raise
            try:
                ctype = r.headers.get("content-type", "")
                if not ctype.startswith("text/event-stream"):
                    raise _NoStream()
                streak.ok()
                for event in _sse(r.iter_lines()):
                    last_id = event.id if event.id is not None else last_id
                    if event.event == "point" and on_point is not None:
                        on_point(event.data)
                    elif event.event == "status" and isinstance(event.data, dict):
                        doc = event.data
                        if on_status is not None:
                            on_status(doc)
                        if doc.get("status") in TERMINAL:
                            return doc
                # the stream ended without a terminal status: the server went away (a
                # restart closes streams) or the experiment was deleted; ask again
                doc = self.get(experiment_id)
                if doc["status"] in TERMINAL:
                    if on_status is not None:
                        on_status(doc)
                    return doc
            except httpx.TransportError as exc:
                if deadline is not None and time.monotonic() >= deadline:
                    self._check_deadline(deadline, doc)
                if streak.fail(_reason(exc), lost=True) is None:
                    raise self._unreachable(exc, streak, "GET", path) from None
            finally:
                r.close()


def _problem_type(r: httpx.Response) -> str | None:
    if not r.headers.get("content-type", "").startswith(PROBLEM):
        return None
    try:
        return str(r.json().get("type", "")).rsplit("/", 1)[-1]
    except (ValueError, AttributeError):
        return None


def _reason(exc: Exception) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) < 200 else text[:200] + "..."


def _status_reason(r: httpx.Response) -> str:
    detail = ""
    if r.headers.get("content-type", "").startswith(PROBLEM):
        try:
            detail = ": " + str(r.json().get("detail", ""))
        except (ValueError, AttributeError):
            pass
    return f"{r.status_code} {r.reason_phrase}{detail}"


def _snippet(r: httpx.Response) -> str:
    try:
        text = r.text
    except Exception:  # a streamed body not read
        return "..."
    text = " ".join(text.split())
    return repr(text[:120] + ("..." if len(text) > 120 else ""))


def _segment(value: str) -> str:
    """A path segment: an id or name must not reach another route."""
    from urllib.parse import quote

    return quote(str(value), safe="")


def _set_path(spec: dict[str, Any], dotted: str, value: Any) -> None:
    node = spec
    parts = dotted.split(".")
    for part in parts[:-1]:
        nxt = node.get(part)
        if not isinstance(nxt, dict):
            nxt = node[part] = {}
        node = nxt
    node[parts[-1]] = value


# -- the command line -----------------------------------------------------------------------
EXIT_CODES = """exit codes: 0 done (wait: succeeded); 1 the experiment failed or was cancelled,
or the service refused the request (not found, unauthorized, conflict); 2 invalid input;
3 --timeout; 4 the service was unreachable or unavailable for HSL_CLIENT_PATIENCE seconds,
or the URL is not an hsl service"""


def _cli_retry(event: Retry) -> None:
    if sys.stderr.isatty():  # below the progress bar, not on it
        sys.stderr.write("\n")
    print(event.message(), file=sys.stderr, flush=True)


def _client(args: argparse.Namespace) -> Client:
    from service.config import Settings

    settings = Settings()
    key = args.key or (settings.api_key.get_secret_value() if settings.api_key else None)
    return Client(args.url or settings.url, key, on_retry=_cli_retry)


def report(exc: HslError) -> int:
    """Print a client error as the command line does; its exit code."""
    print(f"hsl: {exc.message}", file=sys.stderr)
    return exc.exit_code


def cmd_submit(args: argparse.Namespace) -> int:
    from .cli import load_spec

    spec = load_spec(args.spec)  # validated here: a bad spec never leaves the machine
    with _client(args) as client:
        doc = client.submit(spec, idempotency_key=args.idempotency_key)
        note = "submitted" if client.last_submit_created else "already submitted (same spec)"
        print(
            f"hsl: {note}: {doc['name']} {doc['id']} ({doc['status']}, "
            f"{doc['progress']['points_total']} points)",
            file=sys.stderr,
        )
        print(doc["id"], flush=True)
        if args.wait:
            return _wait(client, doc["id"], quiet=False, timeout=None)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    with _client(args) as client:
        print(json.dumps(client.get(args.id), indent=1))
    return 0


def _bar(doc: dict[str, Any]) -> str:
    from .cli import _duration

    p = doc["progress"]
    width = 28
    fill = int(width * p["fraction"])
    return (
        f"[{'#' * fill}{'.' * (width - fill)}] {p['points_done']}/{p['points_total']} "
        f"points  {doc['status']}  ETA {_duration(p['eta_seconds'])}"
    )


def _wait(client: Client, exp_id: str, *, quiet: bool, timeout: float | None) -> int:
    tty = sys.stderr.isatty()
    last: list[str | None] = [None]

    def show(doc: dict[str, Any]) -> None:
        if quiet:
            return
        line = _bar(doc)
        if tty:
            sys.stderr.write("\r" + line.ljust(100))
        elif line != last[0]:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()
        last[0] = line

    try:
        doc = client.wait(exp_id, timeout=timeout, on_status=show)
    except WaitTimeout as exc:
        if not quiet and tty:
            sys.stderr.write("\n")
        print(f"hsl: {exc.message} after {timeout:g} s", file=sys.stderr)
        return 3
    if not quiet and tty:
        sys.stderr.write("\n")
    if doc["status"] != "succeeded":
        err = doc.get("error") or {}
        print(
            f"hsl: experiment {exp_id} {doc['status']}"
            + (f": {err.get('reason')}: {err.get('message')}" if err else ""),
            file=sys.stderr,
        )
        return 1
    print(
        f"hsl: experiment {exp_id} succeeded; 'hsl results {exp_id}' gets the results",
        file=sys.stderr,
    )
    return 0


def cmd_wait(args: argparse.Namespace) -> int:
    with _client(args) as client:
        return _wait(client, args.id, quiet=args.quiet, timeout=args.timeout)


def cmd_results(args: argparse.Namespace) -> int:
    with _client(args) as client:
        return _results(client, args)


def _results(client: Client, args: argparse.Namespace) -> int:
    if args.csv:
        text = client.results_csv(args.id)
    else:
        text = client.results(args.id).to_json()
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
        print(f"hsl: wrote {args.out}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    if args.plots:
        from .plots import FORMATS, PLOT_NAMES

        out = Path(args.plots)
        out.mkdir(parents=True, exist_ok=True)
        for name in PLOT_NAMES:
            for fmt in FORMATS:
                (out / f"{name}.{fmt}").write_bytes(client.plot(args.id, name, fmt))
        print(f"hsl: plots in {out}/", file=sys.stderr)
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    with _client(args) as client:
        items = client.list(status=args.status, name=args.name, limit=args.limit)
    if args.json:
        print(json.dumps(items, indent=1))
        return 0
    if not items:
        print(
            "hsl: no experiments" + (" match" if args.status or args.name else ""), file=sys.stderr
        )
        return 0
    print(f"{'id':<32}  {'status':<9}  {'points':>11}  {'created':<19}  name")
    for doc in items:
        p = doc["progress"]
        print(
            f"{doc['id']:<32}  {doc['status']:<9}  "
            f"{str(p['points_done']) + '/' + str(p['points_total']):>11}  "
            f"{str(doc['created_at'])[:19]:<19}  {doc['name']}"
        )
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    with _client(args) as client:
        doc = client.cancel(args.id)
    print(f"hsl: cancel requested: {doc['id']} is {doc['status']}", file=sys.stderr)
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    with _client(args) as client:
        client.delete(args.id)
    print(f"hsl: deleted {args.id}", file=sys.stderr)
    return 0


def add_commands(sub) -> None:
    def common(p):
        p.add_argument("--url", help="the service (default $HSL_URL or http://127.0.0.1:8000)")
        p.add_argument("--key", help="API key (default $HSL_API_KEY)")
        p.epilog = EXIT_CODES

    p = sub.add_parser("submit", help="submit a spec file or preset to a running service")
    p.add_argument("spec", help="a spec JSON file or a preset name")
    p.add_argument("--wait", action="store_true", help="then wait for it, with a progress bar")
    p.add_argument("--idempotency-key", help="makes a retried submission safe")
    common(p)
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("status", help="print an experiment's status document")
    p.add_argument("id")
    common(p)
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("wait", help="wait for an experiment to finish, with a progress bar")
    p.add_argument("id")
    p.add_argument("--timeout", type=float, default=None, help="give up after SECONDS (exit 3)")
    p.add_argument("--quiet", action="store_true")
    common(p)
    p.set_defaults(func=cmd_wait)

    p = sub.add_parser("results", help="fetch an experiment's results (JSON, CSV, plots)")
    p.add_argument("id")
    p.add_argument("--csv", action="store_true", help="the points as CSV instead of JSON")
    p.add_argument("--out", help="write to a file instead of stdout")
    p.add_argument("--plots", metavar="DIR", help="also download the PNG and SVG plots")
    common(p)
    p.set_defaults(func=cmd_results)

    p = sub.add_parser("list", help="the experiments on the service, newest first")
    p.add_argument("--status", choices=["queued", "running", "succeeded", "failed", "cancelled"])
    p.add_argument("--name", help="only experiments of this name")
    p.add_argument("--limit", type=int, default=None, help="at most this many")
    p.add_argument("--json", action="store_true", help="the status documents as JSON")
    common(p)
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("cancel", help="cancel an experiment (running runs stop at a point)")
    p.add_argument("id")
    common(p)
    p.set_defaults(func=cmd_cancel)

    p = sub.add_parser("delete", help="cancel and remove an experiment with its data")
    p.add_argument("id")
    common(p)
    p.set_defaults(func=cmd_delete)
