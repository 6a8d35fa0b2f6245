"""The dashboard attacked as a client on the same host or network would: sessions that outlive
their end, login guesses at once, forged addresses and hosts, large bodies, slow headers,
unaudited reads of patient data, files other local users can read.

Each test starts ``cxr-worker dashboard`` (plain HTTP on loopback, started under umask 022 as a
hand-started dashboard would be) on a results store seeded through the store's own API; the
accounts are changed with the real ``cxr-worker user`` commands.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from tests.conftest import ROOT
from tests.helpers import CANARY_ID, free_port, wait_for, wait_port
from worker.dashboard.accounts import Accounts
from worker.store import NewResult, ResultStore, Worklist

pytestmark = pytest.mark.integration

PASSWORDS = {"alice": "alice-reads-films", "bob": "bob-reads-films-too", "carol": "carol-runs-the-service",
             "dave": "dave-is-guessed-at"}
ROLES = {"carol": "admin"}
#: A model version that matplotlib would read as (bad) math text: it broke the disagreement plot.
DOLLARS = "v$\\x$1"


@dataclass
class Dashboard:
    """One running ``cxr-worker dashboard`` and how to reach it."""

    url: str
    port: int
    config: Path
    audit: Path
    spool: Path
    proc: subprocess.Popen[bytes]

    def client(self, forwarded_for: str | None = None) -> httpx.Client:
        headers = {"X-Forwarded-For": forwarded_for} if forwarded_for else {}
        return httpx.Client(base_url=self.url, follow_redirects=False, timeout=30, headers=headers)

    def login(self, name: str, password: str | None = None, forwarded_for: str | None = None) -> httpx.Client:
        c = self.client(forwarded_for)
        r = post_login(c, name, password or PASSWORDS[name])
        assert r.status_code == 303, r.text
        return c

    def cli(self, *args: str, stdin: str | None = None) -> None:
        done = subprocess.run([sys.executable, "-m", "worker.cli", *args, "--config", str(self.config)],
                              input=stdin, text=True, capture_output=True, cwd=ROOT, timeout=120)
        assert done.returncode == 0, done.stderr

    def audit_records(self) -> list[dict[str, Any]]:
        return [json.loads(x) for x in self.audit.read_text().splitlines()] if self.audit.exists() else []


def csrf(c: httpx.Client) -> str:
    page = c.get("/login").text
    return page.split('name="csrf" value="')[1].split('"')[0]


def post_login(c: httpx.Client, name: str, password: str, token: str | None = None) -> httpx.Response:
    return c.post("/login", data={"username": name, "password": password, "csrf": token or csrf(c), "next": "/"})


def _umask_022() -> None:
    os.umask(0o022)  # the usual login umask: without the code's own modes, files come out 0644


def _seed(spool: Path) -> ResultStore:
    store = ResultStore(f"sqlite:///{spool / 'results' / 'results.db'}", spool / "results" / "media")
    if store.worklist(Worklist())[1] == 0:
        rng = np.random.default_rng(3)
        for i, version in enumerate(("1.0", DOLLARS)):
            store.record(NewResult(
                study_instance_uid=f"2.25.10{i}", series_instance_uid=f"2.25.20{i}", sop_instance_uid=f"2.25.30{i}",
                sop_class_uid="1.2.840.10008.5.1.4.1.1.1.1", accession_number=f"ACC-{i}", patient_id=CANARY_ID,
                patient_name="Canary^Patient", probability=0.8, decision="positive", threshold=0.5,
                model_name="cxr-resnet50", model_version=version), rng.random((64, 64)), rng.random((4, 4)))
        accounts = Accounts(store)
        for name, password in PASSWORDS.items():
            accounts.add_user(name, ROLES.get(name, "reader"), password)
    return store


def start_dashboard(tmp: Path, extra: str = "") -> Dashboard:
    spool, port = tmp / "spool", free_port()
    config = tmp / f"dashboard-{port}.toml"
    config.write_text(f'[spool]\ndir = "{spool}"\n[audit]\npath = "{tmp / "audit.jsonl"}"\n'
                      f'[dashboard]\nport = {port}\n{extra}\n')
    log = open(tmp / f"dashboard-{port}.log", "ab")  # noqa: SIM115 (closed with the process)
    proc = subprocess.Popen([sys.executable, "-m", "worker.cli", "dashboard", "--config", str(config)],
                            stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, preexec_fn=_umask_022)
    log.close()
    wait_port(port, 60)
    return Dashboard(f"http://127.0.0.1:{port}", port, config, tmp / "audit.jsonl", spool, proc)


def stop(d: Dashboard) -> None:
    d.proc.terminate()
    d.proc.wait(30)


@pytest.fixture(scope="module")
def seeded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, ResultStore]]:
    tmp = tmp_path_factory.mktemp("dashboard-security")
    store = _seed(tmp / "spool")
    yield tmp, store
    store.close()


@pytest.fixture(scope="module")
def proxied(seeded: tuple[Path, ResultStore]) -> Iterator[Dashboard]:
    """A dashboard behind a (loopback) proxy: each test gives its clients addresses of their own
    with X-Forwarded-For, so one test's refused logins do not lock another's out."""
    d = start_dashboard(seeded[0], 'trusted_proxies = ["127.0.0.1"]\nheader_timeout_s = 1.0\n')
    yield d
    stop(d)


def result_id(store: ResultStore, version: str = "1.0") -> int:
    return next(r.id for r in store.worklist(Worklist())[0] if r.model_version == version)


# -- medium -----------------------------------------------------------------------------

def test_sessions_end_on_logout_disable_password_reset_and_role_change(proxied: Dashboard,
                                                                        seeded: tuple[Path, ResultStore]) -> None:
    rid = result_id(seeded[1])

    def copied(c: httpx.Client) -> httpx.Client:
        thief = proxied.client("10.1.0.2")
        thief.cookies.set("cxr_session", c.cookies["cxr_session"])
        assert thief.get("/").status_code == 200  # the copy works while the login lasts
        return thief

    def ended(thief: httpx.Client) -> bool:
        page = thief.get("/")
        feedback = thief.post(f"/results/{rid}/feedback", data={"agree": "agree", "label": "pneumonia"})
        return page.status_code == 303 and page.headers["location"].startswith("/login") \
            and feedback.status_code == 401

    bob = proxied.login("bob", forwarded_for="10.1.0.1")
    thief = copied(bob)
    token = bob.get(f"/results/{rid}").text.split('name="csrf" value="')[1].split('"')[0]
    assert bob.post("/logout", data={"csrf": token}).status_code == 303
    assert ended(thief), "a session cookie copied before logout still works"

    thief = copied(proxied.login("bob", forwarded_for="10.1.0.1"))
    proxied.cli("user", "disable", "bob")
    proxied.cli("user", "enable", "bob")
    assert ended(thief), "a session from before a disable works again after the enable"

    thief = copied(proxied.login("bob", forwarded_for="10.1.0.1"))
    proxied.cli("user", "add", "bob", "--role", "reader", stdin=PASSWORDS["bob"] + "\n")  # password reset
    assert ended(thief), "a session from before a password reset still works"

    thief = copied(proxied.login("bob", forwarded_for="10.1.0.1"))
    proxied.cli("user", "add", "bob", "--role", "admin", stdin=PASSWORDS["bob"] + "\n")
    assert ended(thief), "a session from before a role change still works"
    proxied.cli("user", "add", "bob", "--role", "reader", stdin=PASSWORDS["bob"] + "\n")


def test_concurrent_login_guesses_are_counted_before_the_password_is_checked(proxied: Dashboard) -> None:
    clients = [proxied.client("10.2.0.1") for _ in range(11)]
    tokens = [csrf(c) for c in clients]
    barrier, codes = threading.Barrier(len(clients)), [0] * len(clients)

    def guess(i: int) -> None:
        password = PASSWORDS["dave"] if i == 10 else f"wrong-{i}"  # the 11th is right
        barrier.wait()
        codes[i] = post_login(clients[i], "dave", password, tokens[i]).status_code

    threads = [threading.Thread(target=guess, args=(i,)) for i in range(len(clients))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    checked = [c for c in codes if c != 429]
    assert len(checked) <= 5, f"{len(checked)} of 11 simultaneous guesses had their password checked: {codes}"
    assert set(codes) <= {401, 429, 303}


def test_forwarded_addresses_are_believed_only_from_trusted_proxies(seeded: tuple[Path, ResultStore],
                                                                     proxied: Dashboard) -> None:
    # Behind the configured proxy, its X-Forwarded-For is the reader's address (audited as such).
    proxied.login("alice", forwarded_for="10.3.0.9")
    assert any(p.get("NetworkAccessPointID") == "10.3.0.9" for r in proxied.audit_records()
               for p in r["ActiveParticipant"])
    # A dashboard with the default (no proxies): a client choosing its own address gains nothing.
    d = start_dashboard(seeded[0])
    try:
        codes = []
        for i in range(6):
            c = d.client(f"10.3.1.{i}")
            codes.append(post_login(c, "alice", "wrong").status_code)
        assert codes == [401] * 5 + [429], codes
        forged = [r for r in d.audit_records() for p in r["ActiveParticipant"]
                  if str(p.get("NetworkAccessPointID", "")).startswith("10.3.1.")]
        assert forged == [], "the audit trail recorded a forged address"
    finally:
        stop(d)


def test_large_request_bodies_are_refused_before_they_are_parsed(proxied: Dashboard) -> None:
    c = proxied.client("10.4.0.1")
    token = csrf(c)
    big = b"x" * (2 << 20)
    multipart = c.post("/login", data={"csrf": token, "username": "alice"}, files={"f": ("f.bin", big)})
    assert multipart.status_code == 413
    form = c.post("/login", data={"csrf": token, "username": "alice", "password": "y" * (2 << 20)})
    assert form.status_code == 413

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it arrives
        for _ in range(64):
            yield b"a=" + b"z" * 65536 + b"&"

    assert c.post("/login", content=chunks(), headers={"Content-Type": "application/x-www-form-urlencoded"}
                  ).status_code == 413
    assert post_login(c, "alice", PASSWORDS["alice"]).status_code == 303  # a normal form still works


def test_worklist_searches_previews_and_grids_are_audited_without_phi(proxied: Dashboard,
                                                                       seeded: tuple[Path, ResultStore]) -> None:
    rid = result_id(seeded[1])
    c = proxied.login("alice", forwarded_for="10.5.0.1")
    before = len(proxied.audit_records())
    assert c.get("/").status_code == 200
    assert c.get("/", params={"q": CANARY_ID, "decision": "positive"}).status_code == 200
    assert c.get(f"/results/{rid}/preview.png").status_code == 200
    assert c.get(f"/results/{rid}/grid.json").status_code == 200
    new = proxied.audit_records()[before:]
    queries = [r for r in new if r["EventIdentification"]["EventID"]["meaning"] == "Query"]
    assert len(queries) == 2 and all(r["ActiveParticipant"][0]["UserID"] == "alice" for r in queries)
    searched = json.loads(base64.b64decode(queries[1]["ParticipantObjectIdentification"][0]["ParticipantObjectQuery"]))
    assert searched["decision"] == "positive" and searched["q"].startswith("hmac-sha256:")
    accessed = {r["EventIdentification"].get("EventOutcomeDescription") for r in new
                if r["EventIdentification"]["EventID"]["meaning"] == "DICOM Instances Accessed"}
    assert {"preview image downloaded", "heatmap grid downloaded"} <= accessed
    text = json.dumps(new)
    assert CANARY_ID not in text and base64.b64encode(CANARY_ID.encode()).decode() not in text


def test_repeated_refused_logins_are_aggregated_in_the_audit_trail(proxied: Dashboard) -> None:
    c = proxied.client("10.6.0.1")
    token = csrf(c)
    codes = [post_login(c, "alice", "wrong", token).status_code for _ in range(30)]
    assert codes[:5] == [401] * 5 and set(codes[5:]) == {429}
    mine = [r for r in proxied.audit_records()
            if any(p.get("NetworkAccessPointID") == "10.6.0.1" for p in r["ActiveParticipant"])]
    assert len(mine) == 2, f"{len(mine)} audit records for 30 refused logins"
    assert "refusal 10 from this address" in mine[1]["EventIdentification"]["EventOutcomeDescription"]


def test_patient_data_files_are_private_whatever_the_umask(tmp_path: Path) -> None:
    d = start_dashboard(tmp_path)  # a hand-started dashboard on a fresh spool, under umask 022
    try:
        c = d.client()
        assert c.get("/login").status_code == 200
        results = d.spool / "results"
        wait_for(lambda: (results / "results.db-wal").exists(), 30, "the WAL file")
        assert stat.S_IMODE(results.stat().st_mode) == 0o700
        for name in ("results.db", "results.db-wal", "results.db-shm"):
            assert stat.S_IMODE((results / name).stat().st_mode) == 0o600, name
    finally:
        stop(d)
    old = os.umask(0o022)
    try:
        store = _seed(d.spool)  # what the worker's recorder writes: previews and grids
        store.add_feedback(result_id(store), Accounts(store).users()[0].id, True, "pneumonia")
        store.close()
        out = tmp_path / "export"
        done = subprocess.run([sys.executable, "-m", "worker.cli", "feedback", "export", "--out", str(out),
                               "--config", str(d.config)], capture_output=True, text=True, cwd=ROOT, timeout=120)
        assert done.returncode == 0, done.stderr
    finally:
        os.umask(old)
    for root in (d.spool / "results" / "media", out):
        for path in [root, *root.rglob("*")]:
            want = 0o700 if path.is_dir() else 0o600
            assert stat.S_IMODE(path.stat().st_mode) == want, path


# -- low --------------------------------------------------------------------------------

def test_a_dollar_in_a_model_version_and_huge_numbers_are_no_server_error(proxied: Dashboard,
                                                                          seeded: tuple[Path, ResultStore]) -> None:
    store = seeded[1]
    rid = result_id(store, DOLLARS)
    carol = next(u for u in Accounts(store).users() if u.name == "carol")
    store.add_feedback(rid, carol.id, False, "no_pneumonia")
    admin = proxied.login("carol", forwarded_for="10.7.0.1")
    svg = admin.get("/operations/disagreement.svg")
    assert svg.status_code == 200 and b"<svg" in svg.content
    huge = "9" * 30
    for path in (f"/?page={huge}", f"/?page={2**62}", f"/results/{huge}", f"/results/{2**63}",
                 f"/results/{huge}/preview.png", f"/results/{2**63}/grid.json"):
        assert admin.get(path).status_code == 404, path


def test_slow_headers_are_cut_off(proxied: Dashboard) -> None:
    with socket.create_connection(("127.0.0.1", proxied.port), timeout=10) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        closed_after = None
        start = time.monotonic()
        for _ in range(40):  # a header byte every 0.2 s: uvicorn's own timers restart at each
            try:
                s.sendall(b"X")
                s.settimeout(0.2)
                if s.recv(1) == b"":
                    closed_after = time.monotonic() - start
                    break
            except TimeoutError:
                continue
            except OSError:
                closed_after = time.monotonic() - start
                break
        assert closed_after is not None, "a connection still sending its headers after 8 s stays open"


def test_a_failed_login_names_only_existing_accounts(proxied: Dashboard) -> None:
    c = proxied.client("10.8.0.1")
    assert post_login(c, "Tr0ub4dor&3-typed-here", "x").status_code == 401
    c2 = proxied.client("10.8.0.2")
    assert post_login(c2, "bob", "wrong").status_code == 401
    text = proxied.audit.read_text()
    assert "Tr0ub4dor" not in text
    names = {p["UserID"] for r in proxied.audit_records() for p in r["ActiveParticipant"]
             if p.get("NetworkAccessPointID") in ("10.8.0.1", "10.8.0.2")}
    assert names == {"(not an account)", "bob"}


def test_only_configured_host_names_are_answered(proxied: Dashboard) -> None:
    c = proxied.client("10.9.0.1")
    assert c.get("/login", headers={"Host": "rebind.attacker.example"}).status_code == 400
    assert c.get("/login", headers={"Host": f"localhost:{proxied.port}"}).status_code == 200
    assert c.get("/login").status_code == 200
