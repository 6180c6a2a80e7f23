"""Routes of the studies resource: ``POST /v1/studies`` validates the whole grid (every member
through the spec validator and the resource limits, and the total), stores the study and its
member experiments in one transaction, commits, publishes the new runs and returns; status,
results and figures are computed from the members."""

from __future__ import annotations

import json
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request, Response
from pydantic import TypeAdapter, ValidationError
from sqlalchemy import func, select
from starlette.concurrency import run_in_threadpool

import hsl_engine as he
from hsl import studies, study_plots

from .. import labels, limits
from ..db import Experiment, Run, Study
from ..deps import PublisherDep, SessionDep, SettingsDep, TenantDep
from ..errors import InvalidSpec, NotFound, TooLarge
from ..experiments import routes as exp_routes
from ..experiments import status as exp_status
from ..experiments.routes import ERRORS, IMAGE_RESPONSES, MEDIA, labels_body, read_json_body
from ..experiments.schemas import LabelsPatch
from . import repository as repo
from .schemas import StudyDocument, StudyList, StudyResults

router = APIRouter(prefix="/v1/studies", tags=["studies"])

_NAME = TypeAdapter(he.Name)
FIELDS = ("name", "base", "axes", "tags", "notes")
LIVE = ("queued", "running")
TERMINAL = ("succeeded", "failed", "cancelled")


class InvalidStudy(InvalidSpec):
    title = "Invalid study"


def _invalid(errors: list[dict[str, str]]) -> InvalidStudy:
    return InvalidStudy("; ".join(f"{e['field']}: {e['message']}" for e in errors), errors=errors)


def parse_study(data: Any, settings) -> dict[str, Any]:
    """The submitted study, validated: ``{name, base, axes, members: [(params, spec,
    estimate)], tags, notes}``. 422 naming the field (``base.model.d``, ``axes.model.gamma``)
    and the value; 422 ``resource-limit`` for a member or a total beyond the limits."""
    if not isinstance(data, dict):
        raise _invalid([{"field": "body", "message": "must be a JSON object"}])
    unknown = [k for k in data if k not in FIELDS]
    if unknown:
        raise _invalid([{"field": str(k)[:100], "message": "unknown field"} for k in unknown])
    if "base" not in data or "axes" not in data:
        missing = [k for k in ("base", "axes") if k not in data]
        raise _invalid([{"field": k, "message": "required"} for k in missing])
    tags = labels.check_tags(data.get("tags") or [])
    notes = labels.check_notes(data.get("notes"))
    base_in = data["base"]
    if isinstance(base_in, str):
        if base_in not in he.preset_names():
            raise _invalid(
                [
                    {
                        "field": "base",
                        "message": f"no experiment preset {base_in[:100]!r}; presets: "
                        + ", ".join(he.preset_names()),
                    }
                ]
            )
        base = he.preset(base_in)
    elif isinstance(base_in, dict):
        try:
            base = he.parse_spec(base_in)
        except he.SpecError as exc:
            raise _invalid(
                [{"field": f"base.{e['field']}", "message": e["message"]} for e in exc.errors]
            ) from None
    else:
        raise _invalid([{"field": "base", "message": "must be a spec object or a preset name"}])
    name = data.get("name")
    if name is None:
        name = base.name
    try:
        name = _NAME.validate_python(name, strict=True)
    except ValidationError as exc:
        raise _invalid([{"field": "name", "message": exc.errors()[0]["msg"]}]) from None
    try:
        members = studies.expand(base, data["axes"], max_members=settings.max_study_members)
    except studies.StudyError as exc:
        if exc.too_large:
            raise TooLarge(
                str(exc),
                errors=exc.errors,
                limits={"max_study_members": settings.max_study_members},
            ) from None
        raise _invalid(exc.errors) from None
    checked = []
    for params, spec in members:
        try:
            est = exp_routes.check_limits(spec, settings)
        except TooLarge as exc:
            label = studies.param_label(params)
            exc.detail = f"member {label}: {exc.detail}"
            exc.errors = [
                {"field": f"members[{label}].{e['field']}", "message": e["message"]}
                for e in exc.errors or []
            ]
            raise
        checked.append((params, spec, est))
    total_flops = sum(e.flops for _, _, e in checked)
    total_points = sum(e.points for _, _, e in checked)
    problems = []
    if total_flops > settings.max_flops:
        problems.append(
            {
                "field": "axes",
                "message": f"the members' estimated work {total_flops:.3g} flops exceeds the "
                f"limit {settings.max_flops:.3g} flops (HSL_MAX_FLOPS) for a whole study",
            }
        )
    if total_points > settings.max_points:
        problems.append(
            {
                "field": "axes",
                "message": f"the members' {total_points} points exceed the limit "
                f"{settings.max_points} (HSL_MAX_POINTS) for a whole study",
            }
        )
    if problems:
        raise TooLarge(
            "; ".join(p["message"] for p in problems),
            errors=problems,
            estimate={"flops": total_flops, "points": total_points, "members": len(checked)},
            limits={"max_flops": settings.max_flops, "max_points": settings.max_points},
        )
    axes = {path: list(values) for path, values in data["axes"].items()}
    return {
        "name": name,
        "base": base,
        "axes": axes,
        "members": checked,
        "tags": tags,
        "notes": notes,
        "study_hash": studies.study_hash(base, axes),
    }


def _plot_links(base: str) -> dict[str, dict[str, str]]:
    return {
        n: {f: f"{base}/plots/{n}.{f}" for f in study_plots.FORMATS}
        for n in study_plots.STUDY_PLOTS
    }


def _member_status(row: Any) -> str:
    return "deleted" if row is None else row.status


def study_status(study: Study, statuses: list[str]) -> str:
    """Queued until a member starts; running while any member is queued or running; then
    succeeded (all), failed (one failed) or cancelled. A cancelled study is cancelled at
    once (the members it shares go on)."""
    if study.cancel_requested:
        return "cancelled"
    if any(s in LIVE for s in statuses):
        started = any(s == "running" or s not in LIVE for s in statuses)
        return "running" if started else "queued"
    if statuses and all(s == "succeeded" for s in statuses):
        return "succeeded"
    if any(s == "failed" for s in statuses):
        return "failed"
    return "cancelled"


def _eta(session, ids: list[str], live_ids: list[str]) -> float | None:
    """Seconds left: the unfinished points of the live members times the time per sample
    (per method) of the study's points so far, over the runs executing at once. A member
    without points borrows the rate of the others; null before the study's first point."""
    if not live_ids:
        return 0.0
    timings = exp_status._timings(session, ids)
    pooled = [t for ts in timings.values() for t in ts]
    if not pooled:
        return None

    def rate(points) -> dict[str, float]:
        acc: dict[str, list[float]] = {}
        for t in points:
            a = acc.setdefault(t.method, [0.0, 0.0])
            a[0] += t.seconds
            a[1] += t.n
        return {m: sec / max(1.0, n) for m, (sec, n) in acc.items()}

    overall = sum(t.seconds for t in pooled) / max(1.0, sum(t.n for t in pooled))
    study_rates = rate(pooled)
    left = 0.0
    for exp in session.execute(select(Experiment).where(Experiment.id.in_(live_ids))).scalars():
        spec = exp_status._spec(exp)
        own = timings.get(exp.id, [])
        rates = {**study_rates, **rate(own)}
        done = {(t.method, t.seed, t.n) for t in own}
        for method, seed in he.runs(spec):
            r = rates.get(method, overall)
            left += sum(r * n for n, _ in spec.sample_sizes() if (method, seed, n) not in done)
    running = session.execute(
        select(func.count())
        .select_from(Run)
        .where(Run.experiment_id.in_(live_ids), Run.status == "running")
    ).scalar_one()
    return left / max(1, running)


def document(session, study: Study) -> dict[str, Any]:
    """The status document of one study."""
    ids = [m.experiment_id for m in study.members if m.experiment_id]
    rows = repo.member_rows(session, ids)
    members, statuses = [], []
    done = total = 0
    for m in study.members:
        row = rows.get(m.experiment_id) if m.experiment_id else None
        status = _member_status(row)
        statuses.append(status)
        p_done = row.points_done if row else 0
        p_total = row.points_total if row else 0
        done += p_done
        total += p_total
        members.append(
            {
                "experiment_id": row.id if row else None,
                "params": m.params,
                "status": status,
                "progress": {
                    "points_done": p_done,
                    "points_total": p_total,
                    "fraction": p_done / p_total if p_total else (1.0 if row else 0.0),
                },
            }
        )
    status = study_status(study, statuses)
    counts: dict[str, int] = {}
    for s in statuses:
        counts[s] = counts.get(s, 0) + 1
    live_ids = [r.id for r in rows.values() if r.status in LIVE]
    eta = None if status == "cancelled" else _eta(session, ids, live_ids)
    started = [r.started_at for r in rows.values() if r.started_at is not None]
    finished = [r.finished_at for r in rows.values() if r.finished_at is not None]
    terminal = status in TERMINAL and not live_ids
    base = f"/v1/studies/{study.id}"
    return {
        "id": study.id,
        "name": study.name,
        "status": status,
        "study_hash": study.study_hash,
        "created_at": study.created_at,
        "started_at": min(started) if started else None,
        "finished_at": (max(finished) if finished else study.created_at) if terminal else None,
        "base": study.base,
        "axes": study.axes,
        "tags": list(study.tags or []),
        "notes": study.notes,
        "progress": {
            "points_done": done,
            "points_total": total,
            "fraction": done / total if total else 1.0,
            "eta_seconds": eta,
            "members": counts,
        },
        "members": members,
        "links": {
            "self": base,
            "results": f"{base}/results",
            "plots": _plot_links(base),
            "cancel": f"{base}/cancel",
        },
    }


def _validated(doc: dict[str, Any]) -> dict[str, Any]:
    return json.loads(StudyDocument.model_validate(doc).model_dump_json())


@router.post(
    "",
    status_code=201,
    response_model=StudyDocument,
    responses={200: {"model": StudyDocument, "description": "Idempotency-Key replayed"}, **ERRORS},
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": {"$ref": "#/components/schemas/StudySubmission"}}
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
    """Submit a study: 201 with ``Location``. Every member is validated and checked against
    the resource limits before anything is stored; members whose spec the tenant already
    submitted reuse that experiment. ``Idempotency-Key`` makes retries safe."""
    limits.check_rate(request.app.state.submit_buckets, tenant_id)
    _, data = await read_json_body(request, settings.max_body_bytes, "study")
    study_in = await run_in_threadpool(parse_study, data, settings)
    devices = {
        (s.device, s.solver.backend)
        for _, s, _ in study_in["members"]
        if s.device.startswith("cuda") or s.solver.backend == "torch"
    }
    if settings.embedded and devices:
        for _, spec, _ in study_in["members"]:
            await run_in_threadpool(exp_routes.check_device, spec, settings)

    def store() -> tuple[dict[str, Any], bool, list[tuple[int, str]]]:
        placed = [
            (params, spec, exp_routes.place(session, spec, est, settings))
            for params, spec, est in study_in["members"]
        ]
        study, created, new = repo.create(
            session,
            tenant_id,
            name=study_in["name"],
            base=study_in["base"],
            axes=study_in["axes"],
            study_hash=study_in["study_hash"],
            members=placed,
            idempotency_key=idempotency_key,
            admit=lambda: limits.check_quota(session, tenant_id, settings.max_active_experiments),
            tags=study_in["tags"],
            notes=study_in["notes"],
        )
        session.commit()
        runs = [(r.id, r.queue) for exp in new for r in exp.runs]
        session.refresh(study)
        return _validated(document(session, study)), created, runs

    doc, created, runs = await run_in_threadpool(store)
    if runs:
        await run_in_threadpool(exp_routes._publish, request, publisher, runs)
    response.status_code = 201 if created else 200
    response.headers["Location"] = doc["links"]["self"]
    return doc


@router.get("", response_model=StudyList, responses=ERRORS)
def list_studies(
    session: SessionDep,
    tenant_id: TenantDep,
    name: Annotated[he.Name | None, Query()] = None,
    tag: Annotated[
        str | None, Query(max_length=labels.MAX_TAG_LENGTH, pattern=labels.TAG_PATTERN)
    ] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    cursor: Annotated[str | None, Query(max_length=500)] = None,
) -> Any:
    """The tenant's studies, newest first; ``tag``: only those carrying this tag."""
    rows, next_cursor = repo.list_page(
        session, tenant_id, name=name, tag=tag, limit=limit, cursor=cursor
    )
    return {"items": [_validated(document(session, s)) for s in rows], "next_cursor": next_cursor}


@router.get("/{study_id}", response_model=StudyDocument, responses=ERRORS)
def get_study(study_id: str, session: SessionDep, tenant_id: TenantDep) -> Any:
    """The status document: status and progress over all members, and each member's
    experiment, parameters and status."""
    return _validated(document(session, repo.get(session, tenant_id, study_id)))


@router.patch("/{study_id}", response_model=StudyDocument, responses=ERRORS)
def patch(
    study_id: str, session: SessionDep, tenant_id: TenantDep, body: LabelsPatch | None = None
) -> Any:
    """Edit the study's ``tags`` (replaced as a whole) and ``notes`` (null clears them)."""
    study = repo.get(session, tenant_id, study_id)  # another tenant's: 404 first
    changes = labels_body(body)
    exp_routes.repo.set_labels(session, study, changes)
    session.commit()
    session.refresh(study)
    return _validated(document(session, study))


@router.post("/{study_id}/cancel", response_model=StudyDocument, responses=ERRORS)
def cancel(study_id: str, session: SessionDep, tenant_id: TenantDep) -> Any:
    """Cancel the study and the member experiments only it needs (queued runs never start,
    running ones stop at their next point); members shared with another study or submitted
    on their own go on. Idempotent."""
    study = repo.get(session, tenant_id, study_id)
    repo.cancel(session, study)
    session.commit()
    session.refresh(study)
    return _validated(document(session, study))


@router.delete("/{study_id}", status_code=204, responses=ERRORS)
def remove(study_id: str, session: SessionDep, tenant_id: TenantDep) -> Response:
    """Delete the study and the member experiments only it holds (cancelled first, with
    their runs and points); members shared with another study or submitted on their own
    are kept."""
    study = repo.get(session, tenant_id, study_id)
    repo.remove(session, study)
    session.commit()
    return Response(status_code=204)


def member_documents(session, study: Study) -> list[tuple[dict[str, Any], str, Any]]:
    """``(params, status, results document or None)`` per member."""
    ids = [m.experiment_id for m in study.members if m.experiment_id]
    exps = {}
    if ids:
        exps = {
            e.id: e
            for e in session.execute(select(Experiment).where(Experiment.id.in_(ids))).scalars()
        }
    out = []
    for m in study.members:
        exp = exps.get(m.experiment_id) if m.experiment_id else None
        if exp is None:
            out.append((m.params, "deleted", None))
        else:
            out.append((m.params, exp.status, exp_routes.results_for(session, exp)))
    return out


@router.get("/{study_id}/results", response_model=StudyResults, responses=ERRORS)
def get_results(study_id: str, session: SessionDep, tenant_id: TenantDep) -> Any:
    """Per member: the fitted exponent with its CI and the theory exponent (``power_law``),
    and the thresholds against theory; computed from the points stored so far."""
    study = repo.get(session, tenant_id, study_id)
    members = []
    statuses = []
    for params, status, doc in member_documents(session, study):
        statuses.append(status)
        members.append(
            {
                "experiment_id": doc["experiment_id"] if doc else None,
                "params": params,
                "status": status,
                "complete": bool(doc and doc["complete"]),
                "model": doc["spec"]["model"] if doc else None,
                "d1": doc["d1"] if doc else None,
                "feature_dim": doc["feature_dim"] if doc else None,
                "nu1": doc["theory"].get("nu1") if doc else None,
                "weights": doc["weights"] if doc else None,
                "power_law": doc["power_law"] if doc else None,
                "thresholds": doc["thresholds"] if doc else [],
            }
        )
    base = f"/v1/studies/{study.id}"
    return {
        "study_id": study.id,
        "name": study.name,
        "status": study_status(study, statuses),
        "complete": bool(statuses) and all(s == "succeeded" for s in statuses),
        "axes": study.axes,
        "members": members,
        "plots": _plot_links(base),
    }


@router.get(
    "/{study_id}/plots/{filename}",
    response_class=Response,
    responses=IMAGE_RESPONSES,
)
def get_plot(study_id: str, filename: str, session: SessionDep, tenant_id: TenantDep) -> Response:
    """``{mse,exponent,collapse}.{png,svg}``: MSE against n (one curve per member, with its
    theory curve), the fitted exponent against gamma (CI bars, theory -1 + 1/(2 gamma)), and
    n_half / D against 1 / (nu1^2 lambda_i^2) for every member and direction (theory: the
    line y = x)."""
    study = repo.get(session, tenant_id, study_id)
    plot, _, fmt = filename.rpartition(".")
    if plot not in study_plots.STUDY_PLOTS or fmt not in MEDIA:
        raise NotFound(
            f"no plot {filename!r}; plots are NAME.FORMAT with NAME in "
            f"{', '.join(study_plots.STUDY_PLOTS)} and FORMAT in png, svg"
        )
    docs = [(params, doc) for params, _, doc in member_documents(session, study) if doc]
    if not any(doc["points"] for _, doc in docs):
        raise NotFound("no points stored yet: the plot has nothing to show")
    return Response(study_plots.render_study(study.name, docs, plot, fmt), media_type=MEDIA[fmt])
