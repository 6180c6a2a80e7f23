"""Provenance: what computed each point, and the engine version in the dedupe key.

``points`` gains ``engine_version``, ``device`` and ``backend`` (nullable), filled from the
point's JSON where the engine already wrote them there, else left null: nothing else tells
what computed an older point. ``experiments`` gains ``engine_version`` (the engine of the API
process that accepted the spec), ``0.1.0`` for the rows already stored (the version before
it was recorded), and the dedupe constraint becomes (tenant, spec, engine version).

Downgrade: the old constraint allows one live experiment per (tenant, spec), so where a
spec is live under several engine versions only the newest keeps its dedupe key.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01 22:10:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

PREVIOUS_ENGINE_VERSION = "0.1.0"
PROVENANCE = ("engine_version", "device", "backend")

# the tables as this revision sees them (not the models: revisions are frozen history)
points = sa.table(
    "points",
    sa.column("data", sa.JSON()),
    *(sa.column(name, sa.String(length=40)) for name in PROVENANCE),
)
experiments = sa.table(
    "experiments",
    sa.column("id", sa.String(length=32)),
    sa.column("tenant_id", sa.Integer()),
    sa.column("dedupe_key", sa.String(length=80)),
    sa.column("engine_version", sa.String(length=40)),
    sa.column("created_at", sa.DateTime()),
)


def upgrade() -> None:
    with op.batch_alter_table("points", schema=None) as batch_op:
        for name in PROVENANCE:
            batch_op.add_column(sa.Column(name, sa.String(length=40), nullable=True))
    # JSON_EXTRACT on SQLite, ->> on PostgreSQL; a missing key gives NULL
    op.execute(
        points.update().values({name: points.c.data[name].as_string() for name in PROVENANCE})
    )

    with op.batch_alter_table("experiments", schema=None) as batch_op:
        batch_op.add_column(sa.Column("engine_version", sa.String(length=40), nullable=True))
    op.execute(experiments.update().values(engine_version=PREVIOUS_ENGINE_VERSION))
    with op.batch_alter_table("experiments", schema=None) as batch_op:
        batch_op.alter_column("engine_version", existing_type=sa.String(length=40), nullable=False)
        batch_op.drop_constraint(batch_op.f("uq_experiments_tenant_id_dedupe_key"), type_="unique")
        batch_op.create_unique_constraint(
            batch_op.f("uq_experiments_tenant_id_dedupe_key_engine_version"),
            ["tenant_id", "dedupe_key", "engine_version"],
        )


def downgrade() -> None:
    newer = experiments.alias("newer")
    op.execute(
        experiments.update()
        .where(
            experiments.c.dedupe_key.is_not(None),
            sa.exists()
            .where(
                newer.c.tenant_id == experiments.c.tenant_id,
                newer.c.dedupe_key == experiments.c.dedupe_key,
                sa.or_(
                    newer.c.created_at > experiments.c.created_at,
                    sa.and_(
                        newer.c.created_at == experiments.c.created_at,
                        newer.c.id > experiments.c.id,
                    ),
                ),
            )
            .correlate(experiments),
        )
        .values(dedupe_key=None)
    )
    with op.batch_alter_table("experiments", schema=None) as batch_op:
        batch_op.drop_constraint(
            batch_op.f("uq_experiments_tenant_id_dedupe_key_engine_version"), type_="unique"
        )
        batch_op.create_unique_constraint(
            batch_op.f("uq_experiments_tenant_id_dedupe_key"), ["tenant_id", "dedupe_key"]
        )
        batch_op.drop_column("engine_version")

    # the point JSON keeps its own copy of the provenance the engine wrote there
    with op.batch_alter_table("points", schema=None) as batch_op:
        for name in reversed(PROVENANCE):
            batch_op.drop_column(name)
