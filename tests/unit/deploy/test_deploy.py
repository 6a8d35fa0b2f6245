"""Deployment files, checked with the tools that run here (no Docker engine, no cluster):
kubernetes-validate against the Kubernetes schemas, hadolint, systemd-analyze verify,
and the wiring between them and the worker (ports, probes, metric names, non-root)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from tests.helpers import require_tool
from worker.config import Settings
from worker.metrics import Metrics

DEPLOY = Path(__file__).resolve().parents[3] / "deploy"
K8S_VERSION = "1.33.0"
MANIFESTS = sorted(DEPLOY.glob("k8s*/*.yaml"))


def docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_manifest_validates_against_kubernetes_schema(path: Path) -> None:
    for doc in docs(path):
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def workers() -> dict[str, dict]:
    return {p.parent.name: docs(p)[0] for p in DEPLOY.glob("k8s*/statefulset.yaml")}


def test_workers_probe_health_endpoints_and_run_as_non_root() -> None:
    defaults = Settings()
    for variant, sts in workers().items():
        pod = sts["spec"]["template"]["spec"]
        [c] = pod["containers"]
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert ports == {"dicom": defaults.dicom.port, "metrics": defaults.metrics.port}, variant
        assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
        assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert c["securityContext"]["readOnlyRootFilesystem"] is True
        assert sts["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "spool"
        assert pod["terminationGracePeriodSeconds"] > 30
    assert workers()["k8s-cuda"]["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"][
        "nvidia.com/gpu"] == 1
    assert "nvidia.com/gpu" not in workers()["k8s"]["spec"]["template"]["spec"]["containers"][0]["resources"][
        "limits"]


def test_autoscaler_uses_a_metric_the_worker_exports() -> None:
    hpa = docs(DEPLOY / "k8s" / "hpa.yaml")[0]
    name = hpa["spec"]["metrics"][0]["pods"]["metric"]["name"]
    exported = {m.name for m in Metrics().registry.collect()}
    assert name in exported


def test_configmap_is_a_valid_worker_config(tmp_path: Path) -> None:
    from worker.config import get_settings

    cm = docs(DEPLOY / "k8s" / "configmap.yaml")[0]
    path = tmp_path / "worker.toml"
    path.write_text(cm["data"]["worker.toml"])
    settings = get_settings(path)
    assert settings.metrics.bind == "0.0.0.0" and settings.security.allowed


@pytest.mark.tool
@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.cuda"])
def test_dockerfiles_lint_clean_and_run_as_non_root(dockerfile: str) -> None:
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or require_tool("hadolint")
    out = subprocess.run([hadolint, "--failure-threshold", "error", "--ignore", "DL3008", "--ignore", "DL3013",
                          str(DEPLOY / dockerfile)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    text = (DEPLOY / dockerfile).read_text()
    assert "USER 10001:10001" in text
    installs = [line for line in text.splitlines() if "pip" in line and not line.lstrip().startswith("#")]
    assert installs and not any("[train]" in line or "tensorflow" in line.lower() for line in installs)


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.cuda"])
def test_dockerfiles_copy_every_package_the_wheel_needs(dockerfile: str) -> None:
    """The image installs a wheel built from the copied folders: a package left out (and the
    configs it carries as package data) would be missing from the image."""
    import tomllib

    project = tomllib.loads((DEPLOY.parent / "pyproject.toml").read_text())
    packages = {p.rstrip("*") for p in project["tool"]["setuptools"]["packages"]["find"]["include"]}
    copied = {line.split()[1] for line in (DEPLOY / dockerfile).read_text().splitlines() if line.startswith("COPY ")}
    assert packages <= copied, sorted(packages - copied)


@pytest.mark.tool
def test_systemd_unit_verifies(tmp_path: Path) -> None:
    tool = require_tool("/usr/bin/systemd-analyze")
    unit = (DEPLOY / "systemd" / "cxr-gradcam-worker.service").read_text()
    # verify checks that ExecStart exists; point it at a binary this machine has.
    local = tmp_path / "cxr-gradcam-worker.service"
    local.write_text(unit.replace("/opt/cxr-gradcam/bin/cxr-worker", "/bin/true"))
    out = subprocess.run([tool, "verify", str(local)], capture_output=True, text=True, timeout=60)
    problems = [line for line in (out.stdout + out.stderr).splitlines()
                if str(local) in line and ("Unknown" in line or "Failed" in line or "bad" in line.lower())]
    assert not problems, out.stdout + out.stderr
    assert "NoNewPrivileges=yes" in unit and "ProtectSystem=strict" in unit and "User=cxr" in unit


def test_replicas_share_one_results_database_and_media_but_each_keeps_its_spool(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Several replicas behind one Service: each pod its own spool volume, kept when a scale-down
    removes the pod (what it acknowledged waits there); the dashboard's PostgreSQL and media shared
    by all; readiness gating the Service; a disruption budget that always leaves one replica."""
    from worker.config import get_settings

    secret = docs(DEPLOY / "k8s" / "db-secret.example.yaml")[0]
    media = docs(DEPLOY / "k8s" / "media-pvc.yaml")[0]
    assert media["spec"]["accessModes"] == ["ReadWriteMany"]
    cm = docs(DEPLOY / "k8s" / "configmap.yaml")[0]
    (tmp_path / "worker.toml").write_text(cm["data"]["worker.toml"])
    monkeypatch.setenv("CXR_DASHBOARD__DATABASE_URL", secret["stringData"]["url"])
    settings = get_settings(tmp_path / "worker.toml")
    assert settings.dashboard.record and settings.dashboard.store_url(settings.spool.dir).startswith("postgresql")
    [service] = [s for s in docs(DEPLOY / "k8s" / "service.yaml") if s["spec"].get("type") == "LoadBalancer"]
    assert service["spec"]["externalTrafficPolicy"] == "Local"  # the allow-list sees the PACS's address
    pdb = docs(DEPLOY / "k8s" / "pdb.yaml")[0]
    for variant, sts in workers().items():
        spec = sts["spec"]
        pod = spec["template"]["spec"]
        [c] = pod["containers"]
        labels = spec["template"]["metadata"]["labels"]
        assert service["spec"]["selector"].items() <= labels.items(), variant
        assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items(), variant
        assert 1 <= pdb["spec"]["minAvailable"] < spec["replicas"], variant
        [spool] = spec["volumeClaimTemplates"]
        assert spool["spec"]["accessModes"] == ["ReadWriteOnce"], variant
        assert spec["persistentVolumeClaimRetentionPolicy"] == {"whenDeleted": "Retain", "whenScaled": "Retain"}
        mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
        assert Path(mounts["spool"]) in settings.spool.dir.parents, variant
        assert Path(mounts["media"]) == settings.dashboard.media_dir, variant
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes["media"]["persistentVolumeClaim"]["claimName"] == media["metadata"]["name"], variant
        [db] = [e for e in c["env"] if e["name"] == "CXR_DASHBOARD__DATABASE_URL"]
        assert db["valueFrom"]["secretKeyRef"] == {"name": secret["metadata"]["name"], "key": "url"}, variant
