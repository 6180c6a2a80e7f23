"""Queries and writes of the studies resource. Never commits: the route does, once.

Members are experiments of the tenant, created with `experiments.repository.create` and so
deduplicated by spec hash: a grid point whose spec the tenant already submitted (live: not
failed or cancelled, same engine version) reuses that experiment.

What a study may end: **cancel** cancels the member experiments only this study needs (not
submitted on their own, and in no other study that is not cancelled); **delete** removes the
study and the member experiments only it holds (not submitted on their own, in no other
study). An experiment deleted on its own leaves its member row with a null experiment.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

from sqlalchemy import and_, func, or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

import hsl_engine as he

from .. import labels
from ..db import Experiment, Study, StudyMember, utcnow
from ..errors import Conflict, NotFound
from ..experiments import repository as exp_repo
from ..experiments.repository import _decode_cursor, _encode_cursor, is_experiment_id


def find_by_idempotency_key(session: Session, tenant_id: int, key: str) -> Study | None:
    return session.execute(
        select(Study).where(Study.tenant_id == tenant_id, Study.idempotency_key == key)
    ).scalar_one_or_none()


def _replay(session: Session, tenant_id: int, key: str | None, study_hash: str) -> Study | None:
    if key is None:
        return None
    earlier = find_by_idempotency_key(session, tenant_id, key)
    if earlier is not None and earlier.study_hash != study_hash:
        raise Conflict(
            "this Idempotency-Key was used with a different study",
            errors=[{"field": "Idempotency-Key", "message": "reused with another study"}],
        )
    return earlier


def create(
    session: Session,
    tenant_id: int,
    *,
    name: str,
    base: he.ExperimentSpec,
    axes: dict[str, list[Any]],
    study_hash: str,
    members: list[tuple[dict[str, Any], he.ExperimentSpec, str]],
    idempotency_key: str | None,
    admit: Callable[[], None],
    tags: list[str],
    notes: str | None,
) -> tuple[Study, bool, list[Experiment]]:
    """Store a study and its members (``(params, spec, queue)``), reusing the tenant's live
    experiments of the same spec. Returns ``(study, created, new experiments)``; the same
    ``Idempotency-Key`` returns the study it created (409 with another study)."""
    earlier = _replay(session, tenant_id, idempotency_key, study_hash)
    if earlier is not None:
        return earlier, False, []
    study = Study(
        id=uuid.uuid4().hex,
        tenant_id=tenant_id,
        name=name,
        base=base.model_dump(mode="json"),
        axes=axes,
        study_hash=study_hash,
        idempotency_key=idempotency_key,
        cancel_requested=False,
        tags=tags,
        notes=notes,
        created_at=utcnow(),
    )
    try:
        with session.begin_nested():
            session.add(study)
            session.flush()
    except IntegrityError:  # a concurrent submission under the same key won the race
        earlier = _replay(session, tenant_id, idempotency_key, study_hash)
        if earlier is not None:
            return earlier, False, []
        raise
    created: list[Experiment] = []
    for position, (params, spec, queue) in enumerate(members):
        exp, new = exp_repo.create(
            session,
            tenant_id,
            spec,
            idempotency_key=None,
            admit=admit,
            queue=queue,
            standalone=False,
        )
        if new:
            created.append(exp)
        session.add(
            StudyMember(study_id=study.id, position=position, experiment_id=exp.id, params=params)
        )
    session.flush()
    return study, True, created


def get(session: Session, tenant_id: int, study_id: str) -> Study:
    """The tenant's study; another tenant's id answers exactly like an unknown one."""
    study = None
    if is_experiment_id(study_id):  # the same form: uuid4().hex
        study = session.execute(
            select(Study).where(Study.id == study_id, Study.tenant_id == tenant_id)
        ).scalar_one_or_none()
    if study is None:
        raise NotFound(f"no study with id {study_id!r}")
    return study


def list_page(
    session: Session,
    tenant_id: int,
    *,
    name: str | None,
    tag: str | None,
    limit: int,
    cursor: str | None,
) -> tuple[list[Study], str | None]:
    """Newest first; keyset pagination on (created_at, id), as for experiments."""
    q = select(Study).where(Study.tenant_id == tenant_id)
    if name is not None:
        q = q.where(Study.name == name)
    if tag is not None:
        q = q.where(labels.has_tag(Study.tags, tag, session.get_bind().dialect.name))
    if cursor is not None:
        created, study_id = _decode_cursor(cursor)
        q = q.where(
            or_(
                Study.created_at < created,
                and_(Study.created_at == created, Study.id < study_id),
            )
        )
    rows = list(
        session.execute(q.order_by(Study.created_at.desc(), Study.id.desc()).limit(limit + 1))
        .scalars()
        .all()
    )
    more = len(rows) > limit
    rows = rows[:limit]
    return rows, (_encode_cursor(rows[-1]) if more and rows else None)


def _held_elsewhere(session: Session, study: Study, *, live_only: bool) -> set[str]:
    """Member experiments of ``study`` that another study of the tenant also holds (one not
    cancelled, with ``live_only``)."""
    ids = [m.experiment_id for m in study.members if m.experiment_id]
    if not ids:
        return set()
    q = (
        select(StudyMember.experiment_id)
        .join(Study, Study.id == StudyMember.study_id)
        .where(StudyMember.experiment_id.in_(ids), StudyMember.study_id != study.id)
    )
    if live_only:
        q = q.where(Study.cancel_requested.is_(False))
    return set(session.execute(q).scalars())


def _own_members(session: Session, study: Study, *, live_only: bool) -> list[Experiment]:
    ids = [m.experiment_id for m in study.members if m.experiment_id]
    if not ids:
        return []
    shared = _held_elsewhere(session, study, live_only=live_only)
    exps = session.execute(select(Experiment).where(Experiment.id.in_(ids))).scalars()
    return [e for e in exps if not e.standalone and e.id not in shared]


def cancel(session: Session, study: Study) -> None:
    """Mark the study cancelled and cancel the members only it needs (idempotent)."""
    study.cancel_requested = True
    session.flush()
    for exp in _own_members(session, study, live_only=True):
        exp_repo.cancel(session, exp)


def remove(session: Session, study: Study) -> list[str]:
    """Delete the study, then the member experiments only it holds (each cancelled first, as
    ``DELETE /v1/experiments/{id}`` does). Returns the ids of the experiments deleted."""
    doomed = _own_members(session, study, live_only=False)
    session.delete(study)
    session.flush()
    for exp in doomed:
        exp_repo.remove(session, exp)
    return [e.id for e in doomed]


def member_rows(session: Session, ids: list[str]) -> dict[str, Any]:
    """Per member experiment: status, cancel flag, points stored and total, start and end
    (one query)."""
    if not ids:
        return {}
    from ..db import Point

    points = (
        select(func.count())
        .select_from(Point)
        .where(Point.experiment_id == Experiment.id)
        .correlate(Experiment)
        .scalar_subquery()
        .label("points_done")
    )
    rows = session.execute(
        select(
            Experiment.id,
            Experiment.status,
            Experiment.points_total,
            Experiment.started_at,
            Experiment.finished_at,
            points,
        ).where(Experiment.id.in_(ids))
    ).all()
    return {r.id: r for r in rows}
