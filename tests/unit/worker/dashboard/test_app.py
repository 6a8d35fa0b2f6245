"""The dashboard application in-process: Starlette's TestClient against a SQLite store in a temp folder.

No server and no browser (tests/integration/test_dashboard.py has those); these check what a
session is worth after its account changes, and the `cxr-worker user` commands that change it.
"""

from __future__ import annotations

import re
import socket
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from starlette.testclient import TestClient

from worker.cli import main
from worker.config import Settings, get_settings
from worker.dashboard import operations
from worker.dashboard.accounts import Accounts
from worker.dashboard.app import create_app
from worker.store import NewResult, ResultStore

LOOPBACK = "http://127.0.0.1"  # the Host header the dashboard accepts by default (TestClient's is "testserver")
PASSWORD, NEW_PASSWORD = "alice-reads-films", "alice-has-a-new-one"


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "worker.toml"
    path.write_text(f'[spool]\ndir = "{tmp_path / "spool"}"\n[audit]\npath = "{tmp_path / "audit.jsonl"}"\n')
    return path


@pytest.fixture
def settings(config: Path) -> Settings:
    return get_settings(config)


@pytest.fixture
def store(settings: Settings) -> Iterator[ResultStore]:
    s = ResultStore.from_settings(settings)
    Accounts(s).add_user("alice", "reader", PASSWORD)
    yield s
    s.close()


@pytest.fixture
def client(settings: Settings, store: ResultStore) -> Iterator[TestClient]:
    with TestClient(create_app(settings, store, secret="k" * 64), base_url=LOOPBACK, follow_redirects=False) as c:
        yield c


def login(client: TestClient, password: str = PASSWORD, name: str = "alice") -> int:
    m = re.search(r'name="csrf" value="([^"]+)"', client.get("/login").text)
    assert m, "no CSRF token on the login page"
    r = client.post("/login", data={"username": name, "password": password, "csrf": m[1], "next": "/"})
    return r.status_code


def logged_in(client: TestClient) -> bool:
    r = client.get("/")
    assert r.status_code in (200, 303), r.status_code
    return r.status_code == 200


def test_a_password_reset_ends_the_sessions_made_before_it(client: TestClient, store: ResultStore) -> None:
    assert login(client) == 303 and logged_in(client)
    Accounts(store).add_user("alice", "reader", NEW_PASSWORD)  # `cxr-worker user add alice` again, same role
    assert not logged_in(client)
    assert login(client, PASSWORD) == 401
    assert login(client, NEW_PASSWORD) == 303 and logged_in(client)


def test_a_disabled_account_loses_its_session_and_cannot_log_in(
        client: TestClient, config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert login(client) == 303 and logged_in(client)
    assert main(["user", "disable", "alice", "--config", str(config)]) == 0
    assert "alice disabled" in capsys.readouterr().out
    assert not logged_in(client)
    assert login(client) == 401
    assert main(["user", "list", "--config", str(config)]) == 0
    assert capsys.readouterr().out.split() == ["alice", "reader", "disabled"]
    assert main(["user", "enable", "alice", "--config", str(config)]) == 0
    assert login(client) == 303 and logged_in(client)


def test_disabling_an_unknown_account_is_one_clear_error(config: Path, store: ResultStore,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["user", "disable", "mallory", "--config", str(config)]) == 1
    err = capsys.readouterr().err
    assert err.strip() == "cxr-worker user: error: no dashboard account named 'mallory'"
    assert main(["user", "disable", "--config", str(config)]) == 1
    assert "needs a NAME" in capsys.readouterr().err


def answered(store: ResultStore, uid: str, when: datetime) -> None:
    new = NewResult(study_instance_uid="1.2.3", series_instance_uid="1.2.3.4", sop_instance_uid=uid,
                    probability=0.7, decision="positive", threshold=0.5, model_name="cxr", model_version="1.0",
                    received_at=when - timedelta(seconds=1), answered_at=when)
    assert store.record(new, np.full((64, 64), 0.5, np.float32), np.ones((4, 4), np.float32)) is not None


def test_a_result_answered_after_now_counts_in_the_last_hour(store: ResultStore) -> None:
    # Clocks of worker hosts sharing a PostgreSQL differ, and a row can commit between `now` and the query.
    now = datetime.now(UTC)
    answered(store, "1.9.1", now - timedelta(hours=2, minutes=30))
    answered(store, "1.9.2", now + timedelta(minutes=10))
    snap = operations.snapshot(store, None, now)
    assert snap.answered_24h == 2 and sum(snap.per_hour) == 2
    assert snap.per_hour[23] == 1 and snap.per_hour[21] == 1


def test_the_operations_page_and_plots_survive_a_result_from_the_future(
        client: TestClient, store: ResultStore) -> None:
    Accounts(store).add_user("carol", "admin", "carol-runs-the-service")
    answered(store, "1.9.3", datetime.now(UTC) + timedelta(hours=1))
    assert login(client, "carol-runs-the-service", "carol") == 303
    assert client.get("/operations").status_code == 200
    for name in operations.PLOTS:
        r = client.get(f"/operations/{name}.svg")
        assert r.status_code == 200 and r.headers["content-type"] == "image/svg+xml"


def test_a_slow_worker_metrics_scrape_does_not_hold_other_requests(config: Path, store: ResultStore) -> None:
    """The operations page waits on the worker's /metrics; meanwhile the event loop serves others.

    The "worker" accepts the connection into its backlog and answers nothing until the second
    request has been answered; a handler that blocked the event loop would make that request
    wait for the scrape's own timeout instead, and finish after the page.
    """
    Accounts(store).add_user("carol", "admin", "carol-runs-the-service")
    with socket.create_server(("127.0.0.1", 0)) as silent:
        silent.settimeout(30)  # a page that never scrapes fails the test instead of hanging it
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/metrics"
        settings = get_settings(config, {"dashboard": {"metrics_url": url}})
        app = create_app(settings, store, secret="k" * 64)
        with TestClient(app, base_url=LOOPBACK, follow_redirects=False) as client:
            assert login(client, "carol-runs-the-service", "carol") == 303
            done: list[str] = []
            page = threading.Thread(target=lambda: done.append(f"operations {client.get('/operations').status_code}"))
            page.start()
            conn, _ = silent.accept()  # the page's scrape has connected: it now waits for an answer
            done.append(f"login {client.get('/login').status_code}")
            conn.close()  # the worker goes away: the page says so and answers
            page.join(30)
    assert done == ["login 200", "operations 200"]


def test_only_a_few_password_checks_run_at_once(config: Path, store: ResultStore,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Argon2 is expensive on purpose (64 MiB, tens of ms each): a burst of logins queues for
    ``dashboard.login_concurrency`` slots instead of running all at once."""
    running, most = [0], [0]
    lock, gate = threading.Lock(), threading.Event()
    real = Accounts.authenticate

    def counted(self: Accounts, name: str, password: str) -> object:
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        gate.wait(0.2)  # hold the slot a while, so that the others pile up behind it
        try:
            return real(self, name, password)
        finally:
            with lock:
                running[0] -= 1

    monkeypatch.setattr(Accounts, "authenticate", counted)
    settings = get_settings(config, {"dashboard": {"login_concurrency": 2}})
    with TestClient(create_app(settings, store, secret="k" * 64), base_url=LOOPBACK, follow_redirects=False) as c:
        m = re.search(r'name="csrf" value="([^"]+)"', c.get("/login").text)
        assert m
        codes: list[int] = []
        posts = [threading.Thread(target=lambda i=i: codes.append(c.post("/login", data={
            "username": f"user{i}", "password": "wrong", "csrf": m[1]}).status_code)) for i in range(5)]
        for t in posts:
            t.start()
        for t in posts:
            t.join(60)
    assert codes == [401] * 5 and most[0] == 2


def test_a_result_shows_the_side_of_its_threshold_and_its_models_card(tmp_path: Path) -> None:
    import json

    import onnx
    from onnx import TensorProto, helper

    from cxr_contract.faithfulness import encode_reference

    x = helper.make_tensor_value_info("image", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("probability", TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Identity", ["image"], ["probability"])], "g", [x], [y])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    helper.set_model_props(proto, {"name": "cxr", "version": "1.0", "input_size": "64", "threshold": "0.49918",
                                   "weights_sha256": "ab" * 32, "prevalence": "0.5",
                                   "model_card": json.dumps({"card": "model_card.md", "test_auc": 0.91}),
                                   "faithfulness_cutoff": "2.5",
                                   "faithfulness_reference": encode_reference(np.zeros((64, 64), np.float32))})
    (tmp_path / "models").mkdir()
    onnx.save(proto, tmp_path / "models" / "cxr-1.0.onnx")
    path = tmp_path / "worker.toml"
    path.write_text(f'[spool]\ndir = "{tmp_path / "spool"}"\n[audit]\npath = "{tmp_path / "audit.jsonl"}"\n'
                    f'[model]\npath = "{tmp_path / "models" / "cxr-1.0.onnx"}"\n')
    settings = get_settings(path)
    store = ResultStore.from_settings(settings)
    Accounts(store).add_user("alice", "reader", PASSWORD)
    new = NewResult(study_instance_uid="1.2.3", series_instance_uid="1.2.3.4", sop_instance_uid="1.2.3.4.5",
                    probability=0.49945, decision="positive", threshold=0.49918, model_name="cxr",
                    model_version="1.0", faithfulness=3.1)
    rid = store.record(new, np.full((64, 64), 0.5, np.float32), np.ones((4, 4), np.float32))
    with TestClient(create_app(settings, store, secret="k" * 64), base_url=LOOPBACK, follow_redirects=False) as client:
        assert login(client) == 303
        page = client.get(f"/results/{rid}").text
    store.close()
    # 0.499 against 0.50 read as below the threshold for a positive answer.
    assert ">0.4995</strong>" in page and "<span>0.4992</span>" in page
    assert "Model card" in page and "test auc" in page and "assumed prevalence" in page and "50%" in page
    # the stored score with its verdict and unit, judged by the model's own cut-off
    assert "above chance: logit drop 3.10, cut-off 2.50" in page
