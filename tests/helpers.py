"""Shared test helpers: real tools and peers, synthetic datasets, waits on conditions.

Test modules import helpers from here only, never from each other; fixtures live in conftest.py.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom import Dataset

from trainer.dicom_phantoms import cr_dataset
from trainer.phantoms import make_phantom

IN_CI = os.environ.get("CI", "").lower() == "true"


def require_tool(path: str) -> str:
    """The tool's path; skip when missing on a developer machine, fail in CI."""
    found = path if Path(path).exists() else shutil.which(Path(path).name)
    if found:
        return found
    message = f"{path} is not installed (apt-get install dcmtk orthanc dicom3tools)"
    if IN_CI:
        pytest.fail(message + "; CI must install it")
    pytest.skip(message)


def dciodvfy_errors(path: Path) -> list[str]:
    """Lines of dciodvfy's report that are errors (its exit code is not reliable)."""
    tool = require_tool("/usr/bin/dciodvfy")
    out = subprocess.run([tool, "-new", str(path)], capture_output=True, text=True, timeout=120)
    return [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(condition: Callable[[], bool], timeout: float, what: str, interval: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def connections_to(port: int) -> int:
    """TCP connections established to local ``port`` (Linux ``/proc/net/tcp``): shows that a
    peer's association is open without a timed guess."""
    count = 0
    for table in (Path("/proc/net/tcp"), Path("/proc/net/tcp6")):
        if not table.exists():
            continue
        for line in table.read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            count += state == "01" and int(local.rsplit(":", 1)[1], 16) == port  # 01: ESTABLISHED
    return count


def wait_port(port: int, timeout: float = 30.0) -> None:
    def is_open() -> bool:
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", port)) == 0

    wait_for(is_open, timeout, f"port {port}")


@dataclass
class Storescp:
    """DCMTK storescp standing in for the PACS: every received object is a file."""

    port: int
    out: Path
    ae_title: str = "PACS"
    proc: subprocess.Popen[bytes] | None = None

    def files(self) -> list[Path]:
        return sorted(p for p in self.out.iterdir() if p.is_file())

    def start(self) -> None:
        tool = require_tool("/usr/bin/storescp")
        self.out.mkdir(parents=True, exist_ok=True)
        # -uf: unique file names, so a duplicate delivery shows up as a second file.
        self.proc = subprocess.Popen([tool, "-aet", self.ae_title, "-od", str(self.out), "-uf", "+xa",
                                      str(self.port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(self.port)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None


CANARY_NAME = "Canary^Zebedee"
CANARY_ID = "CANARY-7731"
CANARY_BIRTH = "19010203"


def storescu(port: int, files: list[Path], check: bool = True, *options: str) -> subprocess.CompletedProcess[str]:
    """DCMTK storescu as the hospital's sender; options pick the proposed syntaxes."""
    tool = require_tool("/usr/bin/storescu")
    cmd = [tool, *options, "-aet", "HOSPITAL", "-aec", "CXR-GRADCAM", "127.0.0.1", str(port), *map(str, files)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if check:
        assert out.returncode == 0, out.stdout + out.stderr
    return out


def read_all(files: list[Path]) -> list[Dataset]:
    return [pydicom.dcmread(p) for p in files]


def walk(items: Any) -> list[Dataset]:
    out = []
    for item in items:
        out.append(item)
        if "ContentSequence" in item:
            out += walk(item.ContentSequence)
    return out


def sr_finding(sr: Dataset) -> tuple[str, float]:
    """(Present/Absent, probability) read back from the SR's content tree."""
    presence, probability = "", float("nan")
    for item in walk(sr.ContentSequence):
        name = item.ConceptNameCodeSequence[0].CodeValue if "ConceptNameCodeSequence" in item else ""
        if name == "233604007" and item.ValueType == "CODE":
            presence = item.ConceptCodeSequence[0].CodeMeaning
        if item.ValueType == "NUM" and name == "PNEUMONIA-PROB":
            probability = float(item.MeasuredValueSequence[0].NumericValue)
    return presence, probability


def phantom_file(path: Path, positive: bool, seed: int, **kw: Any) -> Dataset:
    image, _ = make_phantom(np.random.default_rng(seed), 128, positive)
    ds = cr_dataset(image, patient_name=CANARY_NAME, patient_id=CANARY_ID, **kw)
    ds.PatientBirthDate = CANARY_BIRTH
    # highdicom warns about a one-component person name, quoting it.
    ds.ReferringPhysicianName = "Zebedee"
    ds.save_as(path, enforce_file_format=True)
    return ds
