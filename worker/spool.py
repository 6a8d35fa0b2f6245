"""A durable on-disk queue: every state is a folder, every move an atomic rename.

``incoming/``  receive temp files (swept at start: a crash mid-association)
``queue/``     acknowledged instances waiting for processing
``work/``      claimed by the processor; moved back to queue/ at start
``quarantine/``inputs that cannot be processed, with a ``.reason`` file
``outbox/<destination>/`` results waiting to be sent, each with a ``.json`` state file
``dead/``      results given up on, with their state file
``done/``      one empty marker per processed input (input UID + model version)

File names are our own UUIDs or hashes, never values from a dataset.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from pathlib import Path

FOLDERS = ("incoming", "queue", "work", "quarantine", "outbox", "dead", "done")


def fsync(path: Path) -> None:
    """Flush a file's data, or make a rename inside a folder durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def key(*parts: str) -> str:
    """A file-name-safe key derived from dataset values (never the values themselves)."""
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()[:32]


class Spool:
    """The worker's folders under one root."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.incoming = self.root / "incoming"
        self.queue = self.root / "queue"
        self.work = self.root / "work"
        self.quarantined = self.root / "quarantine"
        self.outbox = self.root / "outbox"
        self.dead = self.root / "dead"
        self.done = self.root / "done"
        for name in FOLDERS:
            (self.root / name).mkdir(parents=True, exist_ok=True)

    def recover(self) -> tuple[int, int]:
        """At start: drop partial receives, requeue claimed work.

        Returns:
            (temp files removed, instances requeued).
        """
        swept = 0
        for p in self.incoming.iterdir():
            p.unlink(missing_ok=True)
            swept += 1
        requeued = 0
        for p in sorted(self.work.iterdir()):
            os.replace(p, self.queue / p.name)
            requeued += 1
        if requeued:
            fsync(self.queue)
        return swept, requeued

    def free_mb(self) -> float:
        return shutil.disk_usage(self.root).free / 2**20

    def accept(self, source: Path) -> Path:
        """Move a received file into the queue durably, under a new UUID name.

        The source is fsynced, then renamed (copied first when it lives on another
        file system), then the queue folder is fsynced: once this returns, a crash
        cannot lose the instance.
        """
        name = f"{uuid.uuid4().hex}.dcm"
        target = self.queue / name
        try:
            fsync(source)
            os.replace(source, target)
        except OSError:
            part = self.incoming / f"{name}.part"
            shutil.copyfile(source, part)
            fsync(part)
            os.replace(part, target)
        fsync(self.queue)
        return target

    def claim(self, limit: int) -> list[Path]:
        """Move up to ``limit`` queued files (oldest first) into work/."""
        queued = sorted(self.queue.iterdir(), key=lambda p: p.stat().st_mtime_ns)[:limit]
        claimed = []
        for p in queued:
            target = self.work / p.name
            try:
                os.replace(p, target)
            except FileNotFoundError:
                continue
            claimed.append(target)
        return claimed

    def quarantine(self, path: Path, reason: str) -> Path:
        """Move a file that cannot be processed aside, with a ``.reason`` beside it."""
        target = self.quarantined / path.name
        os.replace(path, target)
        target.with_suffix(".reason").write_text(reason + "\n", encoding="utf-8")
        return target

    def is_done(self, marker: str) -> bool:
        return (self.done / marker).exists()

    def mark_done(self, marker: str) -> None:
        (self.done / marker).touch()

    def depth(self) -> int:
        return sum(1 for _ in self.queue.iterdir()) + sum(1 for _ in self.work.iterdir())
