"""The exact finite-size theory stored with its experiment.

``experiments`` gains ``theory`` (JSON, null): the spec's exact finite-size theory, computed
once where the experiment's work is done instead of on every results request. The rows
already stored get null; the service computes theirs on their first results request and
stores it then (a revision cannot run the engine).

Downgrade drops the column (the theory is derived data: it is computed again when needed).

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-05 04:30:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("experiments", schema=None) as batch_op:
        batch_op.add_column(sa.Column("theory", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("experiments", schema=None) as batch_op:
        batch_op.drop_column("theory")
