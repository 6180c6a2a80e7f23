"""The Alembic revisions against the models, on SQLite and PostgreSQL.

Every database test runs on a SQLite file and on a fresh PostgreSQL database (the
``postgres_url`` fixture, fetched lazily so the SQLite variant never needs a server).
"""

from __future__ import annotations

import ast
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service.db import migrate
from service.db.models import (
    ApiKey,
    Base,
    Experiment,
    Point,
    Run,
    Study,
    StudyMember,
    Tenant,
    Worker,
)
from service.db.session import make_engine

VERSIONS = Path(migrate.SCRIPT_LOCATION) / "versions"
REVISION_IMPORTS = {"sqlalchemy", "alembic", "__future__"}
MODEL_TABLES = set(Base.metadata.tables)

# a non-UTC offset, so a round trip proves the conversion to UTC and back
CEST = timezone(timedelta(hours=2))
T0 = datetime(2026, 3, 1, 12, 30, 15, 123456, tzinfo=CEST)


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'hsl.db'}"
    return request.getfixturevalue("postgres_url")


@pytest.fixture
def engine(db_url) -> Iterator[sa.Engine]:
    eng = make_engine(db_url)
    try:
        yield eng
    finally:
        eng.dispose()


@pytest.fixture
def migrated(db_url, engine) -> sa.Engine:
    """The engine of a database upgraded to head."""
    migrate.upgrade(db_url)
    return engine


def table_names(engine: sa.Engine) -> set[str]:
    return set(sa.inspect(engine).get_table_names())


def new_tenant(session: Session, name: str = "acme") -> Tenant:
    tenant = Tenant(name=name, created_at=T0)
    session.add(tenant)
    session.flush()
    return tenant


def new_experiment(session: Session, tenant: Tenant, **kw) -> Experiment:
    fields = {
        "id": uuid.uuid4().hex,
        "tenant_id": tenant.id,
        "name": "fig3",
        "spec": {"methods": ["exact"], "seeds": [0]},
        "spec_hash": "sha256:" + "0" * 64,
        "engine_version": "0.2.0",
        "points_total": 2,
        "created_at": T0,
    }
    exp = Experiment(**{**fields, **kw})
    session.add(exp)
    session.flush()
    return exp


def new_run(session: Session, exp: Experiment, method: str = "exact", seed: int = 0) -> Run:
    run = Run(experiment_id=exp.id, method=method, seed=seed, queue="cpu", status="queued")
    session.add(run)
    session.flush()
    return run


def new_point(session: Session, run: Run, n: int) -> Point:
    point = Point(
        run_id=run.id,
        experiment_id=run.experiment_id,
        method=run.method,
        seed=run.seed,
        n=n,
        seconds=0.25,
        data={"loss": 0.5, "n": n},
        engine_version="0.2.0",
        device="cpu",
        backend="numpy",
        attempt=1,
        created_at=T0 + timedelta(seconds=n),
    )
    session.add(point)
    session.flush()
    return point


def seed_rows(engine: sa.Engine) -> str:
    """A tenant, an API key, an experiment, a run and two points; returns the experiment id."""
    with Session(engine) as s, s.begin():
        tenant = new_tenant(s)
        s.add(ApiKey(tenant_id=tenant.id, prefix="hsl_abc", key_hash="f" * 64, created_at=T0))
        exp = new_experiment(s, tenant, dedupe_key="d1")
        run = new_run(s, exp)
        new_point(s, run, 1)
        new_point(s, run, 2)
        return exp.id


def count(engine: sa.Engine, model) -> int:
    with engine.connect() as conn:
        return conn.execute(sa.select(sa.func.count()).select_from(model)).scalar_one()


# 1. upgrade ----------------------------------------------------------------------------


def test_upgrade_to_head_creates_exactly_the_model_tables(db_url, engine):
    assert table_names(engine) == set()
    assert not migrate.is_current(engine)

    migrate.upgrade(db_url)

    assert table_names(engine) == MODEL_TABLES | {"alembic_version"}
    assert migrate.is_current(engine)


def test_is_current_is_false_at_an_unknown_revision(migrated):
    with migrated.begin() as conn:
        conn.execute(sa.text("UPDATE alembic_version SET version_num = 'not-a-revision'"))
    assert not migrate.is_current(migrated)


# 2. down and up again ------------------------------------------------------------------


def test_up_down_up_then_rows_round_trip_with_aware_datetimes(db_url, migrated):
    seed_rows(migrated)  # downgrade must drop tables that hold rows

    migrate.downgrade(db_url, "base")
    assert table_names(migrated) <= {"alembic_version"}
    assert not migrate.is_current(migrated)

    migrate.upgrade(db_url)
    assert table_names(migrated) == MODEL_TABLES | {"alembic_version"}
    assert migrate.is_current(migrated)
    assert count(migrated, Tenant) == 0

    exp_id = seed_rows(migrated)

    with Session(migrated) as s:
        exp = s.get(Experiment, exp_id)
        assert exp is not None
        assert exp.spec == {"methods": ["exact"], "seeds": [0]}
        assert exp.status == "queued" and exp.cancel_requested is False
        assert exp.started_at is None
        [run] = exp.runs
        points = s.scalars(sa.select(Point).where(Point.run_id == run.id).order_by(Point.n)).all()
        assert [p.n for p in points] == [1, 2]
        assert points[0].data == {"loss": 0.5, "n": 1}
        assert (points[0].engine_version, points[0].device, points[0].backend) == (
            "0.2.0",
            "cpu",
            "numpy",
        )
        assert exp.engine_version == "0.2.0"
        tenant = s.get(Tenant, exp.tenant_id)
        for value, expected in [
            (tenant.created_at, T0),
            (exp.created_at, T0),
            (points[1].created_at, T0 + timedelta(seconds=2)),
        ]:
            assert value.utcoffset() == timedelta(0)  # aware, in UTC
            assert value == expected  # same instant, microseconds kept

    # stored as naive UTC wall time on both databases
    raw = sa.table("tenants", sa.column("created_at", sa.DateTime()))
    with migrated.connect() as conn:
        stored = conn.execute(sa.select(raw.c.created_at)).scalar_one()
    assert stored == T0.astimezone(UTC).replace(tzinfo=None)


def test_naive_datetime_is_rejected(migrated):
    with Session(migrated) as s, pytest.raises(sa.exc.StatementError, match="naive datetime"):
        s.add(Tenant(name="naive", created_at=datetime(2026, 3, 1, 12, 0)))
        s.flush()


# 3. models match migrations ------------------------------------------------------------


def test_models_match_the_migrations(migrated):
    with migrated.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True})
        diff = compare_metadata(ctx, Base.metadata)
    assert diff == []


# 4. revision files ---------------------------------------------------------------------


def imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            roots.add("." * node.level + (node.module or "").split(".")[0])
    return roots


REVISION_FILES = sorted(VERSIONS.glob("*.py"))


def test_there_are_revision_files():
    assert REVISION_FILES


@pytest.mark.parametrize("path", REVISION_FILES, ids=lambda p: p.name)
def test_revision_imports_only_sqlalchemy_and_alembic(path):
    # revisions are frozen history: importing the app would make them change with it
    assert imported_roots(path) <= REVISION_IMPORTS


def test_history_is_linear_with_one_head():
    script = ScriptDirectory.from_config(migrate.alembic_config("sqlite://"))
    assert len(script.get_heads()) == 1
    assert len(script.get_bases()) == 1
    assert len(list(script.walk_revisions())) == len(REVISION_FILES)


# 5. constraints the design relies on ---------------------------------------------------


def test_points_are_unique_per_run_and_n(migrated):
    with Session(migrated) as s, s.begin():
        run = new_run(s, new_experiment(s, new_tenant(s)))
        new_point(s, run, 1)
        run_id = run.id

    with Session(migrated) as s:
        run = s.get(Run, run_id)
        with pytest.raises(IntegrityError):
            new_point(s, run, 1)
        s.rollback()
        new_point(s, s.get(Run, run_id), 2)  # another n of the same run is fine
        s.commit()
    assert count(migrated, Point) == 2


def test_runs_are_unique_per_experiment_method_and_seed(migrated):
    with Session(migrated) as s, s.begin():
        exp = new_experiment(s, new_tenant(s))
        new_run(s, exp, "exact", 0)
        new_run(s, exp, "exact", 1)
        new_run(s, exp, "mc", 0)
        exp_id = exp.id

    with Session(migrated) as s, pytest.raises(IntegrityError):
        new_run(s, s.get(Experiment, exp_id), "exact", 0)


@pytest.mark.parametrize("column", ["dedupe_key", "idempotency_key"])
def test_experiment_keys_are_unique_per_tenant_but_null_repeats(migrated, column):
    with Session(migrated) as s, s.begin():
        acme, other = new_tenant(s, "acme"), new_tenant(s, "other")
        new_experiment(s, acme, **{column: "k"})
        new_experiment(s, other, **{column: "k"})  # same key, another tenant
        new_experiment(s, acme, **{column: None})
        new_experiment(s, acme, **{column: None})  # NULLs never collide
        acme_id = acme.id

    with Session(migrated) as s, pytest.raises(IntegrityError):
        new_experiment(s, s.get(Tenant, acme_id), **{column: "k"})
    assert count(migrated, Experiment) == 4


def test_deleting_an_experiment_cascades_to_its_runs_and_points(migrated):
    doomed = seed_rows(migrated)
    with Session(migrated) as s, s.begin():
        tenant = s.scalars(sa.select(Tenant)).one()
        kept = new_experiment(s, tenant)
        new_point(s, new_run(s, kept), 1)
        kept_id = kept.id

    # a Core DELETE: the database's ON DELETE CASCADE does the work, not the ORM
    with migrated.begin() as conn:
        conn.execute(sa.delete(Experiment).where(Experiment.id == doomed))

    with Session(migrated) as s:
        assert s.scalars(sa.select(Run.experiment_id)).all() == [kept_id]
        assert s.scalars(sa.select(Point.experiment_id)).all() == [kept_id]
        assert s.scalars(sa.select(Experiment.id)).all() == [kept_id]
        assert count(migrated, Tenant) == 1 and count(migrated, ApiKey) == 1


def test_deleting_a_tenant_cascades_to_everything_it_owns(migrated):
    seed_rows(migrated)
    with migrated.begin() as conn:
        conn.execute(sa.delete(Tenant))
    for model in (ApiKey, Experiment, Run, Point):
        assert count(migrated, model) == 0, model.__tablename__


def test_the_same_dedupe_key_may_repeat_under_another_engine_version(migrated):
    with Session(migrated) as s, s.begin():
        acme = new_tenant(s)
        new_experiment(s, acme, dedupe_key="k", engine_version="0.1.0")
        new_experiment(s, acme, dedupe_key="k", engine_version="0.2.0")
        acme_id = acme.id

    with Session(migrated) as s, pytest.raises(IntegrityError):
        new_experiment(s, s.get(Tenant, acme_id), dedupe_key="k", engine_version="0.2.0")
    assert count(migrated, Experiment) == 2


# 6. revision 0002: provenance ----------------------------------------------------------


def insert_at_0001(engine: sa.Engine) -> dict[str, str]:
    """Rows written by the 0001 schema (reflected, not the models): two experiments, one
    with a point whose JSON carries provenance and one whose JSON does not."""
    meta = sa.MetaData()
    meta.reflect(engine)
    t = meta.tables
    naive = T0.astimezone(UTC).replace(tzinfo=None)
    ids = {"recorded": uuid.uuid4().hex, "unrecorded": uuid.uuid4().hex}
    with engine.begin() as conn:
        conn.execute(t["tenants"].insert().values(id=1, name="acme", created_at=naive))
        for i, (what, exp_id) in enumerate(ids.items()):
            conn.execute(
                t["experiments"]
                .insert()
                .values(
                    id=exp_id,
                    tenant_id=1,
                    name=what,
                    spec={},
                    spec_hash=f"sha256:{what}",
                    dedupe_key=f"sha256:{what}",
                    status="running",
                    cancel_requested=False,
                    points_total=1,
                    created_at=naive,
                )
            )
            conn.execute(
                t["runs"]
                .insert()
                .values(
                    id=i + 1,
                    experiment_id=exp_id,
                    method="exact",
                    seed=0,
                    queue="cpu",
                    status="running",
                    attempts=1,
                )
            )
            data = {"n": 4, "mse": 0.5}
            if what == "recorded":
                data.update(engine_version="0.2.0", device="cuda:1", backend="torch")
            conn.execute(
                t["points"]
                .insert()
                .values(
                    run_id=i + 1,
                    experiment_id=exp_id,
                    method="exact",
                    seed=0,
                    n=4,
                    seconds=0.1,
                    data=data,
                    attempt=1,
                    created_at=naive,
                )
            )
    return ids


def provenance(engine: sa.Engine, experiment_id: str) -> tuple[str | None, ...]:
    with Session(engine) as s:
        p = s.scalars(sa.select(Point).where(Point.experiment_id == experiment_id)).one()
        return p.engine_version, p.device, p.backend


def test_0002_fills_provenance_from_the_point_json_and_marks_old_experiments(db_url, engine):
    migrate.upgrade(db_url, "0001")
    ids = insert_at_0001(engine)

    migrate.upgrade(db_url)

    assert migrate.is_current(engine)
    assert provenance(engine, ids["recorded"]) == ("0.2.0", "cuda:1", "torch")
    assert provenance(engine, ids["unrecorded"]) == (None, None, None)
    with Session(engine) as s:
        versions = s.execute(sa.select(Experiment.name, Experiment.engine_version)).all()
        assert dict(versions) == {"recorded": "0.1.0", "unrecorded": "0.1.0"}
        point = s.scalars(sa.select(Point).where(Point.experiment_id == ids["unrecorded"])).one()
        assert point.data == {"n": 4, "mse": 0.5}  # the JSON is left as it was
        # the dedupe key now includes the engine version: the same spec under 0.2.0 is new
        tenant = s.get(Tenant, 1)
        new_experiment(s, tenant, dedupe_key="sha256:recorded", engine_version="0.2.0")
        s.commit()
        with pytest.raises(IntegrityError):
            new_experiment(s, tenant, dedupe_key="sha256:recorded", engine_version="0.1.0")


def test_0002_downgrade_keeps_the_newest_live_experiment_of_a_spec(db_url, migrated):
    with Session(migrated) as s, s.begin():
        acme, other = new_tenant(s, "acme"), new_tenant(s, "other")
        old = new_experiment(s, acme, dedupe_key="k", engine_version="0.1.0")
        new = new_experiment(
            s, acme, dedupe_key="k", engine_version="0.2.0", created_at=T0 + timedelta(hours=1)
        )
        theirs = new_experiment(s, other, dedupe_key="k", engine_version="0.1.0")
        new_point(s, new_run(s, new), 1)
        ids = {"old": old.id, "new": new.id, "theirs": theirs.id}

    migrate.downgrade(db_url, "0001")

    columns = {
        table: {c["name"] for c in sa.inspect(migrated).get_columns(table)}
        for table in ("experiments", "points")
    }
    assert "engine_version" not in columns["experiments"]
    assert not {"engine_version", "device", "backend"} & columns["points"]
    keys = sa.table("experiments", sa.column("id"), sa.column("dedupe_key"))
    with migrated.connect() as conn:
        stored = dict(conn.execute(sa.select(keys.c.id, keys.c.dedupe_key)).all())
    # one live experiment per (tenant, spec) again: the older one gives up its key
    assert stored == {ids["old"]: None, ids["new"]: "k", ids["theirs"]: "k"}

    migrate.upgrade(db_url)
    assert migrate.is_current(migrated)
    with Session(migrated) as s:
        assert set(s.scalars(sa.select(Experiment.engine_version))) == {"0.1.0"}
        # the point's provenance is gone with the columns (its JSON had none)
        assert provenance(migrated, ids["new"]) == (None, None, None)


# 7. revision 0003: registered workers ---------------------------------------------------


def raw_ids(engine: sa.Engine, table: str) -> set[str]:
    """The ids of a table's rows, read without the models (which may be ahead of the
    schema under test)."""
    with engine.connect() as conn:
        return set(conn.execute(sa.select(sa.table(table, sa.column("id")).c.id)).scalars())


def test_0003_adds_the_workers_table_and_keeps_the_data(db_url, engine):
    migrate.upgrade(db_url, "0001")
    ids = insert_at_0001(engine)  # rows of an older schema: the models are ahead of it
    migrate.upgrade(db_url, "0002")
    assert "workers" not in table_names(engine)

    migrate.upgrade(db_url, "0003")

    assert "workers" in table_names(engine)
    assert {i["name"] for i in sa.inspect(engine).get_indexes("workers")} == {
        "ix_workers_expires_at"
    }
    assert raw_ids(engine, "experiments") == set(ids.values()) and count(engine, Point) == 2
    migrate.upgrade(db_url)
    assert migrate.is_current(engine)
    with Session(engine) as s:
        # a GPU's memory does not fit 32 bits; the queues are a JSON list
        s.add(
            Worker(
                id="gpu-1:4242:abcd1234",
                hostname="gpu-1",
                pid=4242,
                kind="celery",
                queues=["gpu"],
                engine_version="0.2.0",
                torch=True,
                cuda_devices=8,
                cuda_memory_bytes=141 * 10**9,
                started_at=T0,
                last_seen=T0 + timedelta(seconds=10),
                expires_at=T0 + timedelta(seconds=100),
            )
        )
        s.commit()
    with Session(engine) as s:
        row = s.get(Worker, "gpu-1:4242:abcd1234")
        assert (row.queues, row.cuda_memory_bytes, row.torch) == (["gpu"], 141 * 10**9, True)
        assert row.expires_at == T0 + timedelta(seconds=100)


def test_0003_downgrade_drops_the_workers_table_with_its_rows(db_url, migrated):
    exp_id = seed_rows(migrated)
    with Session(migrated) as s, s.begin():
        s.add(
            Worker(
                id="w",
                hostname="h",
                pid=1,
                kind="embedded",
                queues=["cpu", "gpu"],
                engine_version="0.2.0",
                started_at=T0,
                last_seen=T0,
                expires_at=T0,
            )
        )

    migrate.downgrade(db_url, "0002")

    assert "workers" not in table_names(migrated)
    assert not migrate.is_current(migrated)
    assert raw_ids(migrated, "experiments") == {exp_id}
    migrate.upgrade(db_url)
    assert migrate.is_current(migrated) and count(migrated, Worker) == 0


# 8. revision 0004: studies, tags and notes ----------------------------------------------


def new_study(session: Session, tenant: Tenant, **kw) -> Study:
    study = Study(
        id=uuid.uuid4().hex,
        tenant_id=tenant.id,
        name="gammas",
        base={"name": "t"},
        axes={"model.gamma": [0.4, 1.0]},
        study_hash="sha256:" + "1" * 64,
        cancel_requested=False,
        tags=["scan"],
        notes="why",
        created_at=T0,
        **kw,
    )
    session.add(study)
    session.flush()
    return study


def test_0004_adds_studies_and_labels_and_keeps_the_data(db_url, engine):
    migrate.upgrade(db_url, "0001")
    ids = insert_at_0001(engine)
    migrate.upgrade(db_url, "0003")
    assert "studies" not in table_names(engine)

    migrate.upgrade(db_url)

    assert migrate.is_current(engine)
    assert {"studies", "study_members"} <= table_names(engine)
    with Session(engine) as s:
        # the experiments already stored: no tags, no notes, submitted on their own
        exps = s.scalars(sa.select(Experiment).order_by(Experiment.name)).all()
        assert {e.id for e in exps} == set(ids.values())
        assert [(e.tags, e.notes, e.standalone) for e in exps] == [([], None, True)] * 2
        tenant = s.get(Tenant, 1)
        study = new_study(s, tenant)
        for position, exp in enumerate(exps):
            s.add(
                StudyMember(
                    study_id=study.id,
                    position=position,
                    experiment_id=exp.id,
                    params={"model.gamma": [0.4, 1.0][position]},
                )
            )
        exps[0].tags = ["a", "b"]
        s.commit()
        study_id = study.id
    with Session(engine) as s:
        study = s.get(Study, study_id)
        assert [m.params for m in study.members] == [{"model.gamma": 0.4}, {"model.gamma": 1.0}]
        assert study.tags == ["scan"] and study.created_at == T0
    # an experiment deleted on its own leaves its member with a null experiment
    with engine.begin() as conn:
        conn.execute(sa.delete(Experiment).where(Experiment.id == ids["recorded"]))
    with Session(engine) as s:
        members = s.get(Study, study_id).members
        assert [m.experiment_id for m in members] == [None, ids["unrecorded"]]
    # a study deleted: its members go, the experiments stay
    with engine.begin() as conn:
        conn.execute(sa.delete(Study))
    assert count(engine, StudyMember) == 0 and count(engine, Experiment) == 1


def test_0004_study_idempotency_keys_are_unique_per_tenant(migrated):
    with Session(migrated) as s, s.begin():
        acme, other = new_tenant(s, "acme"), new_tenant(s, "other")
        new_study(s, acme, idempotency_key="k")
        new_study(s, other, idempotency_key="k")
        new_study(s, acme)
        new_study(s, acme)
        acme_id = acme.id
    with Session(migrated) as s, pytest.raises(IntegrityError):
        new_study(s, s.get(Tenant, acme_id), idempotency_key="k")


def test_0004_downgrade_drops_studies_and_labels_and_keeps_experiments(db_url, migrated):
    exp_id = seed_rows(migrated)
    with Session(migrated) as s, s.begin():
        study = new_study(s, s.scalars(sa.select(Tenant)).one())
        s.add(StudyMember(study_id=study.id, position=0, experiment_id=exp_id, params={}))

    migrate.downgrade(db_url, "0003")

    assert not {"studies", "study_members"} & table_names(migrated)
    columns = {c["name"] for c in sa.inspect(migrated).get_columns("experiments")}
    assert not {"tags", "notes", "standalone"} & columns
    assert raw_ids(migrated, "experiments") == {exp_id} and count(migrated, Point) == 2
    migrate.upgrade(db_url)
    assert migrate.is_current(migrated) and count(migrated, Study) == 0
    with Session(migrated) as s:
        exp = s.get(Experiment, exp_id)
        assert (exp.tags, exp.notes, exp.standalone) == ([], None, True)


# 9. revision 0005: the exact theory stored with its experiment ---------------------------

THEORY = {
    "engine_version": "0.4.0",
    "finite_size": [{"n": 24.0, "mse": 0.5, "cos2": [0.25, 0.0], "outliers": [1.5, None]}],
    "n_half_finite_size": [30.5, None],
    "finite_size_note": None,
}


def experiment_columns(engine: sa.Engine) -> set[str]:
    return {c["name"] for c in sa.inspect(engine).get_columns("experiments")}


def test_0005_adds_a_null_theory_to_the_experiments_already_stored(db_url, engine):
    migrate.upgrade(db_url, "0001")
    ids = insert_at_0001(engine)
    migrate.upgrade(db_url, "0004")
    assert "theory" not in experiment_columns(engine)

    migrate.upgrade(db_url)

    assert migrate.is_current(engine) and "theory" in experiment_columns(engine)
    with Session(engine) as s:
        rows = s.execute(sa.select(Experiment.id, Experiment.theory)).all()
        # null: computed and stored on the first results request (the service back-fills)
        assert dict(rows) == {exp_id: None for exp_id in ids.values()}
        # a stored theory is a JSON document: nested lists, nulls and floats round-trip
        s.execute(
            sa.update(Experiment).where(Experiment.id == ids["recorded"]).values(theory=THEORY)
        )
        s.commit()
    with Session(engine) as s:
        assert s.get(Experiment, ids["recorded"]).theory == THEORY
        assert s.get(Experiment, ids["unrecorded"]).theory is None
        # the theory is stored as SQL NULL, not JSON null: "not computed" is found by IS NULL
        missing = s.scalars(sa.select(Experiment.id).where(Experiment.theory.is_(None)))
        assert set(missing) == {ids["unrecorded"]}


def test_0005_downgrade_drops_the_theory_and_keeps_the_experiments(db_url, migrated):
    exp_id = seed_rows(migrated)
    with Session(migrated) as s, s.begin():
        s.get(Experiment, exp_id).theory = THEORY

    migrate.downgrade(db_url, "0004")

    assert "theory" not in experiment_columns(migrated)
    assert raw_ids(migrated, "experiments") == {exp_id} and count(migrated, Point) == 2
    migrate.upgrade(db_url)
    assert migrate.is_current(migrated)
    with Session(migrated) as s:
        exp = s.get(Experiment, exp_id)
        assert exp.theory is None and exp.tags == [] and exp.name == "fig3"
