"""Load: 8 concurrent associations of 25 images each, a mix of the real CR chest and
phantoms. Bounded in time; every C-STORE succeeds and every result is delivered, and
the worker's peak memory stays bounded."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from tests.helpers import phantom_file, require_tool, wait_for

pytestmark = pytest.mark.integration
SENDERS, PER_SENDER, REAL_EVERY = 8, 25, 8


def test_eight_concurrent_senders(make_worker: Any, pacs: Any, tmp_path: Path) -> None:
    worker = make_worker([f"PACS@127.0.0.1:{pacs.port}"], dicom_extra="max_associations_per_peer = 10\n")
    real = pydicom.dcmread(get_testdata_file("RG1_UNCR.dcm"))
    folders = []
    for s in range(SENDERS):
        folder = tmp_path / f"sender{s}"
        folder.mkdir()
        for i in range(PER_SENDER):
            path = folder / f"{i:02d}.dcm"
            if (s * PER_SENDER + i) % REAL_EVERY == 0:
                real.SOPInstanceUID = generate_uid()
                real.save_as(path, enforce_file_format=True)
            else:
                phantom_file(path, bool(i % 2), 1000 * s + i)
        folders.append(folder)
    storescu = require_tool("/usr/bin/storescu")
    senders = [subprocess.Popen([storescu, "-aet", f"MODALITY{s}", "-aec", "CXR-GRADCAM", "127.0.0.1",
                                 str(worker.port), *map(str, sorted(f.iterdir()))],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
               for s, f in enumerate(folders)]
    outputs = [p.communicate(timeout=600)[0] for p in senders]
    assert all(p.returncode == 0 for p in senders), outputs
    total = SENDERS * PER_SENDER
    wait_for(lambda: len(pacs.files()) >= 2 * total, 900, f"{2 * total} results", interval=2.0)
    assert len(pacs.files()) == 2 * total
    status = Path(f"/proc/{worker.proc.pid}/status").read_text()
    peak_kb = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM")))
    assert peak_kb < 3 * 2**20, f"peak RSS {peak_kb / 1024:.0f} MiB"
    assert worker.stop() == 0
