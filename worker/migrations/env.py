"""Alembic environment: worker.store.migrate hands over an open connection."""

from alembic import context

from worker.store import run_migrations_online

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run the migrations through worker.store.migrate (it passes the connection)")
run_migrations_online(connection)
