"""The dashboard end to end: a worker records results, ``cxr-worker dashboard`` serves them over
TLS, readers log in and give feedback, in HTTP and in a real browser (headless Chromium).

One worker run, one dashboard process and one browser for the whole module. Peers are real:
DCMTK storescu/storescp around the worker, uvicorn with an openssl certificate, Chromium
driven by Selenium through the Debian chromium-driver.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import ssl
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import httpx
import numpy as np
import pydicom
import pytest

from cxr_contract.feedback import read_export
from tests.conftest import ROOT, WorkerProcess, write_worker_config
from tests.helpers import (
    CANARY_ID,
    CANARY_NAME,
    Storescp,
    free_port,
    http,
    metric,
    phantom_file,
    require_tool,
    storescu,
    wait_for,
    wait_port,
    walk,
)
from worker.dashboard.accounts import Accounts
from worker.store import ResultStore, Worklist

pytestmark = pytest.mark.integration

PASSWORDS = {"alice": "alice-reads-films", "bob": "bob-reads-films-too", "carol": "carol-runs-the-service"}
DOCS = ROOT / "docs"


@dataclass
class Site:
    """The running worker, PACS and dashboard, and what the tests need to reach them."""

    tmp: Path
    worker: WorkerProcess
    pacs: Storescp
    config: Path
    url: str
    cert: Path
    dashboard: subprocess.Popen[bytes]
    dashboard_log: Path
    audit: Path
    store: ResultStore

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, verify=ssl.create_default_context(cafile=str(self.cert)),
                            follow_redirects=False, timeout=30)

    def login(self, name: str, password: str | None = None) -> httpx.Client:
        c = self.client()
        token = csrf_of(c.get("/login").text)
        r = c.post("/login", data={"username": name, "password": password or PASSWORDS[name], "csrf": token,
                                   "next": "/"})
        assert r.status_code == 303, r.text
        return c


def csrf_of(html: str) -> str:
    m = re.search(r'name="csrf" value="([^"]+)"', html)
    assert m, "no CSRF token in the page"
    return m[1]


def phantom(path: Path, positive: bool, seed: int, accession: str) -> None:
    ds = phantom_file(path, positive=positive, seed=seed)
    ds.AccessionNumber = accession
    ds.save_as(path, enforce_file_format=True)


def _certificate(d: Path) -> tuple[Path, Path]:
    openssl = require_tool("/usr/bin/openssl")
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "key.pem", "-out",
                    "cert.pem", "-days", "2", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   cwd=d, check=True, capture_output=True, timeout=60)
    return d / "cert.pem", d / "key.pem"


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory, onnx_model: Path) -> Iterator[Site]:
    tmp = tmp_path_factory.mktemp("dashboard")
    cert, key = _certificate(tmp)
    pacs = Storescp(free_port(), tmp / "pacs")
    pacs.start()
    port, metrics_port, dash_port = free_port(), free_port(), free_port()
    url = f"https://127.0.0.1:{dash_port}"
    config = write_worker_config(tmp / "worker.toml", port=port, spool=tmp / "spool", model=onnx_model,
                                 metrics_port=metrics_port, audit=tmp / "audit.jsonl",
                                 destinations=[f"PACS@127.0.0.1:{pacs.port}"], extra=f"""
[dashboard]
port = {dash_port}
public_url = "{url}"
tls_cert = "{cert}"
tls_key = "{key}"
""")
    worker = WorkerProcess(config, port, tmp / "spool", tmp / "worker.log", metrics_port=metrics_port)
    worker.start()
    dash_log = tmp / "dashboard.log"
    dashboard = None
    try:
        inputs = [tmp / f"in{i}.dcm" for i in range(3)]
        for i, path in enumerate(inputs):
            phantom(path, positive=i != 1, seed=40 + i, accession=f"ACC-{i}")
        storescu(port, inputs)
        wait_for(lambda: len(pacs.files()) >= 6, 120, "SC and SR of 3 instances at the PACS")
        for name, password in PASSWORDS.items():  # the password comes from stdin, never argv
            role = "admin" if name == "carol" else "reader"
            subprocess.run([sys.executable, "-m", "worker.cli", "user", "add", name, "--role", role,
                            "--config", str(config)], input=password + "\n", text=True, check=True, cwd=ROOT,
                           capture_output=True, timeout=120)
        with open(dash_log, "ab") as log:
            dashboard = subprocess.Popen([sys.executable, "-m", "worker.cli", "dashboard", "--config", str(config)],
                                         stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        wait_port(dash_port, 60)
        s = worker.spool
        store = ResultStore(f"sqlite:///{s / 'results' / 'results.db'}", s / "results" / "media")
        wait_for(lambda: store.worklist(Worklist())[1] == 3, 30, "3 results recorded (on the recorder's thread)")
        yield Site(tmp, worker, pacs, config, url, cert, dashboard, dash_log, tmp / "audit.jsonl", store)
    finally:
        if dashboard is not None:
            dashboard.terminate()
            dashboard.wait(30)
        if worker.proc is not None:
            worker.stop()
        pacs.stop()


# -- what the worker records --------------------------------------------------------------

def test_worker_records_each_result_with_its_preview_and_grid(site: Site) -> None:
    rows, total = site.store.worklist(Worklist())
    assert total == 3
    by_accession = {r.accession_number: r for r in rows}
    assert set(by_accession) == {"ACC-0", "ACC-1", "ACC-2"}
    for r in rows:
        assert r.patient_id == CANARY_ID and r.patient_name == CANARY_NAME  # readers find their case
        assert r.model_version and r.decision in ("positive", "negative", "withheld")
        assert r.received_at is not None and r.received_at <= r.answered_at
        assert r.infer_ms is not None and r.decode_ms is not None and r.build_ms is not None
        preview = cv2.imread(str(site.store.media_dir / r.preview_path), cv2.IMREAD_UNCHANGED)
        assert preview.dtype == np.uint8 and preview.shape == (128, 128)  # small input: never upscaled
        grid = site.store.grid(r)
        assert grid.ndim == 2 and 1 < grid.shape[0] < 128 and (grid >= 0).all()
    logs = site.worker.log.read_text()
    assert CANARY_ID not in logs and "Canary" not in logs


def test_sc_and_sr_carry_the_review_link(site: Site) -> None:
    reports = [ds for ds in map(pydicom.dcmread, site.pacs.files()) if ds.Modality == "SR"]
    links = [item.TextValue for sr in reports for item in walk(sr.ContentSequence) if item.ValueType == "TEXT"
             and item.ConceptNameCodeSequence[0].CodeValue == "REVIEW-LINK"]
    assert len(links) == 3 and all(re.fullmatch(re.escape(site.url) + r"/r/[a-z2-7]{10}", v) for v in links)
    path = links[0].removeprefix(site.url)
    c = site.client()  # a reader not yet logged in follows the link: the login brings them back to it
    login = c.get(path)
    assert login.status_code == 303 and login.headers["location"] == f"/login?next=%2Fr%2F{path[3:]}"
    token = csrf_of(c.get(login.headers["location"]).text)
    back = c.post("/login", data={"username": "alice", "password": PASSWORDS["alice"], "csrf": token, "next": path})
    assert back.status_code == 303 and back.headers["location"] == path
    r = c.get(path)
    assert r.status_code == 303 and re.fullmatch(r"/results/\d+", r.headers["location"])
    assert "Canary" in c.get(r.headers["location"]).text
    # The SC prints it: the lowest text lines differ from an SC rendered without a link.
    from worker.outputs import render_heatmap_overlay

    args: dict[str, Any] = {"probability": 0.9, "threshold": 0.5, "model_name": "m", "model_version": "1"}
    image, cam = np.full((256, 256), 0.5), np.ones((4, 4))
    assert not np.array_equal(render_heatmap_overlay(image, cam, link=links[0], **args),
                              render_heatmap_overlay(image, cam, **args))


def test_a_store_failure_is_counted_and_the_outputs_still_go_out(site: Site) -> None:
    media = site.store.media_dir
    moved = media.with_name("media.moved")
    media.rename(moved)
    media.write_text("not a folder")  # every write of a preview now fails, whoever runs the tests (root too)
    try:
        before = len(site.pacs.files())
        phantom(site.tmp / "in-store-fails.dcm", positive=True, seed=77, accession="ACC-X")
        storescu(site.worker.port, [site.tmp / "in-store-fails.dcm"])
        wait_for(lambda: len(site.pacs.files()) >= before + 2, 120, "the outputs despite the store failure")
        wait_for(lambda: metric(http(site.worker.metrics_port, "/metrics")[1], "cxr_store_errors_total") == 1, 30,
                 "the store error counted")
        assert site.worker.proc is not None and site.worker.proc.poll() is None
        lines = [json.loads(x) for x in site.worker.log_lines() if "not recorded" in x]
        assert lines and all(CANARY_ID not in json.dumps(x) for x in lines)
    finally:
        media.unlink()
        moved.rename(media)
    assert site.store.worklist(Worklist(search="ACC-X"))[1] == 0


# -- security -----------------------------------------------------------------------------

def test_anonymous_requests_are_refused(site: Site) -> None:
    c = site.client()
    rid = site.store.worklist(Worklist())[0][0].id
    for path in ("/", "/operations", f"/results/{rid}", "/r/abcdefghij"):
        r = c.get(path)
        assert r.status_code == 303 and r.headers["location"].startswith("/login"), path
    for path in (f"/results/{rid}/preview.png", f"/results/{rid}/grid.json", "/operations/drift.svg"):
        assert c.get(path).status_code == 401, path
    token = csrf_of(c.get("/login").text)
    r = c.post(f"/results/{rid}/feedback", data={"csrf": token, "agree": "agree", "label": "pneumonia"})
    assert r.status_code == 401
    assert site.store.feedback_history(rid) == []


def test_session_cookie_is_httponly_secure_and_samesite(site: Site) -> None:
    c = site.client()
    cookie = c.get("/login").headers["set-cookie"].lower()
    assert "httponly" in cookie and "secure" in cookie and "samesite=lax" in cookie
    headers = c.get("/login").headers
    assert "script-src 'self'" in headers["content-security-policy"] and headers["cache-control"] == "no-store"


def test_operations_are_for_administrators(site: Site) -> None:
    reader, admin = site.login("alice"), site.login("carol")
    assert reader.get("/operations").status_code == 403 and reader.get("/operations/drift.svg").status_code == 403
    assert "Operations" not in reader.get("/").text.split("</nav>")[0]
    page = admin.get("/operations")
    assert page.status_code == 200 and "Dead letters" in page.text
    svg = admin.get("/operations/drift.svg")
    assert svg.headers["content-type"].startswith("image/svg+xml") and b"<svg" in svg.content


def test_a_forged_form_is_refused(site: Site) -> None:
    rid = site.store.worklist(Worklist())[0][0].id
    alice, bob = site.login("alice"), site.login("bob")
    alice_token = csrf_of(alice.get(f"/results/{rid}").text)
    form = {"agree": "disagree", "label": "no_pneumonia", "comment": "forged"}
    assert alice.post(f"/results/{rid}/feedback", data=form).status_code == 403  # no token
    assert alice.post(f"/results/{rid}/feedback", data={**form, "csrf": "x" * 43}).status_code == 403
    assert bob.post(f"/results/{rid}/feedback", data={**form, "csrf": alice_token}).status_code == 403
    assert alice.post("/logout", data={}).status_code == 403
    assert all(f.comment != "forged" for f in site.store.feedback_history(rid))


def test_one_reader_cannot_act_as_another(site: Site) -> None:
    rid = site.store.worklist(Worklist())[0][-1].id
    alice, bob = site.login("alice"), site.login("bob")
    users = {u.name: u.id for u in Accounts(site.store).users()}
    token = csrf_of(bob.get(f"/results/{rid}").text)
    # A user field in the form is ignored: the acting reader is the session's.
    r = bob.post(f"/results/{rid}/feedback", data={"csrf": token, "agree": "agree", "label": "pneumonia",
                                                   "user_id": str(users["alice"]), "user": "alice"})
    assert r.status_code == 303
    last = site.store.feedback_history(rid)[-1]
    assert last.user_id == users["bob"]
    # A session cookie altered to name alice fails its signature: it is no session at all.
    forged = httpx.Client(base_url=site.url, verify=ssl.create_default_context(cafile=str(site.cert)))
    cookie = bob.cookies.get("cxr_session")
    assert cookie
    payload, _, signature = cookie.partition(".")
    forged.cookies.set("cxr_session", payload.replace("b", "c", 1) + "." + signature)
    assert forged.get("/", follow_redirects=False).status_code == 303
    assert "bob" not in alice.get(f"/results/{rid}").text.split("Your reading")[1].split("History")[0]


def test_sql_and_script_injection_are_harmless(site: Site) -> None:
    c = site.login("alice")
    for term in ("' OR '1'='1", "ACC-0' OR 1=1 --", "x'; DROP TABLE results; --", "<script>alert(1)</script>"):
        r = c.get("/", params={"q": term})
        assert r.status_code == 200 and "No results match" in r.text
        assert "<script>alert" not in r.text
    assert site.store.worklist(Worklist())[1] >= 3  # still there
    rid = site.store.worklist(Worklist())[0][0].id
    token = csrf_of(c.get(f"/results/{rid}").text)
    comment = "<script>document.title='owned'</script><img src=x onerror=alert(1)> '; DROP TABLE feedback; --"
    assert c.post(f"/results/{rid}/feedback", data={"csrf": token, "agree": "agree", "label": "uncertain",
                                                    "comment": comment}).status_code == 303
    page = c.get(f"/results/{rid}").text
    assert "<script>document.title" not in page and "&lt;script&gt;document.title" in page
    assert "<img src=x" not in page
    assert site.store.feedback_history(rid)[-1].comment == comment  # stored as given, shown as text


def test_logins_views_and_feedback_are_audited_without_phi(site: Site) -> None:
    records = [json.loads(x) for x in site.audit.read_text().splitlines()]
    events = {(r["EventIdentification"]["EventID"]["meaning"], r["EventIdentification"]["EventActionCode"])
              for r in records if any(p.get("UserID") in PASSWORDS for p in r["ActiveParticipant"])}
    assert ("User Authentication", "E") in events
    assert ("DICOM Instances Accessed", "R") in events and ("DICOM Instances Accessed", "U") in events
    text = site.audit.read_text() + site.dashboard_log.read_text()
    assert CANARY_ID not in text and "Canary" not in text and "ACC-0" not in text


# -- in a browser -------------------------------------------------------------------------

def _seed_a_visible_heatmap(store: ResultStore) -> None:
    """One more result, written through the store's own API: the test model's Grad-CAM maps are
    all zero (one epoch at 64 px), and an overlay that is all zero cannot show a slider working.
    The grid is the phantom's opacity mask, blurred, as a trained model's map would look."""
    from trainer.phantoms import make_phantom
    from worker.store import NewResult

    real = store.worklist(Worklist())[0][0]
    image, mask = make_phantom(np.random.default_rng(5), 1024, True)
    blurred = cv2.GaussianBlur(mask.astype(np.float32), (0, 0), 60)
    grid = cv2.resize(blurred, (16, 16), interpolation=cv2.INTER_AREA)
    store.record(NewResult(
        study_instance_uid="2.25.1", series_instance_uid="2.25.2", sop_instance_uid="2.25.3",
        sop_class_uid=real.sop_class_uid, accession_number="ACC-S", patient_id="PID-4711",
        patient_name="Doe^Jane", received_at=real.received_at, probability=0.91, decision="positive",
        threshold=real.threshold, faithfulness=0.62, model_name=real.model_name, model_version=real.model_version,
        decode_ms=12.0, infer_ms=40.0, build_ms=20.0), image.astype(np.float32) / 255, grid / grid.max())


@pytest.fixture(scope="module")
def browser(site: Site) -> Iterator[Any]:
    for tool in ("/usr/bin/chromium", "/usr/bin/chromedriver"):
        require_tool(tool)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1440,900", "--force-device-scale-factor=1"):
        options.add_argument(arg)
    options.accept_insecure_certs = True  # the test's own self-signed certificate
    _seed_a_visible_heatmap(site.store)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def _canvas_pixels(driver: Any, stride: int = 8) -> np.ndarray[Any, Any]:
    """Every stride-th pixel of the viewer's canvas, RGBA (all 4 M values would take seconds to ship)."""
    data = driver.execute_script(
        "const c = document.getElementById('view'), s = arguments[0];"
        "const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data, out = [];"
        "for (let y = 0; y < c.height; y += s) for (let x = 0; x < c.width; x += s) {"
        "  const i = 4 * (y * c.width + x); out.push(d[i], d[i + 1], d[i + 2], d[i + 3]); }"
        "return out;", stride)
    return np.asarray(data, np.int16)


def _set_slider(driver: Any, value: int) -> None:
    driver.execute_script(
        "const s = document.getElementById('opacity'); s.value = arguments[0];"
        "s.dispatchEvent(new Event('input', {bubbles: true}));", value)


def test_a_reader_reviews_a_result_in_the_browser(site: Site, browser: Any) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    shots = site.tmp / "screenshots"
    shots.mkdir(exist_ok=True)
    wait = WebDriverWait(browser, 30)
    browser.get(site.url + "/")
    wait.until(ec.presence_of_element_located((By.NAME, "username"))).send_keys("alice")
    browser.find_element(By.NAME, "password").send_keys(PASSWORDS["alice"])
    browser.save_screenshot(str(shots / "login.png"))
    browser.find_element(By.CSS_SELECTOR, "button.primary").click()
    wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "table.worklist tbody tr[data-href]")))
    browser.save_screenshot(str(shots / "worklist-before.png"))

    target = site.store.worklist(Worklist(search="ACC-S"))[0][0]
    browser.find_element(By.CSS_SELECTOR, f"tr[data-href='/results/{target.id}'] td").click()  # the row opens it
    wait.until(lambda d: d.execute_script("return document.getElementById('view').dataset.ready === '1'"))
    toggle = browser.find_element(By.ID, "overlay-on")
    if not toggle.is_selected():
        toggle.click()
    _set_slider(browser, 10)
    faint = _canvas_pixels(browser)
    _set_slider(browser, 90)
    strong = _canvas_pixels(browser)
    changed = np.abs(strong - faint).max(axis=None)
    assert changed > 20, "moving the opacity slider did not change the overlay"
    browser.find_element(By.TAG_NAME, "body").send_keys("h")  # the keyboard toggle: overlay off
    assert not browser.find_element(By.ID, "overlay-on").is_selected()
    off = _canvas_pixels(browser)
    rgba = off.reshape(-1, 4)
    assert (rgba[:, 0] == rgba[:, 1]).all() and (rgba[:, 1] == rgba[:, 2]).all()  # grayscale again
    browser.find_element(By.TAG_NAME, "body").send_keys("h")
    _set_slider(browser, 55)

    browser.find_element(By.CSS_SELECTOR, "input[name=agree][value=disagree]").click()
    browser.find_element(By.CSS_SELECTOR, "input[name=label][value=no_pneumonia]").click()
    browser.find_element(By.NAME, "comment").send_keys("Overlap of breast shadow, no consolidation.")
    browser.find_element(By.CSS_SELECTOR, "form.feedback button.primary").click()
    wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, ".saved")))
    wait.until(lambda d: d.execute_script("return document.getElementById('view').dataset.ready === '1'"))
    browser.save_screenshot(str(shots / "result.png"))
    current = site.store.current_feedback(target.id)
    assert any(f.user.name == "alice" and not f.agree and f.label == "no_pneumonia" for f in current)

    browser.get(site.url + "/?feedback=disagreed")
    row = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, f"tr[data-href='/results/{target.id}']")))
    assert "you: disagree" in row.text and "no pneumonia" in row.text

    # ... and in the export the trainer reads (the real command, the worker's config and store)
    export = site.tmp / "feedback-export"
    done = subprocess.run([sys.executable, "-m", "worker.cli", "feedback", "export", "--out", str(export),
                           "--config", str(site.config)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    exported = read_export(export)
    probability = f"{target.probability:.6g}"
    mine = [lab for lab in exported.labels if f"{lab.model_probability:.6g}" == probability
            and lab.label == "no_pneumonia" and not lab.agree]
    assert len(mine) == 1 and exported.image_file(mine[0]).is_file()
    text = (export / "labels.csv").read_text()
    assert "alice" not in text and target.patient_id not in text and "Doe" not in text
    browser.get(site.url + "/")
    wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "table.worklist")))
    browser.save_screenshot(str(shots / "worklist.png"))
    browser.find_element(By.CSS_SELECTOR, "form.who button").click()  # log out; the administrator logs in
    wait.until(ec.presence_of_element_located((By.NAME, "username"))).send_keys("carol")
    browser.find_element(By.NAME, "password").send_keys(PASSWORDS["carol"])
    browser.find_element(By.CSS_SELECTOR, "button.primary").click()
    wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "table.worklist")))
    browser.get(site.url + "/operations")
    wait.until(lambda d: d.execute_script(
        "return Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)"))
    assert "Store errors" in browser.page_source
    browser.save_screenshot(str(shots / "operations.png"))
    if os.environ.get("CXR_UPDATE_SCREENSHOTS"):  # docs/ pictures, refreshed on request
        for name in ("result", "worklist", "operations"):
            shutil.copyfile(shots / f"{name}.png", DOCS / f"dashboard-{name}.png")


def test_a_long_model_name_wraps_beside_its_label(site: Site, browser: Any) -> None:
    """At 1440x900 a long model name and version once wrapped under its "Model" label and ran into it."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    from worker.store import NewResult

    real = site.store.worklist(Worklist())[0][0]
    rid = site.store.record(NewResult(
        study_instance_uid="2.25.11", series_instance_uid="2.25.12", sop_instance_uid="2.25.13",
        probability=0.7, decision="positive", threshold=0.5, model_name="cxr-resnet50-pneumonia-nih-rsna-finetuned",
        model_version="2026.11.30-rsna-feedback-round-7+fp16-calibrated", sop_class_uid=real.sop_class_uid),
        np.full((64, 64), 0.5), np.ones((4, 4)))
    wait = WebDriverWait(browser, 30)
    browser.get(f"{site.url}/results/{rid}")
    if browser.find_elements(By.NAME, "username"):
        browser.find_element(By.NAME, "username").send_keys("alice")
        browser.find_element(By.NAME, "password").send_keys(PASSWORDS["alice"])
        browser.find_element(By.CSS_SELECTOR, "button.primary").click()
    wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, ".answer .row")))
    rows = browser.execute_script(
        "return Array.from(document.querySelectorAll('.answer .row')).map(r => {"
        "  const a = r.children[0].getBoundingClientRect(), b = r.children[1].getBoundingClientRect();"
        "  return [r.children[0].textContent, a.right, b.left, b.right, r.getBoundingClientRect().right]; })")
    model = [r for r in rows if r[0] == "Model"]
    assert model, rows
    _, label_right, value_left, value_right, row_right = model[0]
    assert label_right + 4 <= value_left and value_right <= row_right + 0.5, model[0]
    browser.save_screenshot(str(site.tmp / "screenshots" / "long-model-name.png"))


def test_too_many_failed_logins_are_refused_even_with_the_right_password(site: Site) -> None:
    # Last in the module: it locks 127.0.0.1 out for the limiter's window.
    c = site.client()
    codes = []
    for _ in range(6):
        token = csrf_of(c.get("/login").text)
        codes.append(c.post("/login", data={"username": "alice", "password": "wrong", "csrf": token}).status_code)
    assert codes[:5] == [401] * 5 and codes[5] == 429
    token = csrf_of(c.get("/login").text)
    r = c.post("/login", data={"username": "alice", "password": PASSWORDS["alice"], "csrf": token})
    assert r.status_code == 429
