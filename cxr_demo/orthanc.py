"""Orthanc as a local PACS for the demo and the tests.

Starts Debian's ``Orthanc`` from a generated JSON configuration on loopback ports
with its own storage, and routes every newly stable study's CR/DX series to the
worker with a Lua ``OnStableStudy`` hook (``/modalities/worker/store``).
"""

from __future__ import annotations

import base64
import json
import shutil
import socket
import subprocess
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ORTHANC = "/usr/sbin/Orthanc"
#: Debian's orthanc-dicomweb: QIDO-RS, WADO-RS and STOW-RS under ``DicomWeb.Root``.
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"

#: The Lua routing hook, shared with deploy/docker-compose.yml.
ROUTE_LUA = (Path(__file__).parent / "route.lua").read_text()


def find_orthanc() -> str | None:
    return ORTHANC if Path(ORTHANC).exists() else shutil.which("Orthanc")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class OrthancPACS:
    """A throw-away Orthanc on loopback that routes radiographs to ``worker``."""

    root: Path
    worker_ae: str
    worker_port: int
    ae_title: str = "ORTHANC"
    dicom_port: int = field(default_factory=_free_port)
    http_port: int = field(default_factory=_free_port)
    stable_age_s: int = 2
    #: Load the DICOMweb plugin (served at :attr:`dicomweb_url`).
    dicomweb: bool = False
    #: HTTP basic-auth users (name: password); none leaves the REST API open on loopback.
    users: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        return f"{self.url}/dicom-web"

    def _open(self, req: urllib.request.Request | str, timeout: float) -> Any:
        if not isinstance(req, urllib.request.Request):
            req = urllib.request.Request(req)
        if self.users:
            name, password = next(iter(self.users.items()))
            req.add_header("Authorization", "Basic " + base64.b64encode(f"{name}:{password}".encode()).decode())
        return urllib.request.urlopen(req, timeout=timeout)

    def start(self, timeout: float = 60.0) -> None:
        binary = find_orthanc()
        if binary is None:
            raise FileNotFoundError("Orthanc is not installed (apt-get install orthanc)")
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "route.lua").write_text(ROUTE_LUA)
        config = {
            "Name": "cxr-gradcam demo PACS",
            "StorageDirectory": str(self.root / "db"),
            "IndexDirectory": str(self.root / "db"),
            "DicomAet": self.ae_title,
            "DicomPort": self.dicom_port,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": bool(self.users),
            "RegisteredUsers": self.users,
            "DicomCheckCalledAet": False,
            "StableAge": self.stable_age_s,
            "DicomModalities": {"worker": [self.worker_ae, "127.0.0.1", self.worker_port]},
            "LuaScripts": [str(self.root / "route.lua")],
            "Plugins": [DICOMWEB_PLUGIN] if self.dicomweb else [],
            "DicomWeb": {"Enable": self.dicomweb, "Root": "/dicom-web/"},
            "ConcurrentJobs": 2,
        }
        cfg = self.root / "orthanc.json"
        cfg.write_text(json.dumps(config, indent=2))
        self._log = open(self.root / "orthanc.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen([binary, str(cfg)], stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"Orthanc exited with {self.proc.returncode}; see {self.root / 'orthanc.log'}")
            try:
                self.get("/system")
                return
            except OSError:
                time.sleep(0.3)
        raise TimeoutError(f"Orthanc did not answer on {self.url} within {timeout:.0f} s")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
            self.proc = None
            self._log.close()

    def get(self, path: str) -> Any:
        with self._open(self.url + path, timeout=10) as r:
            body = r.read()
            return json.loads(body) if r.headers.get_content_type() == "application/json" else body

    def upload(self, path: Path) -> dict[str, Any]:
        req = urllib.request.Request(self.url + "/instances", data=path.read_bytes(), method="POST")
        with self._open(req, timeout=60) as r:
            return dict(json.loads(r.read()))

    def series_of_study(self, study_uid: str) -> list[dict[str, Any]]:
        """Series (with MainDicomTags and Instances) of the study with this UID."""
        found = self.lookup_study(study_uid)
        return list(self.get(f"/studies/{found}/series")) if found else []

    def lookup_study(self, study_uid: str) -> str | None:
        req = urllib.request.Request(self.url + "/tools/lookup", data=study_uid.encode(), method="POST")
        with self._open(req, timeout=10) as r:
            hits = [h for h in json.loads(r.read()) if h["Type"] == "Study"]
        return str(hits[0]["ID"]) if hits else None
