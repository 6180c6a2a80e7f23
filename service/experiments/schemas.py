"""Response schemas of the experiments resource (docs/reference.md)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

Status = Literal["queued", "running", "succeeded", "failed", "cancelled"]


class Progress(BaseModel):
    points_done: int
    points_total: int
    fraction: float = Field(description="points_done / points_total")
    eta_seconds: float | None = Field(
        description="seconds left, from the time per sample of the points so far"
    )
    runs: dict[str, int] = Field(description="runs by status")


class PlotLinks(BaseModel):
    png: str
    svg: str


class Links(BaseModel):
    self: str
    results: str
    results_csv: str
    plots: dict[str, PlotLinks]
    cancel: str


class ErrorInfo(BaseModel):
    reason: str = Field(description="engine_error | timeout | resource_exhausted | worker_lost |…")
    message: str
    run: dict[str, Any] | None = None


class StatusDocument(BaseModel):
    id: str
    name: str
    status: Status
    spec_hash: str
    engine_version: str = Field(
        description="the engine version of the service that accepted the spec: the same spec "
        "is deduplicated only under the same engine version"
    )
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    progress: Progress
    error: ErrorInfo | None
    queue: str = Field(
        description="the queue its runs go to: 'gpu' for device cuda (and for large 'auto' "
        "specs while a GPU worker is alive), else 'cpu'"
    )
    waiting: str | None = Field(
        None,
        description="while runs are queued and no live worker serves the queue, why: e.g. "
        "'waiting for a GPU worker (none is registered)'; null otherwise",
    )
    links: Links


class ExperimentList(BaseModel):
    items: list[StatusDocument]
    next_cursor: str | None = Field(description="pass as ?cursor= for the next page")


class ResourceEstimateOut(BaseModel):
    points: int
    feature_dim: float
    peak_bytes: float
    flops: float


class PresetOut(BaseModel):
    name: str
    description: str
    spec: dict[str, Any]
    estimate: ResourceEstimateOut


class FieldProblem(BaseModel):
    field: str = Field(description="dotted path of the offending field, e.g. model.d")
    message: str


class Problem(BaseModel):
    """RFC 9457 problem details."""

    type: str
    title: str
    status: int
    detail: str
    instance: str | None = None
    errors: list[FieldProblem] | None = None
