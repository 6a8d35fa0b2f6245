"""The spool and the outbox keep an in-memory index: draining the queue and finding due
results costs the same per instance whatever the queue's length (counted in file-system
calls, not timed), and what a crash or a full disk leaves half-written is removed at start."""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from worker.config import SendSection
from worker.send import Outbox, destination_key
from worker.spool import Spool


@pytest.fixture
def fs_calls(monkeypatch: pytest.MonkeyPatch) -> Iterator[Counter[str]]:
    """Counts folder listings, stats and file reads made through os and pathlib."""
    calls: Counter[str] = Counter()

    def counting(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            calls[name] += 1
            return fn(*args, **kwargs)
        return wrapper

    for name in ("listdir", "scandir", "stat"):
        monkeypatch.setattr(os, name, counting(name, getattr(os, name)))
    monkeypatch.setattr(Path, "iterdir", counting("iterdir", Path.iterdir))
    monkeypatch.setattr(Path, "read_text", counting("read_text", Path.read_text))
    yield calls


def fill(spool: Spool, n: int) -> None:
    for i in range(n):
        source = spool.incoming / f"in-{i}"
        source.write_bytes(b"x")
        spool.accept(source)


def drain(spool: Spool) -> int:
    drained = 0
    while batch := spool.claim(8):
        for path in batch:
            spool.finish(path)
        drained += len(batch)
    return drained


@pytest.mark.parametrize("n", [100, 1000])
def test_draining_the_queue_lists_and_stats_nothing(tmp_path: Path, fs_calls: Counter[str], n: int) -> None:
    spool = Spool(tmp_path / "spool")
    fill(spool, n)
    fs_calls.clear()
    assert drain(spool) == n
    assert fs_calls["listdir"] == fs_calls["scandir"] == fs_calls["iterdir"] == 0
    assert fs_calls["stat"] <= 2 * n  # at most a constant per instance (pathlib's unlink may stat)
    assert not any((spool.root / "queue").iterdir()) and not any((spool.root / "work").iterdir())


def test_the_queue_drains_in_arrival_order_across_a_restart(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    fill(spool, 20)
    order = [p.name for p in sorted((spool.root / "queue").iterdir())]
    first = spool.claim(3)
    restarted = Spool(tmp_path / "spool")  # the index is rebuilt from the folders
    assert restarted.recover() == (0, 3)
    assert [p.name for p in first] == order[:3]
    claimed = []
    while batch := restarted.claim(8):
        claimed += [p.name for p in batch]
        for p in batch:
            restarted.finish(p)
    assert claimed == order


def test_an_instance_in_work_at_a_crash_is_counted_and_claimed_alone(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    fill(spool, 3)
    assert len(spool.claim(8)) == 3
    for crash in (1, 2):
        spool = Spool(tmp_path / "spool")
        spool.recover()
        suspect = spool.claim(8)
        assert len(suspect) == 1 and spool.crashes_of(suspect[0]) == crash  # durable across restarts
        if crash == 1:  # the two batched with it are claimed alone too, and finish
            for _ in range(2):
                [innocent] = spool.claim(8)
                spool.finish(innocent)
    spool.quarantine(suspect[0], "poison")
    assert not any((spool.root / "crashes").iterdir())  # the count goes with its outcome
    assert spool.depth() == 0


def test_running_out_of_memory_counts_like_a_crash(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    fill(spool, 2)
    batch = spool.claim(8)
    spool.requeue(batch)  # an ONNX Runtime or disk fault: not the input's
    assert [spool.crashes_of(p) for p in batch] == [0, 0]
    batch = spool.claim(8)
    spool.requeue(batch, suspect=True)
    assert [spool.crashes_of(p) for p in batch] == [1, 1]
    spool = Spool(tmp_path / "spool")
    assert spool.claim(8, suspects=False) == []  # topping up a batch never takes a suspect
    assert len(spool.claim(8)) == 1


def test_done_markers_are_pruned_after_their_age(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    spool.mark_done("old")
    spool.mark_done("new")
    past = time.time() - 10 * 86400
    os.utime(spool.done / "old", (past, past))
    assert spool.prune_done(7 * 86400) == 1
    assert not spool.is_done("old") and spool.is_done("new")


def make_outbox(tmp_path: Path) -> Outbox:
    settings = SendSection(destinations=["PACS@127.0.0.1:1"])
    return Outbox(Spool(tmp_path / "spool"), settings, "CXR-GRADCAM")


@pytest.mark.parametrize("n", [100, 1000])
def test_finding_due_results_reads_no_state_file(tmp_path: Path, fs_calls: Counter[str], n: int) -> None:
    outbox = make_outbox(tmp_path)
    for i in range(n):
        outbox.put(f"{i:032x}", b"result", f"1.2.3.{i}")
    now = time.time()
    fs_calls.clear()
    for _ in range(50):  # about a minute of the sending loop with nothing due
        assert outbox.due(now - 3600) == {}
    assert sum(fs_calls.values()) == 0
    due = outbox.due(now + 1, batch=32)
    assert len(next(iter(due.values()))) == 32
    assert sum(fs_calls.values()) == 0
    fs_calls.clear()
    restarted = make_outbox(tmp_path)  # at start every state is read once
    assert fs_calls["read_text"] == n and restarted.depth() == n


def test_half_written_outbox_files_are_removed_at_start(tmp_path: Path) -> None:
    outbox = make_outbox(tmp_path)
    outbox.put("a" * 32, b"complete", "1.2.3")
    folder = outbox.spool.outbox / destination_key(outbox.settings.destinations[0])
    (folder / f"{'b' * 32}.part").write_bytes(b"half")  # a write cut by a full disk
    (folder / f"{'c' * 32}.dcm").write_bytes(b"no state")  # a crash between result and state
    (folder / f"{'d' * 32}.json.tmp").write_text("{")
    restarted = make_outbox(tmp_path)
    assert restarted.partial_files_removed == 3
    assert sorted(p.name for p in folder.iterdir()) == [f"{'a' * 32}.dcm", f"{'a' * 32}.json"]
    assert restarted.depth() == 1
    assert json.loads((folder / f"{'a' * 32}.json").read_text())["sop_instance_uid"] == "1.2.3"


def test_quarantined_and_dead_files_are_deleted_after_their_retention(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    old_q, new_q = spool.quarantined / "a.dcm", spool.quarantined / "b.dcm"
    old_d = spool.dead / "dest" / "c.dcm"
    old_d.parent.mkdir()
    for p in (old_q, new_q, old_d, spool.queue / "queued.dcm"):
        p.write_bytes(b"DICM with PHI")
    now = time.time()
    assert spool.prune_kept(older_than_s=3600, now=now + 10) == 0  # nothing is an hour old yet
    assert spool.prune_kept(older_than_s=3600, now=now + 7200) == 3
    assert not old_q.exists() and not new_q.exists() and not old_d.parent.exists()
    assert (spool.queue / "queued.dcm").exists() and spool.quarantined.is_dir() and spool.dead.is_dir()


def test_readiness_answers_false_when_the_spool_volume_is_gone(tmp_path: Path) -> None:
    """A load balancer or Kubernetes reads /readyz to take a replica out of rotation: with its
    spool's volume gone the checks must say so, not raise (a dropped probe connection)."""
    from worker.config import Settings
    from worker.health import readiness
    from worker.receive import Receiver

    spool = Spool(tmp_path / "spool")
    receiver = Receiver(Settings(spool={"dir": tmp_path / "spool", "reserve_mb": 0}), spool, lambda: None)
    assert readiness(spool, receiver.room_for_a_data_set(), True, True) == dict.fromkeys(
        ("model_answered", "spool_writable", "disk_above_reserve", "threads_alive"), True)
    (tmp_path / "spool").rename(tmp_path / "elsewhere")
    checks = readiness(spool, receiver.room_for_a_data_set(), True, True)
    assert checks["spool_writable"] is False and checks["disk_above_reserve"] is False
