"""Alembic environment: the URL comes from the Config (set by service.db.migrate)."""

from __future__ import annotations

from alembic import context

from service.db.models import Base
from service.db.session import make_engine

config = context.config
target_metadata = Base.metadata


def run_migrations_offline() -> None:
    context.configure(
        url=config.get_main_option("sqlalchemy.url"),
        target_metadata=target_metadata,
        literal_binds=True,
        render_as_batch=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    # make_engine's pool is disposed right after (NullPool would clash with its pool_size)
    engine = make_engine(config.get_main_option("sqlalchemy.url"))
    try:
        with engine.connect() as conn:
            _run(conn)
    finally:
        engine.dispose()


def _run(connection) -> None:
    if connection.dialect.name == "sqlite":
        # a batch revision rebuilds a table (copy, drop, rename); with foreign keys on,
        # dropping a parent would cascade into its children
        connection.exec_driver_sql("PRAGMA foreign_keys=OFF")
        connection.commit()
    # batch mode lets later revisions alter tables on SQLite (copy-and-move)
    context.configure(connection=connection, target_metadata=target_metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
