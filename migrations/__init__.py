"""Alembic migrations of the hsl database (env.py and versions/)."""
