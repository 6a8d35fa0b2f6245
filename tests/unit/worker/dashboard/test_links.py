"""The [dashboard] settings and the review link the SC and SR carry."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest

from tests.helpers import dciodvfy_errors
from tests.unit.worker.outputs.builders import MODEL, SETTINGS, hot_gradcam, synthetic_cr, walk
from worker.config import get_settings
from worker.decode import dataset_to_unit_image
from worker.errors import ConfigError
from worker.links import review_key, review_url
from worker.outputs import build_report, build_secondary_capture, output_uids, render_heatmap_overlay


def test_dashboard_defaults_to_loopback_and_sqlite_under_the_spool(tmp_path: Path) -> None:
    d = get_settings().dashboard
    assert d.bind == "127.0.0.1" and d.retention_days == 30 and d.record and d.public_url is None
    assert d.store_url(tmp_path) == f"sqlite:///{tmp_path.resolve() / 'results' / 'results.db'}"
    assert d.store_media(tmp_path) == tmp_path / "results" / "media"


def test_dashboard_keys_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CXR_DASHBOARD__PORT", "9443")
    monkeypatch.setenv("CXR_DASHBOARD__DATABASE_URL", "postgresql+psycopg://cxr@db/cxr")
    d = get_settings().dashboard
    assert d.port == 9443 and d.store_url(Path("x")) == "postgresql+psycopg://cxr@db/cxr"


def test_dashboard_tls_needs_both_files_and_public_url_a_web_address(tmp_path: Path) -> None:
    cert = tmp_path / "c.pem"
    cert.write_text("x")
    bad = {"tls_cert": str(cert)}
    with pytest.raises(ConfigError, match="dashboard TLS needs both tls_cert and tls_key"):
        get_settings(None, {"dashboard": bad})
    with pytest.raises(ConfigError, match="public_url"):
        get_settings(None, {"dashboard": {"public_url": "javascript:alert(1)"}})


def test_review_keys_are_short_stable_and_distinct() -> None:
    key = review_key("1.2.3.4", "v1")
    assert len(key) == 10 and key == review_key("1.2.3.4", "v1") and key.isalnum()
    assert key != review_key("1.2.3.4", "v2") and key != review_key("1.2.3.5", "v1")
    assert review_url("https://cxr.example.org/", "1.2.3.4", "v1") == f"https://cxr.example.org/r/{key}"


@pytest.mark.tool
def test_sr_carries_the_review_link_as_text_and_stays_valid(tmp_path: Path) -> None:
    source = synthetic_cr()
    link = review_url("https://cxr.example.org", str(source.SOPInstanceUID), MODEL.version)
    uids = output_uids(source, MODEL.version)
    args = {"probability": 0.9, "threshold": MODEL.threshold, "model_name": MODEL.name,
            "model_version": MODEL.version}
    film = np.full((512, 512), 0.5, np.float32)  # room for the text lines (a 64-px SC prints none)
    assert not np.array_equal(render_heatmap_overlay(film, hot_gradcam(), link=link, **args),  # type: ignore[arg-type]
                              render_heatmap_overlay(film, hot_gradcam(), **args))  # type: ignore[arg-type]
    rgb = render_heatmap_overlay(dataset_to_unit_image(source), hot_gradcam(), link=link, **args)  # type: ignore[arg-type]
    sc = build_secondary_capture(source, rgb, uids, MODEL, SETTINGS)
    sr = build_report(source, sc, 0.9, MODEL, uids, SETTINGS, review_url=link)
    path = tmp_path / "sr.dcm"
    sr.save_as(path, enforce_file_format=True)
    assert dciodvfy_errors(path) == []
    def links(sr: pydicom.Dataset) -> list[str]:
        return [i.TextValue for i in walk(sr.ContentSequence) if i.ValueType == "TEXT"
                and i.ConceptNameCodeSequence[0].CodeValue == "REVIEW-LINK"]

    assert links(pydicom.dcmread(path)) == [link]
    assert links(build_report(source, sc, 0.9, MODEL, uids, SETTINGS)) == []
