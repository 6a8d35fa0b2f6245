"""The shipped Prometheus alerting rules: promtool checks and unit-tests them, the Kubernetes
PrometheusRule carries the same groups, and every metric they read is one the worker exports."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.helpers import require_tool
from worker.metrics import Metrics

RULES_DIR = Path(__file__).resolve().parents[3] / "deploy" / "prometheus"
RULES = RULES_DIR / "cxr-gradcam.rules.yml"

pytestmark = pytest.mark.tool


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([require_tool("/usr/bin/promtool"), *args], capture_output=True, text=True, timeout=60,
                          cwd=RULES_DIR)


def test_rules_are_valid_and_their_unit_tests_pass() -> None:
    checked = promtool("check", "rules", RULES.name)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = promtool("test", "rules", "cxr-gradcam.test.yml")
    assert tested.returncode == 0, tested.stdout + tested.stderr


def test_prometheus_rule_for_kubernetes_has_the_same_groups() -> None:
    plain = yaml.safe_load(RULES.read_text())
    crd = yaml.safe_load((RULES_DIR / "prometheusrule.yaml").read_text())
    assert (crd["apiVersion"], crd["kind"]) == ("monitoring.coreos.com/v1", "PrometheusRule")
    assert crd["spec"]["groups"] == plain["groups"]


def test_rules_read_only_metrics_the_worker_exports() -> None:
    exported = {m.name for m in Metrics().registry.collect()}
    exprs = [r["expr"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]
    used = {re.sub(r"_total$", "", name) for e in exprs for name in re.findall(r"\bcxr_[a-z_]+", e)}
    assert used and used <= exported, used - exported
