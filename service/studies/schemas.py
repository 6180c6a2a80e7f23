"""Request and response schemas of the studies and compare resources (docs/reference.md)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

from ..experiments.schemas import PlotLinks, Status

MemberStatus = Literal["queued", "running", "succeeded", "failed", "cancelled", "deleted"]


class StudySubmission(BaseModel):
    """``POST /v1/studies``: a base spec (or the name of an experiment preset) and axes over
    its fields; the members are the grid product of the axes."""

    name: str | None = Field(
        None, description="1-200 characters of printable text; default the base spec's name"
    )
    base: dict[str, Any] | str = Field(
        description="an experiment spec, or the name of an experiment preset"
    )
    axes: dict[str, list[Any]] = Field(
        description='dotted spec path -> values, e.g. {"model.gamma": [0.4, 1.0]}; at most 8 '
        "axes of 64 values and HSL_MAX_STUDY_MEMBERS members"
    )
    tags: list[str] | None = Field(None, description="labels (not part of any spec)")
    notes: str | None = Field(None, description="free text (not part of any spec)")


class MemberProgress(BaseModel):
    points_done: int
    points_total: int
    fraction: float


class Member(BaseModel):
    experiment_id: str | None = Field(description="null once the experiment was deleted")
    params: dict[str, Any] = Field(description="the member's value of each axis")
    status: MemberStatus
    progress: MemberProgress


class StudyProgress(BaseModel):
    points_done: int
    points_total: int
    fraction: float
    eta_seconds: float | None = Field(
        description="seconds left: the unfinished points times the time per sample of the "
        "study's points so far (members without points borrow it), over the runs executing at "
        "once; null before the first point"
    )
    members: dict[str, int] = Field(description="members by status")


class StudyLinks(BaseModel):
    self: str
    results: str
    plots: dict[str, PlotLinks]
    cancel: str


class StudyDocument(BaseModel):
    id: str
    name: str
    status: Status = Field(
        description="from the members: queued until one starts; running while any is queued "
        "or running; then succeeded (all succeeded), failed (one failed) or cancelled; "
        "cancelled at once after a cancel"
    )
    study_hash: str
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    base: dict[str, Any] = Field(description="the base spec, defaults filled in")
    axes: dict[str, list[Any]]
    tags: list[str]
    notes: str | None
    progress: StudyProgress
    members: list[Member]
    links: StudyLinks


class StudyList(BaseModel):
    items: list[StudyDocument]
    next_cursor: str | None = Field(description="pass as ?cursor= for the next page")


class MemberResult(BaseModel):
    experiment_id: str | None
    params: dict[str, Any]
    status: MemberStatus
    complete: bool
    model: dict[str, Any] | None = Field(description="the member's model spec")
    d1: int | None
    feature_dim: int | None
    nu1: float | None
    weights: list[float] | None
    power_law: dict[str, Any] | None = Field(
        description="fitted exponent with its CI and the theory exponent (results document)"
    )
    thresholds: list[dict[str, Any]] = Field(
        description="n_half per direction against n_half_theory (results document)"
    )


class StudyResults(BaseModel):
    study_id: str
    name: str
    status: Status
    complete: bool = Field(description="every member succeeded")
    axes: dict[str, list[Any]]
    members: list[MemberResult]
    plots: dict[str, PlotLinks]


class ComparedExperiment(BaseModel):
    experiment_id: str
    name: str
    status: Status
    spec_hash: str
    complete: bool
    d1: int | None
    feature_dim: int | None
    weights: list[float]
    curves: dict[str, list[dict[str, Any]]]
    thresholds: list[dict[str, Any]]
    power_law: dict[str, Any] | None
    theory_curve: list[dict[str, Any]]


class Comparison(BaseModel):
    ids: list[str]
    experiments: list[ComparedExperiment]
    differences: dict[str, list[Any]] = Field(
        description="dotted spec path -> the value of each experiment (in the order of ids), "
        "only for the fields that differ"
    )
    plots: dict[str, PlotLinks]


class StudyPresetOut(BaseModel):
    name: str
    description: str
    study: dict[str, Any] = Field(description="the body to POST to /v1/studies")
    members: int
    estimate: dict[str, float] = Field(description="the members' total points, flops, peak")
