"""Worker settings: precedence, refusal of bad values, the shipped file, selection rules."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file

from worker.config import Settings, default_config, get_settings
from worker.errors import ConfigError
from worker.selection import ineligible_reason

ROOT = Path(__file__).resolve().parents[3]


def test_shipped_worker_toml_states_the_defaults() -> None:
    assert get_settings(default_config()) == Settings() == get_settings()
    assert default_config().read_bytes() == (ROOT / "config" / "worker.toml").read_bytes(), \
        "config/worker.toml and worker/defaults/worker.toml differ: edit both"


def test_precedence_environment_then_flags_then_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "w.toml"
    cfg.write_text('[dicom]\nport = 2000\nae_title = "FROMFILE"\n[send]\ndestinations = ["A@h:1"]\n')
    s = get_settings(cfg)
    assert (s.dicom.port, s.dicom.ae_title, str(s.send.destinations[0])) == (2000, "FROMFILE", "A@h:1")
    s = get_settings(cfg, {"dicom": {"port": 3000, "ae_title": None}})
    assert (s.dicom.port, s.dicom.ae_title) == (3000, "FROMFILE")
    monkeypatch.setenv("CXR_DICOM__PORT", "4000")
    monkeypatch.setenv("CXR_SEND__DESTINATIONS", '["B@host:104", "C@10.1.1.1:11112"]')
    s = get_settings(cfg, {"dicom": {"port": 3000}})
    assert s.dicom.port == 4000
    assert [str(d) for d in s.send.destinations] == ["B@host:104", "C@10.1.1.1:11112"]


def test_flags_not_given_leave_the_file_alone_and_sections_merge(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "w.toml"
    cfg.write_text('[dicom]\nmax_pdu = 0\n[send]\nretry_initial_s = 1.5\n')
    monkeypatch.setenv("CXR_SEND__DIMSE_TIMEOUT", "7")
    s = get_settings(cfg, {"dicom": {"port": 3000, "bind": None}, "send": {"destinations": ["A@h:1"]}})
    assert (s.dicom.max_pdu, s.dicom.port, s.dicom.bind) == (0, 3000, "0.0.0.0")
    assert (s.send.retry_initial_s, s.send.dimse_timeout) == (1.5, 7.0)
    assert [str(d) for d in s.send.destinations] == ["A@h:1"]


@pytest.mark.parametrize("toml, match", [
    ("[dicom]\nport = 70000\n", "dicom.port"),
    ('[send]\ndestinations = [{ae_title = "BAD\\\\AE", host = "h", port = 104}]\n', "send.destinations.0.ae_title"),
    ('[send]\ndestinations = [{ae_title = "", host = "h", port = 104}]\n', "not a valid AE title"),
    ('[dicom]\nae_title = "MUCH-TOO-LONG-AE-TITLE"\n', "AE title"),
    ('[send]\ndestinations = ["nohost"]\n', "AET@HOST:PORT"),
    ("[output]\nopacity = 1.5\n", "output.opacity"),
    ("[model]\nproviders = \"tpu\"\n", "model.providers"),
    ("[dicom]\nprot = 1\n", "dicom.prot"),
    ("[dicom\n", "not valid TOML"),
    ("[processing]\nworkers = 0\n", "processing.workers"),
    ('[processing]\nworkers = "many"\n', "processing.workers"),
])
def test_bad_values_are_refused_with_the_key(tmp_path: Path, toml: str, match: str) -> None:
    cfg = tmp_path / "w.toml"
    cfg.write_text(toml)
    with pytest.raises(ConfigError, match=match):
        get_settings(cfg)


def test_config_errors_name_key_value_and_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "w.toml"
    cfg.write_text('[send]\ndestinations = [{ae_title = "MUCH-TOO-LONG-AE-TITLE", host = "h", port = 104}]\n')
    with pytest.raises(ConfigError) as err:
        get_settings(cfg)
    message = str(err.value)
    assert "\n" not in message
    assert "send.destinations.0.ae_title" in message and "MUCH-TOO-LONG-AE-TITLE" in message
    assert "CXR_SEND__DESTINATIONS" in message
    with pytest.raises(ConfigError, match="config file not found"):
        get_settings(tmp_path / "missing.toml")
    with pytest.raises(ConfigError, match=r"^flags: dicom.port: .*received 0"):
        get_settings(cfg, {"dicom": {"port": 0}})
    monkeypatch.setenv("CXR_DICOM__PORT", "99999")
    with pytest.raises(ConfigError, match=r"^environment CXR_DICOM__PORT: dicom.port: .*received '99999'"):
        get_settings(cfg)
    monkeypatch.delenv("CXR_DICOM__PORT")
    monkeypatch.setenv("CXR_SEND__DESTINATIONS", "PACS@h:104")  # not JSON
    with pytest.raises(ConfigError) as err:
        get_settings()
    assert "\n" not in str(err.value) and "CXR_SEND__DESTINATIONS='PACS@h:104'" in str(err.value)


def test_cli_reports_bad_config_in_one_line(tmp_path: Path) -> None:
    cfg = tmp_path / "w.toml"
    cfg.write_text("[dicom]\nport = -1\n")
    out = subprocess.run([sys.executable, "-m", "worker.cli", "serve", "--config", str(cfg)],
                         capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 1
    assert "Traceback" not in out.stderr
    assert "dicom.port" in out.stderr and "CXR_DICOM__PORT" in out.stderr
    out = subprocess.run([sys.executable, "-m", "worker.cli", "serve", "--model", str(tmp_path / "none.onnx"),
                          "--destination", "PACS@127.0.0.1:104"], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 1 and "model file not found" in out.stderr and "Traceback" not in out.stderr
    out = subprocess.run([sys.executable, "-m", "worker.cli", "serve", "--model", str(tmp_path / "none.onnx")],
                         capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 1 and "no destination" in out.stderr and "Traceback" not in out.stderr


def test_selection_takes_chest_pa_and_skips_the_rest() -> None:
    rules = Settings().select
    chest = pydicom.dcmread(get_testdata_file("RG1_UNCR.dcm"), stop_before_pixels=True)
    assert ineligible_reason(chest, rules) is None
    hand = pydicom.dcmread(get_testdata_file("RG3_UNCR.dcm"), stop_before_pixels=True)
    assert "body part" in str(ineligible_reason(hand, rules))
    chest.ViewPosition = "LL"
    assert "view position LL" in str(ineligible_reason(chest, rules))
    chest.ViewPosition = "AP"
    chest.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.33"  # Comprehensive SR
    assert "SOP class" in str(ineligible_reason(chest, rules))


def test_probe_fallback_needs_a_fallback_model() -> None:
    import pydantic

    from worker.config import ModelSection

    assert ModelSection().probe_check == "refuse"
    with pytest.raises(pydantic.ValidationError, match="probe_check = 'fallback' needs model.fallback_path"):
        ModelSection(probe_check="fallback")
    assert ModelSection(probe_check="fallback", fallback_path="m.onnx").fallback_path is not None


def test_processing_workers_auto_is_the_cores_this_process_may_use(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    assert Settings().processing.count() == 1  # the default: answered in the service's own process
    monkeypatch.setenv("CXR_PROCESSING__WORKERS", "auto")
    assert get_settings().processing.count() == len(os.sched_getaffinity(0))
    monkeypatch.setenv("CXR_PROCESSING__WORKERS", "3")
    assert get_settings().processing.count() == 3
