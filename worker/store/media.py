"""The image files beside the results database, and their retention.

Images are files under ``media_dir``, in one folder per day: an 8-bit PNG preview of the input
as the model saw it (windowed, long side :data:`PREVIEW_LONG_SIDE`) and the raw Grad-CAM grid as
``.npy`` (float16). Rows hold their paths relative to ``media_dir``; the retention sweep
deletes rows and files together (:meth:`worker.store.ResultStore.sweep`).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
from collections.abc import Iterable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np

from worker.store.schema import StoreError

logger = logging.getLogger(__name__)

#: Modes of what the store creates: patient data is for the service's own user only, whatever the
#: umask of whoever started it (systemd's UMask covers one way of starting it, not the others).
PRIVATE_DIR, PRIVATE_FILE = 0o700, 0o600


def private_dir(path: Path) -> Path:
    """Make ``path`` and each missing parent as 0700 (``Path.mkdir`` gives ``mode`` to the last only)."""
    path = Path(path)
    missing = []
    for p in (path, *path.parents):
        if p.is_dir():
            break
        missing.append(p)
    for p in reversed(missing):
        with contextlib.suppress(FileExistsError):
            p.mkdir(mode=PRIVATE_DIR)
        with contextlib.suppress(OSError):  # umask-independent; someone else's folder is left as it is
            p.chmod(PRIVATE_DIR)
    return path


def write_private(path: Path, data: bytes) -> None:
    """Write a new file readable by its owner only (0600 from its creation, not chmod-ed after)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, PRIVATE_FILE)
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), PRIVATE_FILE)  # an existing file keeps its mode through O_CREAT
        f.write(data)


#: Long side of the stored preview: enough to read a chest film on a screen, small to store.
PREVIEW_LONG_SIDE = 1024


def preview_of(unit_image: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """The stored preview: 8-bit, long side at most PREVIEW_LONG_SIDE (never upscaled).

    A uint8 image (the worker's ``Result.unit_image``, the SC's 0-255 display image) is
    resized as it is and never scaled; one that already fits is returned unchanged (the
    recorder makes the preview on the worker's thread and hands it over). A float unit
    image in [0, 1] (the store's own callers and tests) becomes 0-255.
    """
    import cv2

    img: np.ndarray[Any, Any] = np.asarray(unit_image)
    is_uint8 = img.dtype == np.uint8
    if not is_uint8:
        img = np.asarray(img, np.float32)
    rows, cols = img.shape[:2]
    if max(rows, cols) > PREVIEW_LONG_SIDE:
        f = PREVIEW_LONG_SIDE / max(rows, cols)
        img = cv2.resize(img, (max(1, round(cols * f)), max(1, round(rows * f))), interpolation=cv2.INTER_AREA)
    if is_uint8:
        return img
    return np.clip(img * 255.0 + 0.5, 0, 255).astype(np.uint8)


class MediaFiles:
    """The preview and Grad-CAM grid files of recorded results, one folder per day.

    Args:
        root: The media folder (created when missing).
    """

    def __init__(self, root: Path) -> None:
        self.root = private_dir(Path(root))
        with contextlib.suppress(OSError):
            self.root.chmod(PRIVATE_DIR)

    def write(self, stem: str, day: datetime, preview: np.ndarray[Any, Any],
              gradcam: np.ndarray[Any, Any]) -> tuple[str, str]:
        """Write one result's preview (PNG) and grid (float16 ``.npy``) into ``day``'s folder.

        Returns:
            Their paths relative to the media folder, as the result's row keeps them.
        """
        import cv2

        folder = Path(day.strftime("%Y/%m/%d"))
        preview_rel, grid_rel = folder / f"{stem}.png", folder / f"{stem}.npy"
        private_dir(self.root / folder)
        # Level 1: a few ms for 1024 px; higher levels save little on radiographs and cost 5x.
        ok, png = cv2.imencode(".png", preview, [cv2.IMWRITE_PNG_COMPRESSION, 1])
        if not ok:
            raise StoreError(f"cannot encode preview {self.root / preview_rel}")
        write_private(self.root / preview_rel, png.tobytes())
        grid = io.BytesIO()
        np.save(grid, np.nan_to_num(np.asarray(gradcam, np.float32)).astype(np.float16))
        write_private(self.root / grid_rel, grid.getvalue())
        return preview_rel.as_posix(), grid_rel.as_posix()

    def path(self, rel: str) -> Path:
        return self.root / rel

    def grid(self, rel: str) -> np.ndarray[Any, Any]:
        """A stored Grad-CAM grid as float32."""
        return np.load(self.root / rel).astype(np.float32)

    def remove(self, rels: Iterable[str]) -> None:
        for rel in rels:
            (self.root / rel).unlink(missing_ok=True)

    def sweep(self, cutoff: datetime, now: datetime) -> None:
        """Delete image files older than ``cutoff`` that no row names any more (left by a crash
        between a row's deletion and its files'), then the day folders left empty."""
        stamp = cutoff.timestamp()
        for path in self.root.rglob("*"):
            if path.is_file() and path.suffix in (".png", ".npy") and path.stat().st_mtime < stamp:
                path.unlink(missing_ok=True)
        # The recorder makes the day's folder, then writes into it: today's (and, for a record
        # begun just before midnight, yesterday's) folder stays even when empty.
        days = [self.root / (now - timedelta(days=d)).strftime("%Y/%m/%d") for d in (0, 1)]
        keep = {folder for day in days for folder in (day, day.parent, day.parent.parent)}
        for folder in sorted((p for p in self.root.rglob("*") if p.is_dir()), reverse=True):
            if folder not in keep:
                with contextlib.suppress(OSError):
                    folder.rmdir()  # only empty day folders go
