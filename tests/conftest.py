"""Fixtures that start real peers on loopback: DCMTK storescp as the PACS, the worker
as a subprocess, and a small ONNX model exported by the trainer itself."""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.helpers import Storescp, free_port, wait_port

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Everything under tests/integration is marked ``integration``, so that
    ``pytest -m "not integration"`` (``make test-unit``) cannot pick up a slow test by omission."""
    integration = ROOT / "tests" / "integration"
    for item in items:
        if item.path.is_relative_to(integration):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(autouse=True, scope="module")
def _release_tensorflow_memory() -> Iterator[None]:
    """After each module, drop Keras' global graph state: models built in-process by one module's
    fits and exports otherwise stay allocated until the process ends."""
    yield
    if "keras" in sys.modules:
        import keras

        keras.backend.clear_session()
    gc.collect()


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 64-px ResNet-50 run trained for one epoch on 60 phantoms (``cxr-train fit``'s run
    folder), for the tests that export it. With ``CXR_TEST_MODEL`` set, the run folder beside
    that model (``run/``) is copied instead of trained, when it is there: export writes
    into the run's metrics.json, and a shared cache must not change under other sessions."""
    import shutil

    base = tmp_path_factory.mktemp("model")
    cached = os.environ.get("CXR_TEST_MODEL")
    if cached and (Path(cached).parent / "run" / "model.keras").is_file():
        shutil.copytree(Path(cached).parent / "run", base / "run", ignore=shutil.ignore_patterns("checkpoints"))
        return base / "run"
    from trainer.config import load_config
    from trainer.fit import fit
    from trainer.phantoms import write_phantoms

    # 128-px phantoms, as the tests send them, and enough of them (42 in training) for the
    # out-of-distribution gate's density to pass phantoms it has not seen: with 16 at 64 px
    # the gate held every unseen phantom out (1 epoch still; the model need not be good).
    write_phantoms(base / "data", 60, size=128, seed=11)
    # Deterministic ops: the same model on every run of the suite on this kind of machine, so
    # a test on its answers (int8 against fp32, the gate on unseen phantoms) cannot pass or
    # fail by the luck of one training run.
    cfg = load_config(None, {"model": {"image_size": 64, "weights": "none"},
                             "train": {"epochs": 1, "batch_size": 8, "deterministic": True},
                             "evaluate": {"bootstrap": 10}})
    fit(base / "data", base / "run", cfg, verbose=0)
    return base / "run"


@pytest.fixture(scope="session")
def onnx_model(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """:func:`trained_run` exported and verified by ``cxr-train export`` (contract version 2:
    ``logit`` and ``ood_score`` too): the worker's tests need a model that follows the
    contract, not a good one, so a failed saliency sanity check is recorded, not refused.
    ``CXR_TEST_MODEL`` may name one exported earlier, to save a minute when iterating locally;
    ``CXR_TEST_PRECISION=int8`` (or fp16) exports the run at that precision instead, so the
    worker's tests run against a reduced-precision model."""
    precision = os.environ.get("CXR_TEST_PRECISION", "fp32")
    cached = os.environ.get("CXR_TEST_MODEL")
    if cached and Path(cached).is_file() and precision == "fp32":
        return Path(cached)
    from trainer.export import export

    run = request.getfixturevalue("trained_run")
    model = tmp_path_factory.mktemp("onnx") / f"model-{precision}.onnx"
    export(run, model, threshold=0.5, version="test-1", allow_insensitive_saliency=True, precision=precision)
    return model


@pytest.fixture
def pacs(tmp_path: Path) -> Iterator[Storescp]:
    scp = Storescp(free_port(), tmp_path / "pacs")
    scp.start()
    yield scp
    scp.stop()


@dataclass
class WorkerProcess:
    """``cxr-worker serve`` as a subprocess with its own config and spool."""

    config: Path
    port: int
    spool: Path
    log: Path
    metrics_port: int = 0
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {**os.environ, **self.env}
        self._log = open(self.log, "ab")  # noqa: SIM115
        self.proc = subprocess.Popen([sys.executable, "-m", "worker.cli", "serve", "--config", str(self.config)],
                                     stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        wait_port(self.port, 60)

    def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        try:
            code = self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.send_signal(signal.SIGUSR1)  # faulthandler: thread stacks into the log
            time.sleep(1)
            self.proc.kill()
            self.proc.wait(10)
            tail = "\n".join(self.log_lines()[-60:])
            raise AssertionError(f"worker did not stop within 60 s after signal {sig}; log tail:\n{tail}") from None
        self.proc = None
        self._log.close()
        return code

    def log_lines(self) -> list[str]:
        return self.log.read_text(errors="replace").splitlines() if self.log.exists() else []


def write_worker_config(config: Path, *, port: int, spool: Path, model: Path, metrics_port: int, audit: Path,
                        destinations: list[str], extra: str = "", dicom_extra: str = "", gsps: bool = False,
                        output_extra: str = "") -> Path:
    """The worker configuration the integration tests start from: loopback, a short batch
    wait, small phantoms selected, fast retries; ``extra`` adds sections (TOML) after it.

    The GSPS (``output.gsps``, on by default) is off unless ``gsps``: most tests count an SC
    and an SR per image; those about the GSPS (test_orthanc, test_stow) turn it on."""
    dests = ", ".join(f'"{d}"' for d in destinations)
    config.write_text(f"""
[dicom]
ae_title = "CXR-GRADCAM"
bind = "127.0.0.1"
port = {port}
{dicom_extra}
[spool]
dir = "{spool}"
reserve_mb = 0
[model]
path = "{model}"
batch_wait_ms = 100
[select]
min_size = 32
[metrics]
port = {metrics_port}
[audit]
path = "{audit}"
[output]
gsps = {str(gsps).lower()}
{output_extra}
[send]
destinations = [{dests}]
retry_initial_s = 0.5
retry_max_interval_s = 2
{extra}
""")
    return config


@pytest.fixture
def make_worker(tmp_path: Path, onnx_model: Path) -> Iterator[object]:
    started: list[WorkerProcess] = []

    def factory(destinations: list[str], extra: str = "", port: int | None = None,
                metrics_port: int = 0, dicom_extra: str = "", gsps: bool = False, home: str = "",
                output_extra: str = "") -> WorkerProcess:
        """``home``: a folder of its own for the spool, audit trail and log (a second replica)."""
        port = port or free_port()
        base = tmp_path / home
        base.mkdir(exist_ok=True)
        spool = base / "spool"
        config = write_worker_config(base / f"worker-{port}.toml", port=port, spool=spool, model=onnx_model,
                                     metrics_port=metrics_port, audit=base / "audit.jsonl",
                                     destinations=destinations, extra=extra, dicom_extra=dicom_extra, gsps=gsps,
                                     output_extra=output_extra)
        w = WorkerProcess(config, port, spool, base / "worker.log", metrics_port=metrics_port)
        w.start()
        started.append(w)
        return w

    yield factory
    for w in started:
        if w.proc is not None:
            w.proc.kill()
            w.proc.wait(10)
