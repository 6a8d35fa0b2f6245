"""``cxr-worker feedback export``: readers' labels and the images they judged, de-identified.

Reads every result that has reader feedback from the results store (:mod:`worker.store`),
each reader's current answer only, and the image the reader saw: the store's preview (the
input windowed as the model saw it, long side 1024 px). A preview the retention sweep
already deleted is named (by result number) and skipped; its row went with it in the same
sweep, so this only happens when the sweep ran between the query and the read.

De-identification: the folder (:mod:`cxr_contract.feedback`) holds no name, patient ID,
UID, accession number, birth date, study date or comment, and each label's time only to the
month. The folder and its files are created 0700/0600. Patients, images and readers
are HMAC-SHA256 pseudonyms under a site key (``feedback.pseudonym_key_file``, created with
mode 0600 on first use): the same patient gets the same key in every export, so the
trainer can split by patient, and nobody without the key can compute it from an ID.
"""

from __future__ import annotations

import contextlib
import getpass
import logging
import os
import secrets
import stat
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import cv2

from cxr_contract.feedback import (
    MIN_KEY_BYTES,
    ExportWriter,
    FeedbackFormatError,
    FeedbackLabel,
    check_new_folder,
    key_fingerprint,
    pseudonym,
)
from worker.config import Settings
from worker.errors import ConfigError, WorkerError
from worker.store import ResultStore, StoreError

logger = logging.getLogger(__name__)

#: PS3.15 A.5.3.5 Export: data leaves the system on media (here: a folder).
EXPORT_EVENT = ("110106", "Export")


class FeedbackExportError(WorkerError):
    """The export could not be written."""


@dataclass
class ExportReport:
    out: Path
    results: int = 0
    labels: int = 0
    images: int = 0
    key_fingerprint: str = ""
    #: One line per result skipped, naming it by its store number (no PHI).
    skipped: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"out": str(self.out), "results": self.results, "labels": self.labels, "images": self.images,
                "skipped": len(self.skipped), "key_fingerprint": self.key_fingerprint}


def key_file(settings: Settings) -> Path:
    """The pseudonym key's file: the configured one, or beside the spool."""
    return settings.feedback.pseudonym_key_file or Path(settings.spool.dir) / "feedback-pseudonym.key"


def load_or_create_key(path: Path) -> bytes:
    """The site's pseudonym key (hex in a text file); a new random one, mode 0600, when missing.

    Raises:
        ConfigError: the file is unreadable or holds no key of at least 16 bytes.
    """
    path = Path(path)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            # O_EXCL: two exports starting at once cannot each write a different key.
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass
        else:
            with os.fdopen(fd, "w", encoding="ascii") as f:
                f.write(secrets.token_hex(32) + "\n")
            logger.info("feedback pseudonym key created", extra={"path": str(path)})
    try:
        text = path.read_text(encoding="ascii").strip()
        key = bytes.fromhex(text)
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ConfigError(f"feedback.pseudonym_key_file {path}: not a hex key ({type(exc).__name__})") from None
    if len(key) < MIN_KEY_BYTES:
        raise ConfigError(f"feedback.pseudonym_key_file {path}: key has {len(key)} bytes, at least "
                          f"{MIN_KEY_BYTES} are needed")
    if path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        logger.warning("feedback pseudonym key is readable by others: chmod 600 it",
                       extra={"path": str(path)})
    return key


def parse_since(text: str) -> datetime:
    """``--since``: a date (UTC midnight) or an ISO date-time (UTC when it names no zone)."""
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise ConfigError(f"--since must be a date (2026-01-31) or an ISO date-time, received {text!r}") from None
    if len(text) == 10:
        value = datetime.combine(date.fromisoformat(text), datetime.min.time())
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def export_feedback(store: ResultStore, out: Path, key: bytes, since: datetime | None = None) -> ExportReport:
    """Write the feedback folder ``out`` from the store (see the module docstring).

    Raises:
        FeedbackExportError: ``out`` is not empty or a value breaks the format.
        StoreError: the database cannot be read.
    """
    try:
        writer = ExportWriter(out, key)
    except FeedbackFormatError as exc:
        raise FeedbackExportError(str(exc)) from None
    report = ExportReport(Path(out), key_fingerprint=key_fingerprint(key))
    for reviewed in store.results_with_feedback(since):
        r = reviewed.result
        if not reviewed.feedback:
            continue
        pixels = cv2.imread(str(reviewed.preview_path), cv2.IMREAD_GRAYSCALE)
        if pixels is None:
            report.skipped.append(f"result {r.id}: preview {reviewed.preview_path.name} is gone "
                                  "(deleted by the retention sweep?): skipped")
            continue
        # Prefixes keep the three kinds of pseudonym apart. A result without a patient ID is
        # split as a patient of its own study, the finest grouping that is still safe.
        patient = f"patient:{r.patient_id}" if r.patient_id else f"study:{r.study_instance_uid}"
        # The image is the SOP instance: two model versions' results on it are one image.
        image_key = pseudonym(f"image:{r.sop_instance_uid}", key)
        try:
            writer.add_image(image_key, pixels)
            for fb in reviewed.feedback:
                writer.add(FeedbackLabel(
                    patient_key=pseudonym(patient, key), image_key=image_key,
                    reader=pseudonym(f"reader:{fb.user.name}", key), label=fb.label, agree=fb.agree,
                    model_version=r.model_version, model_probability=float(r.probability),
                    recorded_at=_month_of(fb.created_at)))
                report.labels += 1
        except FeedbackFormatError as exc:
            raise FeedbackExportError(f"result {r.id}: {exc}") from None
        report.results += 1
    report.images = writer.close().images
    return report


def _month_of(when: datetime) -> datetime:
    """When a label was given, to the month: the exact time is, in practice, a date of care."""
    return when.astimezone(UTC).replace(day=1, hour=0, minute=0, second=0, microsecond=0)


def run_export(settings: Settings, out: Path, since: datetime | None = None) -> ExportReport:
    """``cxr-worker feedback export``: open the store of ``settings``, export, audit."""
    try:
        check_new_folder(Path(out))  # before the key or the database are touched
    except FeedbackFormatError as exc:
        raise FeedbackExportError(str(exc)) from None
    key = load_or_create_key(key_file(settings))
    store = ResultStore(settings.dashboard.store_url(settings.spool.dir),
                        settings.dashboard.store_media(settings.spool.dir))
    # Pseudonymous is not anonymous: the folder and its files are for the exporting user only.
    umask = os.umask(0o077)
    try:
        report = export_feedback(store, out, key, since)
        with contextlib.suppress(OSError):
            Path(out).chmod(0o700)  # it may have existed, empty, before the export
    finally:
        os.umask(umask)
        store.close()
    _audit(settings, report)
    return report


def _audit(settings: Settings, report: ExportReport) -> None:
    """One PS3.15 Export record: who exported how many de-identified labels, where."""
    from worker.audit import AuditTrail
    from worker.status import AuditOutcome

    trail = AuditTrail(settings.audit.path, settings.dicom.ae_title)
    # AuditTrail has no export method of its own yet; _write is its one record builder.
    trail._write(EXPORT_EVENT, "R", AuditOutcome.SUCCESS,
                 [{"UserID": getpass.getuser(), "UserIsRequestor": True},
                  {"UserID": str(report.out.resolve()), "UserIsRequestor": False, "NetworkAccessPointID": "local"}],
                 detail=f"feedback export: {report.labels} de-identified labels on {report.images} images "
                        f"from {report.results} results (key {report.key_fingerprint})")


__all__ = ["ExportReport", "FeedbackExportError", "StoreError", "export_feedback", "load_or_create_key",
           "parse_since", "run_export"]
