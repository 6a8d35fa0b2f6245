"""Shared test helpers: real tools, synthetic datasets, small waits."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

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


def wait_port(port: int, timeout: float = 30.0) -> None:
    def is_open() -> bool:
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", port)) == 0

    wait_for(is_open, timeout, f"port {port}")
