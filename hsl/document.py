"""The results document of docs/reference.md, built from an engine spec and points.

The engine returns dataclasses; turning them into JSON is this adapter's job. The same
function serves ``hsl run`` and the service, so both produce identical documents.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict
from typing import Any

import hsl_engine as he

POINT_FIELDS = (
    "method",
    "seed",
    "n",
    "alpha",
    "mse",
    "overlap",
    "cos2",
    "eigenvalues",
    "recovered",
    "n_train_used",
    "seconds",
)

# what computed a point: the engine puts these in every point's extras, the service also
# stores them as columns, and the results document shows them on every point
PROVENANCE_FIELDS = ("engine_version", "device", "backend")


def _clean(value: Any) -> Any:
    """JSON-safe: tuples to lists, non-finite floats to None (JSON has no NaN)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def point_to_dict(p: he.Point) -> dict[str, Any]:
    out = {name: getattr(p, name) for name in POINT_FIELDS}
    out.update({k: v for k, v in p.extra.items() if k not in out})
    return _clean(out)


def point_from_dict(d: Mapping[str, Any]) -> he.Point:
    """Inverse of `point_to_dict` (extra keys go back to ``extra``)."""
    base = {k: d.get(k) for k in POINT_FIELDS}
    for key in ("cos2", "eigenvalues"):
        if base[key] is not None:
            base[key] = tuple(float("nan") if v is None else v for v in base[key])
    if base["mse"] is None:
        base["mse"] = float("nan")
    extra = {k: v for k, v in d.items() if k not in POINT_FIELDS}
    return he.Point(**base, extra=extra)


def exact_theory(spec: he.ExperimentSpec) -> dict[str, Any]:
    """The spec's exact finite-size theory as JSON: what the service stores with an
    experiment (``experiments.theory``) and `results_document` takes as ``exact``.

    Seconds of work (the engine solves the proportional-regime equations at every n of the
    sweep and searches each direction's n_half), independent of the points: computed once
    per experiment, where its work is done (the worker, ``hsl run``), never per request.
    """
    exact = he.exact_theory(spec)
    return _clean(
        {
            "engine_version": he.ENGINE_VERSION,
            "finite_size": None
            if exact.finite_size is None
            else [asdict(p) for p in exact.finite_size],
            "n_half_finite_size": None if exact.n_half is None else list(exact.n_half),
            "finite_size_note": exact.note,
        }
    )


def exact_from_json(stored: Mapping[str, Any]) -> he.ExactTheory:
    """The engine's `he.ExactTheory` from the JSON of `exact_theory`."""
    rows = stored.get("finite_size")
    n_half = stored.get("n_half_finite_size")
    return he.ExactTheory(
        None if rows is None else [he.FiniteSizePoint(**row) for row in rows],
        None if n_half is None else tuple(n_half),
        stored.get("finite_size_note"),
    )


def results_document(
    spec: he.ExperimentSpec,
    points: Iterable[he.Point],
    *,
    experiment_id: str | None = None,
    complete: bool = True,
    exact: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The results document for whatever points exist (partial while running).

    ``engine_version`` is the version that computed the points (the newest, with all of
    them in ``engine_versions``, when they differ); each point names its own.

    ``exact`` is the spec's exact finite-size theory as `exact_theory` returns it (stored
    with the experiment); without it, it is computed here (seconds).
    """
    pts = sorted(points, key=lambda p: (_method_rank(spec, p.method), p.seed, p.n))
    versions = engine_versions(pts)
    if versions:
        engine_version: str | None = versions[-1]  # the newest, when they differ
    else:  # no point yet: this engine will compute them; points that never said: unknown
        engine_version = None if pts else he.ENGINE_VERSION
    summary = he.summarize(
        spec,
        pts,
        rng=he.summary_rng(spec),
        exact=None if exact is None else exact_from_json(exact),
    )
    th = he.theory(spec.model)
    pl = summary.power_law
    doc = {
        "experiment_id": experiment_id,
        "spec": spec.model_dump(mode="json"),
        "spec_hash": spec.spec_hash,
        "engine_version": engine_version,
        **({"engine_versions": versions} if len(versions) > 1 else {}),
        "complete": complete,
        "d1": spec.model.hidden_dim,
        "feature_dim": spec.model.feature_dim,
        "weights": [float(w) for w in th.weights],
        "points": [_document_point(p) for p in pts],
        "curves": {m: [asdict(c) for c in rows] for m, rows in summary.curves.items()},
        "thresholds": [asdict(t) for t in summary.thresholds],
        "power_law": None if pl is None else asdict(pl),
        "theory": {
            "nu1": th.nu1,
            "curve": [asdict(t) for t in summary.theory_curve],
            "spectrum": None if summary.spectrum is None else asdict(summary.spectrum),
            "finite_size": None
            if summary.finite_size is None
            else [asdict(t) for t in summary.finite_size],
            "finite_size_note": summary.finite_size_note,
        },
    }
    return _clean(doc)


def engine_versions(points: Iterable[he.Point]) -> list[str]:
    """The engine versions that computed ``points``, oldest first.

    Points stored before the engine recorded its version count for none.
    """
    found = {p.extra.get("engine_version") for p in points} - {None}
    return sorted(found, key=_version_key)


def _version_key(version: str) -> tuple[tuple[int, ...], str]:
    # numeric release segments compare as numbers ("0.10.0" is newer than "0.9.0")
    release = re.match(r"\d+(?:\.\d+)*", version)
    return (tuple(int(x) for x in release.group().split(".")) if release else (), version)


def document_point(p: he.Point) -> dict[str, Any]:
    """A point of the results document: every one names what computed it (null if unknown).
    The service's event stream sends each stored point in this form too."""
    out = point_to_dict(p)
    for name in PROVENANCE_FIELDS:
        out.setdefault(name, None)
    return out


_document_point = document_point


def _method_rank(spec: he.ExperimentSpec, name: str) -> int:
    names = [m.name for m in spec.methods]
    return names.index(name) if name in names else len(names)


# the scalar point fields; the vectors get one column per entry
CSV_COLUMNS = tuple(f for f in POINT_FIELDS if f not in ("cos2", "eigenvalues"))


def points_csv(doc: Mapping[str, Any]) -> str:
    """The points as CSV: scalar columns, then ``cos2_1..cos2_d1`` and ``eig_1..eig_k``."""
    import csv
    import io

    d1 = int(doc.get("d1") or 0)
    points = doc.get("points") or []
    k = max((len(p.get("eigenvalues") or []) for p in points), default=0)
    header = [
        *CSV_COLUMNS,
        *(f"cos2_{i + 1}" for i in range(d1)),
        *(f"eig_{i + 1}" for i in range(k)),
    ]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    for p in points:
        cos2 = p.get("cos2") or [None] * d1
        eig = p.get("eigenvalues") or []
        eig = list(eig) + [None] * (k - len(eig))
        row = [p.get(c) for c in CSV_COLUMNS] + list(cos2) + eig
        writer.writerow(
            ["" if v is None else (repr(v) if isinstance(v, float) else v) for v in row]
        )
    return buf.getvalue()
