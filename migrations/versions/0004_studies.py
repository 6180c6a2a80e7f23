"""Studies, and tags and notes on experiments and studies.

New tables ``studies`` (a base spec and axes over its fields) and ``study_members`` (one row
per grid point: its parameters and the experiment computing it, set to null when that
experiment is deleted on its own). ``experiments`` gains ``tags`` (a JSON list, ``[]`` for the
rows already stored), ``notes`` (text, null) and ``standalone`` (submitted through POST
/v1/experiments rather than only as a study's member: true for every row already stored,
since no study existed before).

Downgrade drops the study tables with their rows and the three columns; the experiments
themselves, their runs and points are kept.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-05 00:30:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

# the table as this revision sees it (not the models: revisions are frozen history)
experiments = sa.table(
    "experiments",
    sa.column("tags", sa.JSON()),
    sa.column("standalone", sa.Boolean()),
)


def upgrade() -> None:
    with op.batch_alter_table("experiments", schema=None) as batch_op:
        batch_op.add_column(sa.Column("tags", sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column("notes", sa.Text(), nullable=True))
        batch_op.add_column(sa.Column("standalone", sa.Boolean(), nullable=True))
    op.execute(experiments.update().values(tags=[], standalone=True))
    with op.batch_alter_table("experiments", schema=None) as batch_op:
        batch_op.alter_column("tags", existing_type=sa.JSON(), nullable=False)
        batch_op.alter_column("standalone", existing_type=sa.Boolean(), nullable=False)

    op.create_table(
        "studies",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("tenant_id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("base", sa.JSON(), nullable=False),
        sa.Column("axes", sa.JSON(), nullable=False),
        sa.Column("study_hash", sa.String(length=80), nullable=False),
        sa.Column("idempotency_key", sa.String(length=200), nullable=True),
        sa.Column("cancel_requested", sa.Boolean(), nullable=False),
        sa.Column("tags", sa.JSON(), nullable=False),
        sa.Column("notes", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["tenant_id"],
            ["tenants.id"],
            name=op.f("fk_studies_tenant_id_tenants"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_studies")),
        sa.UniqueConstraint(
            "tenant_id", "idempotency_key", name=op.f("uq_studies_tenant_id_idempotency_key")
        ),
    )
    op.create_index(
        "ix_studies_tenant_created", "studies", ["tenant_id", "created_at", "id"], unique=False
    )
    op.create_table(
        "study_members",
        sa.Column("study_id", sa.String(length=32), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("experiment_id", sa.String(length=32), nullable=True),
        sa.Column("params", sa.JSON(), nullable=False),
        sa.ForeignKeyConstraint(
            ["experiment_id"],
            ["experiments.id"],
            name=op.f("fk_study_members_experiment_id_experiments"),
            ondelete="SET NULL",
        ),
        sa.ForeignKeyConstraint(
            ["study_id"],
            ["studies.id"],
            name=op.f("fk_study_members_study_id_studies"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("study_id", "position", name=op.f("pk_study_members")),
    )
    op.create_index(
        op.f("ix_study_members_experiment_id"), "study_members", ["experiment_id"], unique=False
    )


def downgrade() -> None:
    op.drop_index(op.f("ix_study_members_experiment_id"), table_name="study_members")
    op.drop_table("study_members")
    op.drop_index("ix_studies_tenant_created", table_name="studies")
    op.drop_table("studies")
    with op.batch_alter_table("experiments", schema=None) as batch_op:
        batch_op.drop_column("standalone")
        batch_op.drop_column("notes")
        batch_op.drop_column("tags")
