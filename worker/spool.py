"""A durable on-disk queue: every state is a folder, every move an atomic rename.

``incoming/``  receive temp files (swept at start: a crash mid-association)
``queue/``     acknowledged instances waiting for processing
``work/``      claimed by the processor; moved back to queue/ at start
``crashes/``   one small file per instance that was in work/ when the worker died
``quarantine/``inputs that cannot be processed, with a ``.reason`` file
``outbox/<destination>/`` results waiting to be sent, each with a ``.json`` state file
``dead/``      results given up on, with their state file
``done/``      one empty marker per processed input (input UID + model version)

File names are our own, never values from a dataset. A queued file's name starts with
the time it was accepted (16 hex digits of nanoseconds), so the name alone orders the
queue: the folders are listed once at start into an in-memory index, and claiming a
batch never lists or stats a folder again.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import threading
import time
import uuid
from collections import deque
from pathlib import Path

FOLDERS = ("incoming", "queue", "work", "crashes", "quarantine", "outbox", "dead", "done")


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


def queue_name() -> str:
    """32 hex digits: acceptance time in ns, then randomness; sorts in arrival order."""
    return f"{time.time_ns():016x}{uuid.uuid4().hex[:16]}.dcm"


class Spool:
    """The worker's folders under one root, and the in-memory index of its queue."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.incoming = self.root / "incoming"
        self.queue = self.root / "queue"
        self.work = self.root / "work"
        self.crashes = self.root / "crashes"
        self.quarantined = self.root / "quarantine"
        self.outbox = self.root / "outbox"
        self.dead = self.root / "dead"
        self.done = self.root / "done"
        for name in FOLDERS:
            (self.root / name).mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._queued: deque[str] = deque(sorted(os.listdir(self.queue)))
        self._claimed: set[str] = set(os.listdir(self.work))
        self._crashes: dict[str, int] = {}
        for name in os.listdir(self.crashes):
            if name.endswith(".tmp"):  # a count being written when the worker died: the old one stands
                (self.crashes / name).unlink(missing_ok=True)
                continue
            try:
                self._crashes[name] = int((self.crashes / name).read_text() or 0)
            except (OSError, ValueError):
                self._crashes[name] = 1

    # -- start ----------------------------------------------------------------------
    def recover(self) -> tuple[int, int]:
        """At start: drop partial receives, requeue claimed work, count the crash.

        An instance still in work/ was being processed when the worker died: its crash
        count goes up by one, durably, before it is requeued (see :meth:`crashes_of`).

        Returns:
            (temp files removed, instances requeued).
        """
        swept = 0
        for name in os.listdir(self.incoming):
            (self.incoming / name).unlink(missing_ok=True)
            swept += 1
        with self._lock:
            requeued = sorted(self._claimed)
            for name in requeued:
                self._write_crashes(name, self._crashes.get(name, 0) + 1)
                os.replace(self.work / name, self.queue / name)
            self._claimed = set()
            self._queued = deque(sorted([*self._queued, *requeued]))
        if requeued:
            fsync(self.queue)
        return swept, len(requeued)

    def _write_crashes(self, name: str, count: int) -> None:
        tmp = self.crashes / f"{name}.tmp"
        tmp.write_text(str(count))
        fsync(tmp)
        os.replace(tmp, self.crashes / name)
        fsync(self.crashes)
        self._crashes[name] = count

    # -- receive --------------------------------------------------------------------
    def free_mb(self) -> float:
        return shutil.disk_usage(self.root).free / 2**20

    def writable(self) -> bool:
        """Whether a file can be created in the spool right now (readiness)."""
        probe = self.root / f".ready-{threading.get_ident()}"
        try:
            probe.write_bytes(b"")
            probe.unlink()
        except OSError:
            return False
        return True

    def accept(self, source: Path) -> Path:
        """Move a received file into the queue durably, under a new name.

        The source is fsynced, then renamed (copied first when it lives on another
        file system), then the queue folder is fsynced: once this returns, a crash
        cannot lose the instance.
        """
        name = queue_name()
        target = self.queue / name
        try:
            fsync(source)
            os.replace(source, target)
        except OSError:
            part = self.incoming / f"{name}.part"
            try:
                shutil.copyfile(source, part)
                fsync(part)
                os.replace(part, target)
            except OSError:
                part.unlink(missing_ok=True)
                raise
        fsync(self.queue)
        with self._lock:
            self._queued.append(name)
        return target

    # -- process --------------------------------------------------------------------
    def claim(self, limit: int, *, suspects: bool = True) -> list[Path]:
        """Move up to ``limit`` queued files (oldest first) into work/.

        An instance that was in work/ during a crash (a suspect) is claimed alone, so
        that a poison pill cannot take the instances batched with it down again.

        Args:
            suspects: False when topping up a batch already claimed: stop at a suspect.
        """
        claimed: list[Path] = []
        with self._lock:
            while self._queued and len(claimed) < limit:
                name = self._queued[0]
                if name in self._crashes and (claimed or not suspects):
                    break  # a suspect waits for a batch of its own
                self._queued.popleft()
                try:
                    os.replace(self.queue / name, self.work / name)
                except FileNotFoundError:
                    continue
                self._claimed.add(name)
                claimed.append(self.work / name)
                if name in self._crashes:
                    break
        return claimed

    def crashes_of(self, path: Path) -> int:
        """How many times the worker died while this instance was being processed."""
        return self._crashes.get(path.name, 0)

    def requeue(self, paths: list[Path], *, suspect: bool = False) -> None:
        """Put claimed files back at the head of the queue (an infrastructure fault).

        Args:
            suspect: count this attempt as a crash (the instances ran out of memory): each
                is then claimed alone, and quarantined at ``max_crashes`` by :meth:`recover`.
        """
        with self._lock:
            for path in reversed(paths):
                if path.name not in self._claimed:
                    continue
                if suspect:
                    self._write_crashes(path.name, self._crashes.get(path.name, 0) + 1)
                try:
                    os.replace(path, self.queue / path.name)
                except FileNotFoundError:
                    pass
                else:
                    self._queued.appendleft(path.name)
                self._claimed.discard(path.name)

    def finish(self, path: Path) -> None:
        """The claimed instance has its outcome (answered, skipped, duplicate): drop it."""
        path.unlink(missing_ok=True)
        self._forget(path.name)

    def quarantine(self, path: Path, reason: str) -> Path:
        """Move a file that cannot be processed aside, with a ``.reason`` beside it."""
        target = self.quarantined / path.name
        os.replace(path, target)
        target.with_suffix(".reason").write_text(reason + "\n", encoding="utf-8")
        self._forget(path.name)
        return target

    def _forget(self, name: str) -> None:
        with self._lock:
            self._claimed.discard(name)
            if self._crashes.pop(name, None) is not None:
                (self.crashes / name).unlink(missing_ok=True)

    def is_done(self, marker: str) -> bool:
        return (self.done / marker).exists()

    def mark_done(self, marker: str) -> None:
        (self.done / marker).touch()

    def prune_done(self, older_than_s: float, now: float | None = None) -> int:
        """Remove done/ markers older than ``older_than_s``; returns how many.

        After that age a resent instance is answered again: the markers only guard
        against the resends and restarts of the following hours.
        """
        cutoff = (time.time() if now is None else now) - older_than_s
        removed = 0
        with os.scandir(self.done) as entries:
            for entry in entries:
                try:
                    if entry.stat().st_mtime < cutoff:
                        os.unlink(entry.path)
                        removed += 1
                except FileNotFoundError:
                    continue
        return removed

    def prune_kept(self, older_than_s: float, now: float | None = None) -> int:
        """Delete files in quarantine/ and dead/ (whole DICOM files, with PHI) older than ``older_than_s``.

        Age counts from the move into the folder (the inode's change time: a rename sets it, while
        the modification time is still the receive's). Returns how many files went.
        """
        cutoff = (time.time() if now is None else now) - older_than_s
        removed = 0
        for folder in (self.quarantined, self.dead):
            for path in sorted(folder.rglob("*"), reverse=True):  # files before the folders holding them
                try:
                    if path.is_dir():
                        if path != folder and not any(path.iterdir()):
                            path.rmdir()
                    elif path.lstat().st_ctime < cutoff:
                        path.unlink()
                        removed += 1
                except (FileNotFoundError, OSError):
                    continue
        return removed

    def depth(self) -> int:
        with self._lock:
            return len(self._queued) + len(self._claimed)
