"""Several replicas behind one address: HAProxy (TCP round robin, a health check on each
worker's ``/readyz``) in front of two ``cxr-worker serve`` processes, each with its own spool,
one PACS (DCMTK storescp), four DCMTK senders. What a Kubernetes Service in front of the
StatefulSet in deploy/k8s does, with the real balancer of a non-Kubernetes site."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest

from tests.helpers import HAProxy, Storescp, free_port, http, metric, phantom_file, require_tool, wait_for, walk

pytestmark = pytest.mark.integration
SENDERS, PER_ROUND = 4, 3


@pytest.fixture
def replicas(make_worker: Any, tmp_path: Path) -> Iterator[tuple[Any, Any, HAProxy, Storescp]]:
    """Replicas ``a`` and ``b`` and the balancer in front; the PACS they send to, not started yet
    (a test starts it when the results may go out)."""
    pacs = Storescp(free_port(), tmp_path / "pacs")
    a, b = (make_worker([f"PACS@127.0.0.1:{pacs.port}"], metrics_port=free_port(), home=name) for name in "ab")
    lb = HAProxy(free_port(), {"a": (a.port, a.metrics_port), "b": (b.port, b.metrics_port)}, tmp_path / "lb")
    lb.start()
    lb.wait_status("a", "UP")
    lb.wait_status("b", "UP")
    yield a, b, lb, pacs
    lb.stop()
    pacs.stop()


def images(folder: Path, count: int, seed: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{seed + i}.dcm" for i in range(count)]
    for i, path in enumerate(paths):
        phantom_file(path, bool(i % 2), seed + i)
    return paths


def send(port: int, paths: list[Path], calling: str) -> None:
    """A modality: one association per image, and an image whose store was not confirmed is
    sent again (what every PACS-side sender does), so that a replica going away mid-run
    costs a resend, never an image."""
    storescu = require_tool("/usr/bin/storescu")
    for path in paths:
        for _ in range(20):
            out = subprocess.run([storescu, "-aet", calling, "-aec", "CXR-GRADCAM", "127.0.0.1", str(port), str(path)],
                                 capture_output=True, text=True, timeout=120)
            if out.returncode == 0:
                break
        else:
            raise AssertionError(f"{path.name} never confirmed: {out.stdout}{out.stderr}")


def send_all(port: int, batches: list[list[Path]]) -> None:
    """One sender per batch, all at once."""
    errors: list[BaseException] = []

    def run(paths: list[Path], calling: str) -> None:
        try:
            send(port, paths, calling)
        except BaseException as exc:  # re-raised in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(paths, f"MODALITY{i}")) for i, paths in enumerate(batches)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors


def answers_per_source(pacs: Storescp) -> Counter[tuple[str, str]]:
    """(source SOP Instance UID, "sc" or "sr") -> how many such objects the PACS holds."""
    counts: Counter[tuple[str, str]] = Counter()
    for ds in map(pydicom.dcmread, pacs.files()):
        if "SourceImageSequence" in ds:
            counts[str(ds.SourceImageSequence[0].ReferencedSOPInstanceUID), "sc"] += 1
        else:
            refs = {str(i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID) for i in walk(ds.ContentSequence)
                    if "ReferencedSOPSequence" in i
                    and i.ReferencedSOPSequence[0].ReferencedSOPClassUID != "1.2.840.10008.5.1.4.1.1.7"}
            [source] = refs
            counts[source, "sr"] += 1
    return counts


def received(worker: Any) -> float:
    return metric(http(worker.metrics_port, "/metrics")[1], "cxr_instances_received_total")


def held(spool: Path) -> int:
    """Instances and results a spool holds: queued, being processed, or waiting to be sent."""
    outbox = [p for p in (spool / "outbox").rglob("*") if p.is_file() and p.suffix != ".json"]
    return len(os.listdir(spool / "queue")) + len(os.listdir(spool / "work")) + len(outbox)


def test_replica_killed_and_restarted_loses_and_duplicates_nothing(replicas: Any, tmp_path: Path) -> None:
    a, b, lb, pacs = replicas
    first = [images(tmp_path / f"first{s}", PER_ROUND, 100 * s) for s in range(SENDERS)]
    second = [images(tmp_path / f"second{s}", PER_ROUND, 100 * s + 50) for s in range(SENDERS)]
    sources = {str(pydicom.dcmread(p).SOPInstanceUID) for batch in first + second for p in batch}

    # The PACS is not up yet: every acknowledged image stays in its replica's spool, so the
    # replica killed below certainly holds work nobody has answered.
    send_all(lb.port, first)
    assert received(a) > 0 and received(b) > 0, "round robin gave both replicas work"
    assert held(b.spool) > 0, "replica b holds work when it is killed"
    # Killed between associations: a kill inside one, after the instance is spooled and before
    # its C-STORE response, leaves the modality unconfirmed; it resends, and the other replica
    # answers again under the same deterministic UIDs (docs/operations.md).
    b.proc.send_signal(signal.SIGKILL)
    b.proc.wait(10)
    b.proc = None
    restarted = threading.Thread(target=b.start)  # back while the second round is on its way
    sending = threading.Thread(target=send_all, args=(lb.port, second))
    sending.start()
    restarted.start()
    sending.join(300)
    restarted.join(120)
    lb.wait_status("b", "UP")

    pacs.start()
    wait_for(lambda: len(pacs.files()) >= 2 * len(sources), 180, f"{2 * len(sources)} results at the PACS")
    wait_for(lambda: held(a.spool) == 0 and held(b.spool) == 0, 60, "both spools drained")
    counts = answers_per_source(pacs)
    assert set(counts) == {(uid, kind) for uid in sources for kind in ("sc", "sr")}, "every image answered"
    assert set(counts.values()) == {1}, "nothing answered twice"
    assert len(pacs.files()) == 2 * len(sources)


def test_replica_not_ready_is_taken_out_of_rotation(replicas: Any, tmp_path: Path) -> None:
    a, b, lb, pacs = replicas
    pacs.start()
    # The spool's volume gone (unmounted, detached): b can no longer accept an image.
    away = b.spool.with_name("spool-away")
    b.spool.rename(away)
    code, body = http(b.metrics_port, "/readyz")
    assert code == 503 and '"spool_writable": false' in body, body
    lb.wait_status("b", "DOWN")
    before = received(b)
    out = images(tmp_path / "out", SENDERS, 300)
    send_all(lb.port, [[p] for p in out])
    wait_for(lambda: received(a) >= len(out), 30, "replica a to take every image")
    assert received(b) == before

    away.rename(b.spool)
    lb.wait_status("b", "UP")
    back = images(tmp_path / "back", SENDERS, 400)
    send_all(lb.port, [[p] for p in back])
    wait_for(lambda: received(b) > before, 30, "replica b back in rotation")
    wait_for(lambda: len(pacs.files()) >= 2 * (len(out) + len(back)), 120, "every result at the PACS")
    assert len(pacs.files()) == 2 * (len(out) + len(back))
