"""``processing.workers``: images answered by several processes, each with its own model, while
the service's process alone moves spool files. DCMTK storescu sends, storescp is the PACS."""

from __future__ import annotations

import os
import signal
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import pydicom
import pytest

from tests.helpers import free_port, http, logged, metric, phantom_file, storescu, wait_for

pytestmark = pytest.mark.integration


def answer_processes(pid: int) -> list[int]:
    """The worker's answer processes: its children started by multiprocessing's spawn."""
    children: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        children += [int(c) for c in (task / "children").read_text().split()]
    return [c for c in children if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes()]


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_answer_processes_killed_lose_nothing_and_answer_nothing_twice(make_worker: Any, pacs: Any,
                                                                       tmp_path: Path) -> None:
    worker = make_worker([f"PACS@127.0.0.1:{pacs.port}"], metrics_port=free_port(),
                         extra="[processing]\nworkers = 2\n")
    answering = answer_processes(worker.proc.pid)
    assert len(answering) == 2
    folders = []
    for s in range(2):
        folder = tmp_path / f"sender{s}"
        folder.mkdir()
        for i in range(6):
            phantom_file(folder / f"{i}.dcm", bool(i % 2), 10 * s + i)
        folders.append(folder)
    sources = {str(pydicom.dcmread(p).SOPInstanceUID) for f in folders for p in f.iterdir()}
    phantom_file(folders[0] / "lateral.dcm", True, 99, view="LL")  # not selected: skipped, not answered
    senders = [threading.Thread(target=storescu, args=(worker.port, sorted(f.iterdir()))) for f in folders]
    for t in senders:
        t.start()
    # Both answer processes die while a batch is claimed (in work/): one of them holds it.
    wait_for(lambda: bool(os.listdir(worker.spool / "work")), 60, "a batch being answered", interval=0.02)
    for pid in answering:
        os.kill(pid, signal.SIGKILL)
    for t in senders:
        t.join(120)

    wait_for(lambda: len(pacs.files()) >= 2 * len(sources), 180, f"{2 * len(sources)} results at the PACS")
    refs = Counter(str(ds.SourceImageSequence[0].ReferencedSOPInstanceUID)
                   for ds in map(pydicom.dcmread, pacs.files()) if "SourceImageSequence" in ds)
    assert set(refs) == sources and set(refs.values()) == {1}, refs
    assert len(pacs.files()) == 2 * len(sources)
    assert logged(worker, "an answer process died")
    text = http(worker.metrics_port, "/metrics")[1]
    assert metric(text, "cxr_instances_processed_total") == len(sources)
    wait_for(lambda: metric(http(worker.metrics_port, "/metrics")[1], "cxr_instances_skipped_total") == 1, 30,
             "the lateral view skipped")
    assert http(worker.metrics_port, "/readyz")[0] == 200
    replaced = answer_processes(worker.proc.pid)
    assert len(replaced) == 2 and not set(replaced) & set(answering)

    # The service killed with -9 takes its answer processes with it (nothing left holding a model).
    worker.proc.kill()
    worker.proc.wait(10)
    wait_for(lambda: not any(alive(p) for p in replaced), 30, "answer processes to end with the service")


def test_answer_processes_report_at_the_site_s_prevalence_and_threshold(onnx_model: Path, tmp_path: Path) -> None:
    """Every answer process decides at the threshold and reports at the prevalence the service
    does (``model.site_prevalence``, ``model.target_sensitivity``), and a pool that would not is
    refused at start."""
    from worker.cli import _load_model
    from worker.config import get_settings
    from worker.errors import WorkerError
    from worker.parallel import AnswerPool

    settings = get_settings(None, {"model": {"path": onnx_model, "site_prevalence": 0.1},
                                   "spool": {"dir": tmp_path / "spool"}})
    model = _load_model(settings)
    reporting = (model.info.threshold, model.info.assumed_prevalence)
    assert reporting[1] == pytest.approx(0.1)
    pool = AnswerPool(settings, 2, model.path, reporting)
    try:
        pool.start()  # raises when a process reports otherwise
    finally:
        pool.stop()
    unshifted = AnswerPool(settings, 1, model.path, (model.info.threshold, 0.5))
    try:
        with pytest.raises(WorkerError, match="must decide alike"):
            unshifted.start()
    finally:
        unshifted.stop()
