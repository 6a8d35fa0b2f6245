"""Structured logging that never carries patient identifiers.

The worker logs SOP Instance UIDs, AE titles and reasons, never dataset contents.
pynetdicom logs whole datasets at DEBUG and identifiers in some INFO lines, so its
logger is held at WARNING whatever the worker's level.
"""

from __future__ import annotations

import json
import logging
import sys
import traceback
from datetime import UTC, datetime
from typing import Any

_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, extra fields."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        out.update({k: v for k, v in vars(record).items() if k not in _STANDARD})
        if record.exc_info and record.exc_info[0] is not None:
            # Type and frames only: exception messages can quote dataset values.
            exc_type, _exc, tb = record.exc_info
            out["exception"] = exc_type.__name__
            out["stack"] = [f"{f.filename}:{f.lineno} {f.name}" for f in traceback.extract_tb(tb)]
        return json.dumps(out, default=str)


class RedactWarnings(logging.Filter):
    """Python warnings from pydicom/highdicom quote attribute values (a referring
    physician's name, say): keep the category and place, drop the text."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        text = str(args[0] if isinstance(args, tuple) and args else record.msg)
        first = text.strip().splitlines()[0] if text.strip() else ""
        # "path:line: Category: message" -> "path:line: Category"
        record.msg = ": ".join(first.split(": ")[:2]) + " (message withheld: may quote dataset values)"
        record.args = ()
        return True


class WithholdDatasetText(logging.Filter):
    """pydicom and highdicom log warnings that quote attribute values ("Invalid value for
    VR DA: '...'", a one-word referring physician): keep level and source, drop the text."""

    PREFIXES = ("pydicom", "highdicom")

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.split(".")[0] in self.PREFIXES:
            record.msg = f"{record.name}: message withheld (may quote dataset values)"
            record.args = ()
            record.exc_info = None
        return True


def configure(level: str = "INFO", fmt: str = "json") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(WithholdDatasetText())
    handler.setFormatter(
        JsonFormatter() if fmt == "json" else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    logging.getLogger("dicomweb_client").setLevel(logging.WARNING)  # an INFO line per request
    # dicomweb-client's retry library logs each failed request with a traceback; the outbox logs it once.
    logging.getLogger("retrying").setLevel(logging.ERROR)
    logging.getLogger("highdicom").setLevel(logging.WARNING)
    logging.captureWarnings(True)
    warnings_logger = logging.getLogger("py.warnings")
    warnings_logger.filters[:] = [RedactWarnings()]
