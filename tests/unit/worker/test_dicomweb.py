"""DICOMweb destinations in the settings: what is accepted, what is refused with one line
naming the key (never quoting a secret), and which HTTP answers make a resend pointless."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from worker.config import DicomWebDestination, get_settings
from worker.dicomweb import _judge, http_permanent
from worker.errors import ConfigError

ROOT = Path(__file__).resolve().parents[3]
SECRET = "pw-Never-Shown-93"


def settings_from(tmp_path: Path, send: str) -> object:
    cfg = tmp_path / "w.toml"
    cfg.write_text("[send]\n" + send)
    return get_settings(cfg)


def test_urls_and_tables_are_dicomweb_destinations(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "cred").write_text(f"cxr:{SECRET}\n")
    monkeypatch.setenv("PACS_TOKEN", "eyJ0eXAi.token")
    s = settings_from(tmp_path, f'''destinations = ["PACS@10.0.0.5:104", "https://pacs.example.org/dicom-web/",
  "http://127.0.0.1:8042/dicom-web", "http://localhost:8042/dicom-web", "http://[::1]:8042/dicom-web",
  {{url = "https://vna.example.org/rs", auth = "basic", credentials_file = "{tmp_path / 'cred'}"}},
  {{url = "https://cloud.example.org/v1/dicomWeb", auth = "bearer", credentials_env = "PACS_TOKEN"}}]
''')
    dests = s.send.destinations  # type: ignore[attr-defined]
    assert [type(d).__name__ for d in dests] == ["Destination"] + ["DicomWebDestination"] * 6
    assert [str(d) for d in dests[1:3]] == ["https://pacs.example.org/dicom-web", "http://127.0.0.1:8042/dicom-web"]
    assert dests[5].secret() == f"cxr:{SECRET}" and dests[6].secret() == "eyJ0eXAi.token"
    assert SECRET not in repr(dests) and SECRET not in str(dests[5])


def test_http_to_another_host_needs_allow_http(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"send\.destinations: .*http://pacs:8042/dicom-web: http:// is allowed "
                                          r"only for loopback.*send\.allow_http = true"):
        settings_from(tmp_path, 'destinations = ["http://pacs:8042/dicom-web"]\n')
    s = settings_from(tmp_path, 'allow_http = true\ndestinations = ["http://pacs:8042/dicom-web"]\n')
    assert str(s.send.destinations[0]) == "http://pacs:8042/dicom-web"  # type: ignore[attr-defined]


@pytest.mark.parametrize("send, match", [
    (f'destinations = ["https://cxr:{SECRET}@pacs/dicom-web"]', r"send\.destinations\.0\.url: .*'https://pacs/"
     r"dicom-web': credentials in the URL are refused; use credentials_file or credentials_env"),
    ('destinations = ["ftp://pacs/dicom-web"]', r"send\.destinations: .*must be AET@HOST:PORT or a DICOMweb https://"),
    ('destinations = [{url = "ftp://pacs/dicom-web"}]', r"send\.destinations\.0\.url: .*must be http\(s\)://"),
    ('destinations = ["https://pacs:70000/dicom-web"]', r"send\.destinations\.0\.url: .*port out of range"),
    ('destinations = ["https://pacs/dicom-web?x=1"]', r"send\.destinations\.0\.url: .*no query"),
    ('destinations = [{url = "https://pacs/rs", auth = "basic"}]',
     r"send\.destinations\.0: .*auth = 'basic' needs exactly one of credentials_file, credentials_env"),
    ('destinations = [{url = "https://pacs/rs", auth = "bearer", credentials_env = "A", credentials_file = "/f"}]',
     r"send\.destinations\.0: .*needs exactly one of"),
    ('destinations = [{url = "https://pacs/rs", credentials_env = "CXR_TEST_SET"}]',
     r"send\.destinations\.0: .*credentials given but auth = 'none'"),
    ('destinations = [{url = "https://pacs/rs", auth = "basic", credentials_file = "/no/such/file"}]',
     r"send\.destinations\.0: .*credentials_file /no/such/file: FileNotFoundError"),
    ('destinations = [{url = "https://pacs/rs", auth = "bearer", credentials_env = "CXR_TEST_UNSET"}]',
     r"send\.destinations\.0: .*credentials_env CXR_TEST_UNSET is empty or not set"),
    ('destinations = [{url = "https://pacs/rs", auth = "basic", credentials_env = "CXR_TEST_SET"}]',
     r"send\.destinations\.0: .*credentials_env CXR_TEST_SET must hold one line USER:PASSWORD"),
    ('destinations = [{url = "https://pacs/rs", auth = "token", credentials_env = "CXR_TEST_SET"}]',
     r"send\.destinations\.0\.auth: "),
    ('destinations = [{url = "https://pacs/rs", password = "x"}]', r"send\.destinations\.0\.password: Extra inputs"),
    ('destinations = ["https://pacs/rs", "https://pacs/rs/"]', r"send\.destinations: .*listed twice: https://pacs/rs"),
])
def test_bad_dicomweb_destinations_are_one_line_naming_the_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                               send: str, match: str) -> None:
    monkeypatch.setenv("CXR_TEST_SET", SECRET)  # set, but not USER:PASSWORD
    monkeypatch.delenv("CXR_TEST_UNSET", raising=False)
    with pytest.raises(ConfigError, match=match) as caught:
        settings_from(tmp_path, send + "\n")
    message = str(caught.value)
    assert "\n" not in message and SECRET not in message


def test_a_bearer_token_with_spaces_is_refused_without_quoting_it(tmp_path: Path) -> None:
    (tmp_path / "token").write_text(f"Bearer {SECRET}\n")
    with pytest.raises(ValueError, match="one token without spaces") as caught:
        DicomWebDestination(url="https://pacs/rs", auth="bearer", credentials_file=tmp_path / "token")
    assert SECRET not in str(caught.value)


def test_the_cli_refuses_a_bad_destination_in_one_line(tmp_path: Path) -> None:
    cfg = tmp_path / "w.toml"
    cfg.write_text(f'[send]\ndestinations = ["https://cxr:{SECRET}@pacs/dicom-web"]\n')
    out = subprocess.run([sys.executable, "-m", "worker.cli", "serve", "--config", str(cfg)],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 1
    assert out.stderr.count("\n") == 1 and "send.destinations.0.url" in out.stderr, out.stderr
    assert SECRET not in out.stderr + out.stdout and "Traceback" not in out.stderr


@pytest.mark.parametrize("status, permanent", [(400, True), (404, True), (409, True), (413, True), (415, True),
                                               (401, False), (403, False), (408, False), (429, False),
                                               (500, False), (503, False)])
def test_which_http_statuses_are_permanent(status: int, permanent: bool) -> None:
    assert http_permanent(status) is permanent


def test_the_failed_sop_sequence_decides_over_the_http_status() -> None:
    # PS3.18 Table 10.5.3-1: Failure Reason is a C-STORE status.
    assert _judge("d", "1.2", 400, {"1.2": 0xA700}).permanent is False  # type: ignore[union-attr]
    assert _judge("d", "1.2", 200, {"1.2": 0xC000}).permanent is True  # type: ignore[union-attr]
    assert _judge("d", "1.2", 409, {"1.2": 0x0122}).permanent is True  # type: ignore[union-attr]
    assert _judge("d", "1.2", 409, {"9.9": 0xC000}).permanent is True  # type: ignore[union-attr]
    assert _judge("d", "1.2", 503, {"9.9": 0xC000}).permanent is False  # type: ignore[union-attr]
    assert _judge("d", "1.2", 200, {}) is None and _judge("d", "1.2", 202, {"9.9": 0xC000}) is None


@pytest.mark.parametrize("auth, text", [("basic", "cxr:pass€word"), ("bearer", "tok€n")])
def test_credentials_http_cannot_carry_are_refused_without_quoting_them(tmp_path: Path, auth: str,
                                                                        text: str) -> None:
    (tmp_path / "cred").write_text("cxr:ascii" if auth == "basic" else "ascii")
    dest = DicomWebDestination(url="https://pacs.example.org/rs", auth=auth, credentials_file=tmp_path / "cred")
    (tmp_path / "cred").write_text(text)  # rotated after start
    with pytest.raises(ValueError, match=r"outside ISO-8859-1") as caught:
        dest.secret()
    assert text not in str(caught.value)
    with pytest.raises(ValueError, match=r"outside ISO-8859-1"):  # and refused at start
        DicomWebDestination(url="https://pacs.example.org/rs", auth=auth, credentials_file=tmp_path / "cred")


@pytest.mark.parametrize("url", [
    f"HTTPS://cxr:{SECRET}@pacs/dicom-web",  # an upper-case scheme
    f"https://cxr:pass {SECRET}@pacs/dicom-web",  # a space in the password
    f"https://pacs/dicom-web?apikey={SECRET}",  # a key in the query
    f"https://pacs:99999/dicom-web?apikey={SECRET}",
])
def test_a_bad_destination_is_shown_without_its_credentials(tmp_path: Path, url: str) -> None:
    cfg = tmp_path / "w.toml"
    cfg.write_text(f'[send]\ndestinations = ["{url}"]\n')
    out = subprocess.run([sys.executable, "-m", "worker.cli", "serve", "--config", str(cfg)],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 1 and "send.destinations" in out.stderr, out.stderr
    assert SECRET not in out.stderr + out.stdout and "Traceback" not in out.stderr
