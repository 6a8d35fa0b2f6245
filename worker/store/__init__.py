"""The results database: what the worker answered, what readers said about it.

- :mod:`worker.store.schema`: the tables, SQLite's settings, the Alembic migrations;
- :mod:`worker.store.results`: :class:`ResultStore` (results, feedback, retention) and the
  worker's :class:`Recorder`;
- :mod:`worker.store.media`: the preview and Grad-CAM files beside the database.

Dashboard accounts are :mod:`worker.dashboard.accounts`. This package holds PHI (patient name
and ID): it never logs them.
"""

from worker.store.media import PREVIEW_LONG_SIDE, MediaFiles, preview_of
from worker.store.results import NewResult, Recorder, ResultStore, ReviewedResult, Worklist
from worker.store.schema import (
    DECISIONS,
    LABELS,
    Feedback,
    StoredResult,
    StoreError,
    User,
    migrate,
    run_migrations_online,
    sqlite_url,
    utcnow,
)

__all__ = [
    "DECISIONS", "LABELS", "PREVIEW_LONG_SIDE", "Feedback", "MediaFiles", "NewResult", "Recorder", "ResultStore",
    "ReviewedResult", "StoreError", "StoredResult", "User", "Worklist", "migrate", "preview_of",
    "run_migrations_online", "sqlite_url", "utcnow",
]
