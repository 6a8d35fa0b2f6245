"""The feedback export: readers' labels with the images they judged, de-identified.

``cxr-worker feedback export`` writes one folder, ``cxr-train prepare --feedback`` reads it::

    DIR/
      manifest.json   {"format": "cxr-gradcam-feedback", "format_version": 1, "created": UTC,
                       "labels": N, "images": M, "key_fingerprint": hex}
      labels.csv      one row per reader label, columns :data:`COLUMNS`
      images/         <image_key>.png: 8-bit grayscale, the image as the reader saw it
                      (windowed like the model input)

Patients, images and readers appear only as pseudonyms: ``HMAC-SHA256(key, value)``,
truncated. The key stays with the hospital; the manifest names its fingerprint (a hash
of the key, never the key) so that exports made with different keys, whose patient keys
cannot be matched, are told apart. Nothing here imports TensorFlow or ONNX Runtime.
"""

from __future__ import annotations

import csv
import hashlib
import hmac
import io
import json
import math
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import cv2
import numpy as np

FORMAT = "cxr-gradcam-feedback"
FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
LABELS_FILE = "labels.csv"
IMAGES_DIR = "images"

#: A reader's own label, as the dashboard records it.
PNEUMONIA, NO_PNEUMONIA, UNCERTAIN = "pneumonia", "no_pneumonia", "uncertain"
READER_LABELS = (PNEUMONIA, NO_PNEUMONIA, UNCERTAIN)

COLUMNS = ("image", "patient_key", "image_key", "reader", "label", "agree", "model_version",
           "model_probability", "recorded_at")

#: Hex digits kept of the HMAC: 80 bits, so no two of a site's patients share a key in practice.
PSEUDONYM_HEX = 20
_KEY_RE = re.compile(rf"^[0-9a-f]{{{PSEUDONYM_HEX}}}$")
#: Keys shorter than this are refused: a guessable key would let anyone re-identify by
#: hashing candidate patient IDs.
MIN_KEY_BYTES = 16


class FeedbackFormatError(ValueError):
    """A feedback folder (or a value written into one) breaks the format; the message names
    the file and, for labels.csv, the row."""


def pseudonym(value: str, key: bytes) -> str:
    """The pseudonym of ``value`` under ``key``: HMAC-SHA256, the first :data:`PSEUDONYM_HEX` hex digits.

    The same value and key give the same pseudonym in every export; without the key it
    cannot be computed from a guessed value.
    """
    if len(key) < MIN_KEY_BYTES:
        raise FeedbackFormatError(f"pseudonym key must be at least {MIN_KEY_BYTES} bytes, received {len(key)}")
    return hmac.new(key, value.encode("utf-8"), hashlib.sha256).hexdigest()[:PSEUDONYM_HEX]


def key_fingerprint(key: bytes) -> str:
    """A hash that identifies ``key`` without revealing it (for the manifest)."""
    return hashlib.sha256(b"cxr-gradcam-feedback-key\x00" + key).hexdigest()[:16]


#: A cell starting with one of these is a formula to a spreadsheet (CSV injection): written with a
#: leading apostrophe, which spreadsheets show as text and the reader here removes again.
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def _inert(value: str) -> str:
    return "'" + value if value.startswith(_FORMULA_START) or value.startswith("'") else value


def _uninert(value: str) -> str:
    return value[1:] if value.startswith("'") else value


@dataclass(frozen=True)
class FeedbackLabel:
    """One reader's label of one image (a row of labels.csv)."""

    patient_key: str
    image_key: str
    reader: str
    label: str
    agree: bool
    model_version: str
    model_probability: float
    recorded_at: datetime
    #: The image file, relative to the folder; "" until written.
    image: str = ""

    def row(self) -> dict[str, str]:
        return {"image": self.image or image_path(self.image_key), "patient_key": self.patient_key,
                "image_key": self.image_key, "reader": self.reader, "label": self.label,
                "agree": "yes" if self.agree else "no", "model_version": _inert(self.model_version),
                "model_probability": f"{self.model_probability:.6g}",
                "recorded_at": self.recorded_at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")}


@dataclass(frozen=True)
class Manifest:
    format_version: int
    created: datetime
    labels: int
    images: int
    key_fingerprint: str


@dataclass(frozen=True)
class FeedbackExport:
    """A feedback folder read and checked by :func:`read_export`."""

    root: Path
    manifest: Manifest
    labels: list[FeedbackLabel]

    def image_file(self, label: FeedbackLabel) -> Path:
        return self.root / label.image


def image_path(image_key: str) -> str:
    """Where the image of ``image_key`` lies, relative to the folder."""
    return f"{IMAGES_DIR}/{image_key}.png"


def check_new_folder(out: Path) -> None:
    """Refuse an export folder that holds something already: two exports never mix."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FeedbackFormatError(f"{out}: exists and is not an empty folder; feedback exports never mix")


class ExportWriter:
    """Writes a feedback folder one image at a time, so memory holds one image, not the export.

    The manifest is written last, by :meth:`close`: a folder an interrupted export left
    behind has none, and :func:`read_export` refuses it.

    Args:
        out: The folder; it must not exist or be empty, so that two exports never mix.
        key: The pseudonym key; only its fingerprint is written.

    Raises:
        FeedbackFormatError: ``out`` holds something already.
    """

    def __init__(self, out: Path, key: bytes) -> None:
        self.out = Path(out)
        self.fingerprint = key_fingerprint(key)
        check_new_folder(self.out)
        self._images: set[str] = set()
        self._rows: list[FeedbackLabel] = []

    def add_image(self, image_key: str, pixels: np.ndarray[Any, Any]) -> None:
        """Write the image of ``image_key`` (2-D uint8), once."""
        if not _KEY_RE.match(image_key):
            raise FeedbackFormatError(f"image key must be {PSEUDONYM_HEX} hex digits, received {image_key!r}")
        a = np.asarray(pixels)
        if a.ndim != 2 or a.dtype != np.uint8:
            raise FeedbackFormatError(f"image {image_key}: must be 2-D uint8, received {a.dtype} {a.shape}")
        if image_key in self._images:
            return
        (self.out / IMAGES_DIR).mkdir(parents=True, exist_ok=True)
        # cv2 writes no text chunks: the PNG carries pixels only.
        if not cv2.imwrite(str(self.out / image_path(image_key)), a):
            raise FeedbackFormatError(f"{self.out / image_path(image_key)}: could not be written")
        self._images.add(image_key)

    def add(self, label: FeedbackLabel) -> None:
        """Add one row; its image must have been added."""
        where = f"{LABELS_FILE}:{len(self._rows) + 2}"
        _check_label(label, where)
        if label.image_key not in self._images:
            raise FeedbackFormatError(f"{where}: no image given for image_key {label.image_key}")
        self._rows.append(label)

    def close(self, created: datetime | None = None) -> Manifest:
        """Write labels.csv and, last, manifest.json."""
        self.out.mkdir(parents=True, exist_ok=True)
        with open(self.out / LABELS_FILE, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=COLUMNS)
            writer.writeheader()
            writer.writerows(lab.row() for lab in self._rows)
        manifest = Manifest(FORMAT_VERSION, (created or datetime.now(UTC)).astimezone(UTC), len(self._rows),
                            len(self._images), self.fingerprint)
        (self.out / MANIFEST_FILE).write_text(json.dumps({
            "format": FORMAT, "format_version": manifest.format_version,
            "created": manifest.created.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "labels": manifest.labels, "images": manifest.images, "key_fingerprint": manifest.key_fingerprint,
        }, indent=2) + "\n", encoding="utf-8")
        return manifest


def write_export(out: Path, labels: Iterable[FeedbackLabel], images: Mapping[str, np.ndarray[Any, Any]],
                 key: bytes, *, created: datetime | None = None) -> Manifest:
    """Write a feedback folder from labels and their images (image key -> 2-D uint8) at once.

    Raises:
        FeedbackFormatError: a bad value, named, before anything is written.
    """
    rows = list(labels)
    for n, lab in enumerate(rows, start=2):
        _check_label(lab, f"{LABELS_FILE}:{n}")
        if lab.image_key not in images:
            raise FeedbackFormatError(f"{LABELS_FILE}:{n}: no image given for image_key {lab.image_key}")
    for image_key, arr in images.items():
        a = np.asarray(arr)
        if not _KEY_RE.match(image_key) or a.ndim != 2 or a.dtype != np.uint8:
            raise FeedbackFormatError(f"image {image_key!r}: the key must be {PSEUDONYM_HEX} hex digits and the "
                                      f"pixels 2-D uint8, received {a.dtype} {a.shape}")
    writer = ExportWriter(out, key)
    for image_key, arr in images.items():
        writer.add_image(image_key, arr)
    for lab in rows:
        writer.add(lab)
    return writer.close(created)


def read_export(folder: Path) -> FeedbackExport:
    """Read and check a feedback folder.

    Raises:
        FeedbackFormatError: the first problem, naming the file (and row of labels.csv).
    """
    root = Path(folder)
    if not root.is_dir():
        raise FeedbackFormatError(f"{root}: feedback folder not found")
    manifest = _read_manifest(root / MANIFEST_FILE)
    path = root / LABELS_FILE
    if not path.is_file():
        raise FeedbackFormatError(f"{path}: missing")
    labels: list[FeedbackLabel] = []
    text = _read_utf8(path)
    pulled = 0  # lines the csv reader has taken; its own line_num can lag behind on an error

    def lines() -> Iterator[str]:
        nonlocal pulled
        for line in io.StringIO(text, newline=""):
            pulled += 1
            yield line

    reader = csv.DictReader(lines())
    try:
        missing = [c for c in COLUMNS if c not in (reader.fieldnames or ())]
        if missing:
            raise FeedbackFormatError(f"{path}:1: missing column(s) {', '.join(missing)}")
        for n, row in enumerate(reader, start=2):
            where = f"{path}:{n}"
            if None in row or any(row[c] is None for c in COLUMNS):
                raise FeedbackFormatError(f"{where}: expected {len(COLUMNS)} fields")
            lab = FeedbackLabel(
                patient_key=row["patient_key"], image_key=row["image_key"], reader=row["reader"],
                label=row["label"], agree=_parse_agree(row["agree"], where),
                model_version=_uninert(row["model_version"]),
                model_probability=_parse_probability(row["model_probability"], where),
                recorded_at=_parse_time(row["recorded_at"], where, "recorded_at"), image=row["image"],
            )
            _check_label(lab, where)
            if lab.image != image_path(lab.image_key):
                raise FeedbackFormatError(f"{where}: image must be {image_path(lab.image_key)!r}, "
                                          f"received {lab.image!r}")
            if not (root / lab.image).is_file():
                raise FeedbackFormatError(f"{where}: image file not found: {lab.image}")
            labels.append(lab)
    except csv.Error as exc:
        raise FeedbackFormatError(f"{path}:{pulled}: not valid CSV: {exc}") from None
    if len(labels) != manifest.labels:
        raise FeedbackFormatError(f"{path}: {len(labels)} label rows, the manifest says {manifest.labels}")
    return FeedbackExport(root, manifest, labels)


def _read_utf8(path: Path) -> str:
    """The text of ``path``; bytes that are not UTF-8 are named by line, not left to a traceback."""
    # Decoded whole rather than through a text stream: the stream decodes in chunks, so its
    # error cannot say which line holds the bad byte. labels.csv is one short row per label.
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise FeedbackFormatError(f"{path}:{line}: not UTF-8 (byte {raw[exc.start]:#04x} at offset "
                                  f"{exc.start})") from None


def _check_label(lab: FeedbackLabel, where: str) -> None:
    for name in ("patient_key", "image_key", "reader"):
        value = getattr(lab, name)
        if not _KEY_RE.match(value):
            raise FeedbackFormatError(f"{where}: {name} must be a pseudonym ({PSEUDONYM_HEX} hex digits), "
                                      f"received {value!r}")
    if lab.label not in READER_LABELS:
        raise FeedbackFormatError(f"{where}: label must be one of {', '.join(READER_LABELS)}, received {lab.label!r}")
    if not (math.isfinite(lab.model_probability) and 0.0 <= lab.model_probability <= 1.0):
        raise FeedbackFormatError(f"{where}: model_probability must be in [0, 1], received {lab.model_probability!r}")
    if lab.recorded_at.tzinfo is None:
        raise FeedbackFormatError(f"{where}: recorded_at must carry a time zone (UTC)")


def _parse_agree(text: str, where: str) -> bool:
    if text not in ("yes", "no"):
        raise FeedbackFormatError(f"{where}: agree must be yes or no, received {text!r}")
    return text == "yes"


def _parse_probability(text: str, where: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise FeedbackFormatError(f"{where}: model_probability is not a number, received {text!r}") from None


def _parse_time(text: str, where: str, name: str) -> datetime:
    try:
        value = datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ")
    except ValueError:
        raise FeedbackFormatError(f"{where}: {name} must be UTC as YYYY-MM-DDTHH:MM:SSZ, received {text!r}") from None
    return value.replace(tzinfo=UTC)


def _read_manifest(path: Path) -> Manifest:
    if not path.is_file():
        raise FeedbackFormatError(f"{path}: missing (not a feedback export folder)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise FeedbackFormatError(f"{path}: not valid JSON: {exc}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise FeedbackFormatError(f"{path}: format must be {FORMAT!r}")
    if data.get("format_version") != FORMAT_VERSION:
        raise FeedbackFormatError(f"{path}: format_version {data.get('format_version')!r} is not supported "
                                  f"(this reader knows {FORMAT_VERSION})")
    for name in ("labels", "images"):
        if not isinstance(data.get(name), int) or data[name] < 0:
            raise FeedbackFormatError(f"{path}: {name} must be a count, received {data.get(name)!r}")
    fp = data.get("key_fingerprint")
    if not isinstance(fp, str) or not re.fullmatch(r"[0-9a-f]{16}", fp):
        raise FeedbackFormatError(f"{path}: key_fingerprint must be 16 hex digits, received {fp!r}")
    created = _parse_time(str(data.get("created")), str(path), "created")
    return Manifest(FORMAT_VERSION, created, data["labels"], data["images"], fp)
