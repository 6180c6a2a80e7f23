"""Routes of the experiments resource. The request path validates, stores, commits,
publishes and returns; the numerics happen in workers."""

from __future__ import annotations

import json
import threading
import urllib.parse
from collections import OrderedDict
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.responses import JSONResponse
from sqlalchemy.orm import sessionmaker
from starlette.concurrency import run_in_threadpool

import hsl_engine as he
from hsl import document, plots

from .. import labels, limits
from ..db import Experiment, keys, state, theory
from ..deps import PublisherDep, SessionDep, SettingsDep, TenantDep, resolve_tenant
from ..errors import (
    PROBLEM_RESPONSE,
    BadRequest,
    InvalidSpec,
    NotFound,
    PayloadTooLarge,
    TooLarge,
    UnsupportedMediaType,
)
from . import events, status
from . import repository as repo
from .schemas import ExperimentList, LabelsPatch, Status, StatusDocument

router = APIRouter(prefix="/v1/experiments", tags=["experiments"])

ERRORS: dict[int | str, dict[str, Any]] = {
    code: PROBLEM_RESPONSE for code in (400, 401, 403, 404, 409, 413, 415, 422, 429, 503)
}


def status_document(session, exp: Experiment) -> dict[str, Any]:
    """The status document of one experiment (`status.render`, the one place it is built)."""
    row = session.execute(status.versions().where(Experiment.id == exp.id)).one()
    return json.loads(status.render(session, [row])[0].body)


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused past ``limit`` bytes whether or not Content-Length is sent."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


async def read_json_body(request: Request, limit: int, what: str) -> tuple[bytes, Any]:
    """The body of a submission (``what``: "spec", "study") as bytes and parsed: 415 unless
    it is sent as application/json, 413 past ``limit`` bytes, 400 unless it parses."""
    ctype = request.headers.get("content-type", "")
    if ctype.split(";")[0].strip().lower() != "application/json":
        raise UnsupportedMediaType(
            f"send the {what} as application/json, not {ctype or 'no content type'!r}",
            errors=[{"field": "Content-Type", "message": "must be application/json"}],
        )
    body = await _read_body(request, limit)
    try:
        return body, json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:  # nesting too deep: 400
        raise BadRequest(
            f"the body is not valid JSON: {exc}",
            errors=[{"field": "body", "message": "invalid JSON"}],
        ) from None


def _too_large(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(
        f"the body exceeds {limit} bytes (HSL_MAX_BODY_BYTES)",
        errors=[{"field": "body", "message": f"at most {limit} bytes"}],
    )


def check_limits(spec: he.ExperimentSpec, settings) -> he.ResourceEstimate:
    """Refuse specs beyond the deployment's limits, from the engine's log-space estimate
    (nothing is allocated). Returns the estimate."""
    est = he.estimate_resources(spec, sample_budget_bytes=settings.sample_budget_bytes)
    problems = []
    if est.peak_bytes > settings.max_memory_bytes:
        problems.append(
            {
                "field": "spec",
                "message": f"estimated peak memory {est.peak_bytes:.3g} bytes exceeds the limit "
                f"{settings.max_memory_bytes:.3g} bytes (HSL_MAX_MEMORY_BYTES)",
            }
        )
    if est.flops > settings.max_flops:
        problems.append(
            {
                "field": "spec",
                "message": f"estimated work {est.flops:.3g} flops exceeds the limit "
                f"{settings.max_flops:.3g} flops (HSL_MAX_FLOPS)",
            }
        )
    if est.points > settings.max_points:
        problems.append(
            {
                "field": "sweep",
                "message": f"{est.points} points exceed the limit {settings.max_points} "
                "(HSL_MAX_POINTS)",
            }
        )
    if problems:
        raise TooLarge(
            "; ".join(p["message"] for p in problems),
            errors=problems,
            estimate={"peak_bytes": est.peak_bytes, "flops": est.flops, "points": est.points},
            limits={
                "max_memory_bytes": settings.max_memory_bytes,
                "max_flops": settings.max_flops,
                "max_points": settings.max_points,
            },
        )
    return est


def check_device(spec: he.ExperimentSpec, settings) -> None:
    """The embedded service executes runs on its own machine: a device or array library it
    lacks is refused at submit (422), not left to fail the run. Distributed deployments
    accept them: the runs wait on their queue for a worker that has them."""
    if not settings.embedded:
        return
    if spec.device.startswith("cuda"):
        try:
            he.resolve_device(spec.device)
        except he.DeviceError as exc:
            raise InvalidSpec(
                f"device: {exc}", errors=[{"field": "device", "message": str(exc)}]
            ) from None
    if spec.solver.backend == "torch" and not he.torch_available():
        message = (
            "backend 'torch' needs PyTorch, which is not installed on this server (install "
            "the 'gpu' extra), or use backend 'auto' or 'numpy'"
        )
        raise InvalidSpec(
            f"solver.backend: {message}",
            errors=[{"field": "solver.backend", "message": message}],
        )


def place(session, spec: he.ExperimentSpec, est: he.ResourceEstimate, settings) -> str:
    """The queue of the spec's runs (`repository.queue_for`, with the live GPU workers), and
    a GPU spec refused (422 ``resource-limit``) when its estimated peak exceeds the GPU
    memory (``HSL_GPU_MEMORY_BYTES``, else the smallest live GPU worker's, else 80 GiB)."""
    if not repo.may_route_to_gpu(spec, est, settings.gpu_route_flops):
        return repo.queue_for(spec, est)
    gpu = repo.gpu_capacity(session, settings.gpu_memory_bytes)
    queue = repo.queue_for(
        spec,
        est,
        gpu_route_flops=settings.gpu_route_flops,
        gpu_workers=gpu.workers,
        gpu_memory_bytes=gpu.memory_bytes,
    )
    if queue == repo.GPU and est.peak_bytes > gpu.memory_bytes:
        message = (
            f"estimated peak memory {est.peak_bytes:.3g} bytes exceeds the GPU memory "
            f"{gpu.memory_bytes:.3g} bytes ({gpu.source}); use device 'auto' or 'cpu'"
        )
        raise TooLarge(
            message,
            errors=[{"field": "device", "message": message}],
            estimate={"peak_bytes": est.peak_bytes, "flops": est.flops, "points": est.points},
            limits={"gpu_memory_bytes": gpu.memory_bytes},
        )
    return queue


@router.post(
    "",
    status_code=201,
    response_model=StatusDocument,
    responses={
        200: {"model": StatusDocument, "description": "the same spec, already submitted"},
        **ERRORS,
    },
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {
                    "schema": {"$ref": "#/components/schemas/ExperimentSubmission"}
                }
            },
        }
    },
)
async def submit(
    request: Request,
    response: Response,
    session: SessionDep,
    settings: SettingsDep,
    tenant_id: TenantDep,
    publisher: PublisherDep,
    idempotency_key: Annotated[str | None, Header(max_length=200)] = None,
) -> Any:
    """Submit a spec. 201 with ``Location``; the same spec again returns the existing
    experiment (200); ``Idempotency-Key`` makes retries safe."""
    limits.check_rate(request.app.state.submit_buckets, tenant_id)
    body, data = await read_json_body(request, settings.max_body_bytes, "spec")
    # tags and notes ride along with the spec but are no part of it (nor of its hash)
    given = split_labels(data)
    if given:
        body = json.dumps(data).encode()
    try:
        spec = he.parse_spec(body)
    except he.SpecError as exc:
        raise InvalidSpec(
            "; ".join(f"{e['field']}: {e['message']}" for e in exc.errors), errors=exc.errors
        ) from None
    if settings.embedded and (spec.device.startswith("cuda") or spec.solver.backend == "torch"):
        # may import PyTorch (a second or two, once): off the event loop
        await run_in_threadpool(check_device, spec, settings)
    est = check_limits(spec, settings)

    def store() -> tuple[dict[str, Any], bool, list[tuple[int, str]]]:
        queue = place(session, spec, est, settings)
        exp, created = repo.create(
            session,
            tenant_id,
            spec,
            idempotency_key=idempotency_key,
            # only a new experiment counts against the quota, not a resubmission of a live
            # spec nor the retry of an Idempotency-Key already answered
            admit=lambda: limits.check_quota(session, tenant_id, settings.max_active_experiments),
            queue=queue,
            tags=given.get("tags"),
            notes=given.get("notes"),
        )
        if not created:
            # the same spec again: now also submitted on its own; new tags are added and
            # given notes replace the stored ones
            if not exp.standalone:
                exp.standalone = True
            if given:
                merged = dict(given)
                if "tags" in given:
                    merged["tags"] = labels.check_tags([*exp.tags, *given["tags"]])
                repo.set_labels(session, exp, merged)
        session.commit()
        runs = [(r.id, r.queue) for r in exp.runs] if created else []
        return status_document(session, exp), created, runs

    doc, created, runs = await run_in_threadpool(store)
    if created:
        await run_in_threadpool(_publish, request, publisher, runs)
    response.status_code = 201 if created else 200
    response.headers["Location"] = doc["links"]["self"]
    return doc


def split_labels(data: Any) -> dict[str, Any]:
    """Take ``tags`` and ``notes`` out of a submitted JSON object (changed in place) and
    return them validated (422 naming the field)."""
    given: dict[str, Any] = {}
    if isinstance(data, dict):
        if "tags" in data:
            given["tags"] = labels.check_tags(data.pop("tags"))
        if "notes" in data:
            given["notes"] = labels.check_notes(data.pop("notes"))
    return given


def _publish(request: Request, publisher, runs: list[tuple[int, str]]) -> None:
    """After the commit: a failure leaves the runs unpublished for the reaper."""
    published = publisher.publish(runs)
    if published:
        try:
            with request.app.state.sessions.begin() as s:
                state.mark_published(s, published)
        except Exception:  # the reaper may publish them again: harmless, claims are atomic
            pass


def _json(body: bytes, etag: str | None = None) -> Response:
    headers = {"ETag": etag, "Cache-Control": "no-cache"} if etag else None
    return Response(body, media_type="application/json", headers=headers)


AuthorizationHeader = Annotated[str | None, Header(include_in_schema=False)]
IfNoneMatch = Annotated[str | None, Header(include_in_schema=False)]


@router.get("", response_model=ExperimentList, responses=ERRORS)
async def list_experiments(
    request: Request,
    status_: Annotated[Status | None, Query(alias="status")] = None,
    # the spec's own name rules: printable text, 1-200 characters (422 naming ``name``)
    name: Annotated[he.Name | None, Query()] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 20,
    cursor: Annotated[str | None, Query(max_length=500)] = None,
    tag: Annotated[
        str | None, Query(max_length=labels.MAX_TAG_LENGTH, pattern=labels.TAG_PATTERN)
    ] = None,
    authorization: AuthorizationHeader = None,
) -> Any:
    """The tenant's experiments, newest first; ``tag``: only those carrying this tag."""
    state_ = request.app.state

    def page() -> bytes:
        with state_.read_sessions() as session:
            tenant_id = resolve_tenant(
                session, state_.settings, authorization, state_.local_tenant_id
            )
            rows, next_cursor = repo.list_page(
                session,
                tenant_id,
                status=status_,
                name=name,
                limit=limit,
                cursor=cursor,
                query=status.versions(),
                tag=tag,
            )
            return status.list_body(status.render(session, rows), next_cursor)

    return _json(await run_in_threadpool(page))


@router.get("/{experiment_id}", response_model=StatusDocument, responses=ERRORS)
async def get_status(
    experiment_id: str,
    request: Request,
    authorization: AuthorizationHeader = None,
    if_none_match: IfNoneMatch = None,
) -> Any:
    """The status document. It carries an ``ETag``: with ``If-None-Match`` the answer is 304
    without a body while nothing changed."""
    state_ = request.app.state

    def one() -> status.Rendered:
        if not repo.is_experiment_id(experiment_id):
            raise NotFound(f"no experiment with id {experiment_id!r}")
        with state_.read_sessions() as session:
            key = keys.usable_key(authorization)
            row = None
            if key is not None:  # the key's check in the same query
                row = session.execute(
                    status.statement("by_key"),
                    {"id": experiment_id, "key_hash": keys.hash_key(key)},
                ).one_or_none()
            if row is None:
                tenant_id = resolve_tenant(
                    session, state_.settings, authorization, state_.local_tenant_id
                )
                row = session.execute(
                    status.statement("by_tenant"), {"id": experiment_id, "tenant_id": tenant_id}
                ).one_or_none()
            if row is None:
                raise NotFound(f"no experiment with id {experiment_id!r}")
            return status.render(session, [row])[0]

    rendered = await run_in_threadpool(one)
    if status.matches(if_none_match, rendered.etag):
        return Response(status_code=304, headers={"ETag": rendered.etag})
    return _json(rendered.body, rendered.etag)


EVENTS_DESCRIPTION = """Server-Sent Events (`text/event-stream`) of one experiment, from the
database (any API process serves any experiment):

- `event: point`, `id: ROW_ID`, `data:` the point as in the results document, once per stored
  point, in the order they were stored (the row id is monotone);
- `event: status`, `id:` the last point's row id, `data:` the status document, whenever it
  changes (status, progress, ETA, waiting);
- `: keep-alive` comment lines on a quiet stream (every `HSL_EVENTS_HEARTBEAT_SECONDS`);
- the stream ends after the status event of a terminal status, or when the experiment is
  deleted.

`Last-Event-ID` (the header a browser's EventSource sends when it reconnects, or the query
parameter `last_event_id`) resumes after that point: the points stored since, then the current
status. Open streams are capped per API process (`HSL_MAX_EVENT_STREAMS`: 503) and per tenant
(`HSL_MAX_EVENT_STREAMS_PER_TENANT`: 429), both with `Retry-After`.
"""


@router.get(
    "/{experiment_id}/events",
    response_class=events.EventStreamResponse,
    status_code=200,
    description=EVENTS_DESCRIPTION,
    responses={
        200: {
            "description": "the event stream",
            # OpenAPI 3.1: the schema of an event stream describes each event (3.2 would
            # call it itemSchema); `data` is JSON text: a point, or the status document
            "content": {
                events.MEDIA_TYPE: {
                    "schema": {
                        "type": "object",
                        "properties": {
                            "event": {"type": "string", "enum": ["point", "status"]},
                            "id": {"type": "string", "pattern": "^[0-9]+$"},
                            "data": {"type": "string", "contentMediaType": "application/json"},
                            "retry": {"type": "integer", "minimum": 0},
                        },
                    }
                }
            },
        },
        **ERRORS,
    },
)
async def get_events(
    experiment_id: str,
    request: Request,
    authorization: AuthorizationHeader = None,
    last_event_id_header: Annotated[
        str | None, Header(alias="Last-Event-ID", include_in_schema=False)
    ] = None,
    last_event_id: Annotated[
        str | None,
        Query(max_length=40, description="resume after this event id (as Last-Event-ID)"),
    ] = None,
) -> Response:
    """Live progress of one experiment as Server-Sent Events."""
    state_ = request.app.state
    settings = state_.settings

    def first() -> tuple[int, events.Snapshot]:
        if not repo.is_experiment_id(experiment_id):
            raise NotFound(f"no experiment with id {experiment_id!r}")
        with state_.read_sessions() as session:
            tenant_id = resolve_tenant(session, settings, authorization, state_.local_tenant_id)
            row = session.execute(
                status.statement("by_tenant"), {"id": experiment_id, "tenant_id": tenant_id}
            ).one_or_none()
            if row is None:
                raise NotFound(f"no experiment with id {experiment_id!r}")
            return tenant_id, events.snapshot(session, [row])[row.id]

    tenant_id, snap = await run_in_threadpool(first)
    slots = _event_slots(request.app)
    slots.acquire(tenant_id)  # last: nothing after it may fail before the stream owns it
    after = events.parse_last_event_id(
        last_event_id_header if last_event_id_header is not None else last_event_id
    )
    return events.EventStreamResponse(
        events.events(
            _event_hub(request.app),
            experiment_id,
            snap,
            after,
            settings.events_heartbeat_seconds,
        ),
        on_close=lambda: slots.release(tenant_id),
    )


def _event_hub(app) -> events.Hub:
    hub = getattr(app.state, "event_hub", None)
    if hub is None:
        hub = app.state.event_hub = events.Hub(
            app.state.read_sessions, app.state.settings.events_poll_seconds
        )
    return hub


def _event_slots(app) -> events.StreamSlots:
    slots = getattr(app.state, "event_slots", None)
    if slots is None:
        settings = app.state.settings
        slots = app.state.event_slots = events.StreamSlots(
            settings.max_event_streams, settings.max_event_streams_per_tenant
        )
    return slots


class _DocumentCache:
    """Results documents keyed by (experiment, points stored, status): the summary (its
    theory curves above all) is the costly part, and a document only changes when a point
    arrives."""

    def __init__(self, size: int = 64):
        self.size, self.items, self.lock = size, OrderedDict(), threading.Lock()

    def get(self, key):
        with self.lock:
            if key in self.items:
                self.items.move_to_end(key)
                return self.items[key]
        return None

    def put(self, key, value) -> None:
        with self.lock:
            self.items[key] = value
            while len(self.items) > self.size:
                self.items.popitem(last=False)


_cache = _DocumentCache()


def results_for(session, exp: Experiment) -> dict[str, Any]:
    return _results(session, exp)[0]


def _results(session, exp: Experiment) -> tuple[dict[str, Any], bytes, str]:
    """The results document, its JSON and its ETag, cached per (experiment, points, status)."""
    key = (exp.id, repo.points_count(session, exp.id), exp.status)
    cached = _cache.get(key)
    if cached is None:
        spec = state.stored_spec(exp.spec)
        exact = theory.stored(session, exp.id)
        if exact is None:  # stored before the column existed, or no run has started yet
            exact = theory.ensure(sessionmaker(session.get_bind()).begin, exp.id, spec)
        doc = document.results_document(
            spec,
            repo.points(session, exp.id),
            experiment_id=exp.id,
            complete=exp.status == "succeeded",
            exact=exact,
        )
        body = JSONResponse(doc).body
        cached = (doc, body, status.etag_of(body))
        _cache.put(key, cached)
    return cached


@router.get("/{experiment_id}/results", responses=ERRORS)
def get_results(
    experiment_id: str,
    session: SessionDep,
    tenant_id: TenantDep,
    if_none_match: IfNoneMatch = None,
) -> Response:
    """The results document, computed from the points stored so far (partial while running).

    ``engine_version`` is the engine that computed the points (``engine_versions`` lists them
    when they differ); every point carries its ``engine_version``, ``device`` and ``backend``.
    It carries an ``ETag`` (304 to a matching ``If-None-Match``).
    """
    exp = repo.get(session, tenant_id, experiment_id)
    _, body, etag = _results(session, exp)
    if status.matches(if_none_match, etag):
        return Response(status_code=304, headers={"ETag": etag})
    return _json(body, etag)


@router.get(
    "/{experiment_id}/results.csv",
    response_class=Response,  # the body is text/csv, nothing else
    responses={200: {"content": {"text/csv": {"schema": {"type": "string"}}}}, **ERRORS},
)
def get_results_csv(experiment_id: str, session: SessionDep, tenant_id: TenantDep) -> Response:
    exp = repo.get(session, tenant_id, experiment_id)
    return Response(
        document.points_csv(results_for(session, exp)),
        media_type="text/csv; charset=utf-8",
        headers={"Content-Disposition": content_disposition(f"{exp.name}-{exp.id[:8]}.csv")},
    )


# what may stand in the quoted ASCII fallback of a file name as is (RFC 6266 section 4.3)
_FALLBACK_SAFE = frozenset(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.+()[]@~ "
)


def content_disposition(filename: str) -> str:
    """``attachment`` with the file name as RFC 6266 asks: ``filename*`` in RFC 5987
    encoding (UTF-8, percent-encoded: any name, never able to end the parameter or the
    header) and a quoted ASCII ``filename`` fallback for old clients, in which every
    character outside a small safe set (quotes, backslashes, semicolons, controls, anything
    non-ASCII) is replaced by ``_``. Never built by interpolating the raw name."""
    fallback = "".join(c if c in _FALLBACK_SAFE else "_" for c in filename)
    encoded = urllib.parse.quote(filename, safe="")  # leaves only RFC 5987 attr-chars
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{encoded}"


MEDIA = {"png": "image/png", "svg": "image/svg+xml"}
# the OpenAPI responses of a figure route: the image in either format, or a problem
IMAGE_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "content": {
            "image/png": {"schema": {"type": "string", "format": "binary"}},
            "image/svg+xml": {"schema": {"type": "string"}},
        }
    },
    **ERRORS,
}


@router.get(
    "/{experiment_id}/plots/{filename}",
    response_class=Response,  # an image, never JSON
    responses=IMAGE_RESPONSES,
)
def get_plot(
    experiment_id: str, filename: str, session: SessionDep, tenant_id: TenantDep
) -> Response:
    """``{mse,overlap,cos2,spectrum}.{png,svg}``, drawn from the results document."""
    exp = repo.get(session, tenant_id, experiment_id)
    plot, _, fmt = filename.rpartition(".")
    if plot not in plots.PLOT_NAMES or fmt not in MEDIA:
        raise NotFound(
            f"no plot {filename!r}; plots are NAME.FORMAT with NAME in "
            f"{', '.join(plots.PLOT_NAMES)} and FORMAT in png, svg"
        )
    doc = results_for(session, exp)
    if not doc["points"]:
        raise NotFound("no points stored yet: the plot has nothing to show")
    return Response(plots.render(doc, plot, fmt), media_type=MEDIA[fmt])


@router.post("/{experiment_id}/cancel", response_model=StatusDocument, responses=ERRORS)
def cancel(
    experiment_id: str, session: SessionDep, tenant_id: TenantDep, publisher: PublisherDep
) -> Any:
    """Queued work never starts; running work stops at its next point. Idempotent."""
    exp = repo.get(session, tenant_id, experiment_id)
    repo.cancel(session, exp)
    session.commit()
    session.refresh(exp)
    return status_document(session, exp)


@router.delete("/{experiment_id}", status_code=204, responses=ERRORS)
def remove(experiment_id: str, session: SessionDep, tenant_id: TenantDep) -> Response:
    exp = repo.get(session, tenant_id, experiment_id)
    repo.remove(session, exp)
    session.commit()
    return Response(status_code=204)


def labels_body(patch: LabelsPatch | None) -> dict[str, Any]:
    """The validated changes of a PATCH body: the fields it gives."""
    given = patch.model_dump(exclude_unset=True) if patch is not None else {}
    if not given:
        raise InvalidSpec(
            "give tags, notes or both",
            errors=[{"field": "body", "message": "give tags, notes or both"}],
        )
    if "tags" in given:
        if given["tags"] is None:
            raise InvalidSpec(
                "tags: must be a list (an empty list clears them)",
                errors=[{"field": "tags", "message": "must be a list"}],
            )
        given["tags"] = labels.check_tags(given["tags"])
    if "notes" in given:
        given["notes"] = labels.check_notes(given["notes"])
    return given


@router.patch("/{experiment_id}", response_model=StatusDocument, responses=ERRORS)
def patch(
    experiment_id: str,
    session: SessionDep,
    tenant_id: TenantDep,
    body: LabelsPatch | None = None,
) -> Any:
    """Edit the experiment's ``tags`` (replaced as a whole) and ``notes`` (null clears
    them). Neither is part of the spec: the spec hash and the results do not change."""
    exp = repo.get(session, tenant_id, experiment_id)  # another tenant's: 404 first
    changes = labels_body(body)
    repo.set_labels(session, exp, changes)
    session.commit()
    session.refresh(exp)
    return status_document(session, exp)
