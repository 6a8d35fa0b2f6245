"""Alembic migrations of the results database (run by worker.store.migrate at start-up)."""
