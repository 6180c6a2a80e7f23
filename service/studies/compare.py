"""``GET /v1/compare?ids=A,B,...``: any of the tenant's experiments side by side (curves,
thresholds, exponents and the spec fields that differ) and their overlaid figures; and the
named studies under ``/v1/presets/studies``."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Response

import hsl_engine as he
from hsl import studies, study_plots

from ..deps import SessionDep, TenantDep, get_tenant
from ..errors import InvalidSpec, NotFound
from ..experiments import repository as exp_repo
from ..experiments.routes import ERRORS, IMAGE_RESPONSES, MEDIA, results_for
from .schemas import Comparison, StudyPresetOut

router = APIRouter(prefix="/v1/compare", tags=["compare"])
presets_router = APIRouter(
    prefix="/v1/presets/studies", tags=["presets"], dependencies=[Depends(get_tenant)]
)

MAX_COMPARE = 12
IdsQuery = Annotated[
    str,
    Query(
        max_length=40 * MAX_COMPARE,
        description=f"comma-separated experiment ids, 1 to {MAX_COMPARE}",
    ),
]
XQuery = Annotated[
    str,
    Query(
        description="x axis: n, or n_over_n_half (n / n_half_theory of each experiment's first "
        "direction)"
    ),
]


def parse_ids(ids: str) -> list[str]:
    """The ids in order, repeats dropped; 422 naming ``ids`` when none or too many."""
    out = list(dict.fromkeys(i.strip() for i in ids.split(",") if i.strip()))
    if not out:
        raise InvalidSpec(
            "ids: give at least one experiment id",
            errors=[{"field": "ids", "message": "at least one experiment id"}],
        )
    if len(out) > MAX_COMPARE:
        message = f"at most {MAX_COMPARE} experiments, got {len(out)}"
        raise InvalidSpec(f"ids: {message}", errors=[{"field": "ids", "message": message}])
    return out


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted paths of a spec's leaves (lists of scalars are one leaf; ``methods`` by
    index)."""
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    if isinstance(value, list) and any(isinstance(v, dict) for v in value):
        out = {}
        for i, v in enumerate(value):
            out.update(_flatten(v, f"{prefix}.{i}"))
        return out
    return {prefix: value}


def differences(specs: list[dict[str, Any]]) -> dict[str, list[Any]]:
    """Path -> each spec's value (null where it has no such field), for the paths where the
    specs differ."""
    flat = [_flatten(s) for s in specs]
    paths = list(dict.fromkeys(p for f in flat for p in f))
    return {
        p: [f.get(p) for f in flat]
        for p in paths
        if len({repr(f.get(p)) for f in flat}) > 1 or any(p not in f for f in flat)
    }


def _documents(session, tenant_id: int, ids: list[str]) -> list[tuple[Any, dict[str, Any]]]:
    # another tenant's id is 404, exactly like an unknown one
    exps = [exp_repo.get(session, tenant_id, i) for i in ids]
    return [(e, results_for(session, e)) for e in exps]


def _labels(docs: list[tuple[Any, dict[str, Any]]], diff: dict[str, list[Any]]) -> list[str]:
    out = []
    for k, (exp, _) in enumerate(docs):
        params = {p: v[k] for p, v in diff.items() if p != "name"}
        label = studies.param_label(params) if params else ""
        out.append(f"{exp.name} {exp.id[:6]}" + (f": {label}" if label else ""))
    return out


def _plot_links(ids: list[str]) -> dict[str, dict[str, str]]:
    q = ",".join(ids)
    return {
        n: {f: f"/v1/compare/plots/{n}.{f}?ids={q}" for f in study_plots.FORMATS}
        for n in study_plots.COMPARE_PLOTS
    }


@router.get("", response_model=Comparison, responses=ERRORS)
def compare(ids: IdsQuery, session: SessionDep, tenant_id: TenantDep) -> Any:
    """The experiments' curves, thresholds and fitted exponents, and the spec fields that
    differ between them (``differences``: path -> one value per experiment)."""
    wanted = parse_ids(ids)
    docs = _documents(session, tenant_id, wanted)
    diff = differences([doc["spec"] for _, doc in docs])
    return {
        "ids": wanted,
        "experiments": [
            {
                "experiment_id": exp.id,
                "name": exp.name,
                "status": exp.status,
                "spec_hash": exp.spec_hash,
                "complete": doc["complete"],
                "d1": doc["d1"],
                "feature_dim": doc["feature_dim"],
                "weights": doc["weights"],
                "curves": doc["curves"],
                "thresholds": doc["thresholds"],
                "power_law": doc["power_law"],
                "theory_curve": doc["theory"]["curve"],
            }
            for exp, doc in docs
        ],
        "differences": diff,
        "plots": _plot_links(wanted),
    }


@router.get(
    "/plots/{filename}",
    response_class=Response,
    responses=IMAGE_RESPONSES,
)
def compare_plot(
    filename: str, ids: IdsQuery, session: SessionDep, tenant_id: TenantDep, x: XQuery = "n"
) -> Response:
    """``{mse,overlap}.{png,svg}``: the experiments' curves overlaid, each with its theory
    curve; ``x=n_over_n_half`` collapses curves of different d."""
    plot, _, fmt = filename.rpartition(".")
    if plot not in study_plots.COMPARE_PLOTS or fmt not in MEDIA:
        raise NotFound(
            f"no plot {filename!r}; plots are NAME.FORMAT with NAME in "
            f"{', '.join(study_plots.COMPARE_PLOTS)} and FORMAT in png, svg"
        )
    if x not in study_plots.X_AXES:
        message = f"must be one of {', '.join(study_plots.X_AXES)}"
        raise InvalidSpec(f"x: {message}", errors=[{"field": "x", "message": message}])
    docs = _documents(session, tenant_id, parse_ids(ids))
    if not any(doc["points"] for _, doc in docs):
        raise NotFound("no points stored yet: the plot has nothing to show")
    diff = differences([doc["spec"] for _, doc in docs])
    labelled = list(zip(_labels(docs, diff), (doc for _, doc in docs), strict=True))
    return Response(study_plots.render_compare(labelled, plot, fmt, x=x), media_type=MEDIA[fmt])


def _study_preset(name: str) -> dict[str, Any]:
    body = studies.study_preset(name)
    members = studies.expand(he.parse_spec(body["base"]), body["axes"], max_members=4096)
    ests = [he.estimate_resources(spec) for _, spec in members]
    return {
        "name": name,
        "description": studies.STUDY_PRESETS[name]["description"],
        "study": body,
        "members": len(members),
        "estimate": {
            "points": float(sum(e.points for e in ests)),
            "flops": float(sum(e.flops for e in ests)),
            "peak_bytes": float(max(e.peak_bytes for e in ests)),
        },
    }


@presets_router.get("", response_model=list[StudyPresetOut], responses=ERRORS)
def list_study_presets() -> Any:
    """The named studies (the paper's Fig. 3 and Fig. 5 and CPU-sized versions): each with
    the body to POST to /v1/studies."""
    return [_study_preset(n) for n in studies.study_preset_names()]


@presets_router.get("/{name}", response_model=StudyPresetOut, responses=ERRORS)
def get_study_preset(name: str) -> Any:
    if name not in studies.STUDY_PRESETS:
        raise NotFound(
            f"no study preset {name!r}; study presets: {', '.join(studies.study_preset_names())}"
        )
    return _study_preset(name)
