"""The results store on a real PostgreSQL server that the test starts (Debian ``postgresql``).

The store tests of tests/unit/worker/store/test_results.py run again here against PostgreSQL (each on a
fresh database), plus what only a server shows: several processes migrating at once.
PostgreSQL refuses to run as root, so as root the cluster runs as the ``postgres`` user
(or ``nobody``) in a folder it owns.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from itertools import count
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.helpers import free_port, wait_port
from tests.unit.worker.store.test_results import (  # noqa: F401 (collected again here, with the PostgreSQL store below)
    new,
    test_feedback_history_is_kept_and_the_latest_row_is_current,
    test_passwords_are_argon2id_and_wrong_ones_fail,
    test_record_writes_preview_grid_and_row,
    test_retention_sweep_deletes_rows_feedback_and_files_together,
    test_worklist_filters_and_search_take_values_as_data,
)
from worker.store import ResultStore, Worklist
from worker.store.schema import head_revision

pytestmark = pytest.mark.integration


def _bin(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    if not found:
        if os.environ.get("CI") == "true":
            pytest.fail(f"PostgreSQL's {name} not found (Debian package postgresql)")
        pytest.skip(f"PostgreSQL's {name} not found (Debian package postgresql)")
    return found[-1]


def _as_owner(owner: str | None, cmd: list[str]) -> list[str]:
    return ["runuser", "-u", owner, "--", *cmd] if owner else cmd


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    """A throw-away cluster on a free loopback port; yields the URL prefix (no database name)."""
    initdb, pg_ctl = _bin("initdb"), _bin("pg_ctl")
    owner = None
    if os.geteuid() == 0:
        owner = "postgres" if _user_exists("postgres") else "nobody"
    root = Path(tempfile.mkdtemp(prefix="cxr-pg-"))  # not under pytest's root-only tmp folders
    data = root / "data"
    if owner:
        shutil.chown(root, owner)
    port = free_port()
    subprocess.run(_as_owner(owner, [initdb, "-D", str(data), "-U", "cxr", "--auth=trust", "-E", "UTF8",
                                     "--no-sync"]), check=True, capture_output=True, timeout=120)
    subprocess.run(_as_owner(owner, [pg_ctl, "-D", str(data), "-l", str(root / "server.log"), "-w", "-t", "60",
                                     "-o", f"-h 127.0.0.1 -p {port} -k {root} -F", "start"]),
                   check=True, capture_output=True, timeout=90)
    try:
        wait_port(port, 30)
        yield f"postgresql+psycopg://cxr@127.0.0.1:{port}"
    finally:
        subprocess.run(_as_owner(owner, [pg_ctl, "-D", str(data), "-m", "immediate", "-w", "stop"]),
                       capture_output=True, timeout=60)
        shutil.rmtree(root, ignore_errors=True)


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


_databases = count()


def _create_database(server: str) -> str:
    import psycopg

    name = f"t{next(_databases)}"
    with psycopg.connect(server.replace("postgresql+psycopg", "postgresql") + "/postgres", autocommit=True) as c:
        c.execute(f"CREATE DATABASE {name}")  # a name we made, never input
    return f"{server}/{name}"


@pytest.fixture
def store(server: str, tmp_path: Path) -> Iterator[ResultStore]:
    s = ResultStore(_create_database(server), tmp_path / "media")
    assert s.engine.dialect.name == "postgresql"
    yield s
    s.close()


def test_several_workers_starting_at_once_migrate_one_schema(server: str, tmp_path: Path) -> None:
    url = _create_database(server)
    code = ("import sys, numpy as np; from worker.store import ResultStore;"
            "from tests.unit.worker.store.test_results import new;"
            "ResultStore(sys.argv[1], sys.argv[2]).record(new(sys.argv[3]), np.zeros((10, 10)), np.zeros((2, 2)))")
    # The StatefulSet's workers and the dashboard, all starting at once: separate processes.
    procs = [subprocess.Popen([sys.executable, "-c", code, url, str(tmp_path / "media"), f"1.9.{i}"], cwd=ROOT,
                              stderr=subprocess.PIPE, text=True) for i in range(4)]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    store = ResultStore(url, tmp_path / "media")
    assert store.worklist(Worklist())[1] == 4
    with store.engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT version_num FROM alembic_version").scalar() == head_revision()
    store.close()
