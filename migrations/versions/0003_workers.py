"""Registered workers: what serves which queue, on which devices, alive until when.

A new table, ``workers``: one row per worker process, inserted when it starts, its
``last_seen`` and ``expires_at`` renewed by a heartbeat, deleted when it stops. The API routes
``device: auto`` specs to the ``gpu`` queue only while a live GPU worker is registered, sizes
GPU specs against the memory the workers report, and says in the status document when a
queued experiment has no live worker for its queue. Nothing else refers to it: downgrade
drops it.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-08 10:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "workers",
        sa.Column("id", sa.String(length=200), nullable=False),
        sa.Column("hostname", sa.String(length=255), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("queues", sa.JSON(), nullable=False),
        sa.Column("engine_version", sa.String(length=40), nullable=False),
        sa.Column("torch", sa.Boolean(), nullable=True),
        sa.Column("cuda_devices", sa.Integer(), nullable=True),
        sa.Column("cuda_memory_bytes", sa.BigInteger(), nullable=True),
        sa.Column("started_at", sa.DateTime(), nullable=False),
        sa.Column("last_seen", sa.DateTime(), nullable=False),
        sa.Column("expires_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_workers")),
    )
    with op.batch_alter_table("workers", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_workers_expires_at"), ["expires_at"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("workers", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_workers_expires_at"))
    op.drop_table("workers")
