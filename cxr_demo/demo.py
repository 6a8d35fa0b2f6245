"""``make demo``: the worker serving a PACS, end to end, on this machine.

1. Builds a demo model when none is configured (phantoms, a short CPU fit, evaluate,
   export) -- "demo model trained on synthetic phantoms -- not for clinical use".
   A later run reuses it.
2. Starts the worker on its default config (AE CXR-GRADCAM, port 11112) and the PACS:
   Orthanc when installed (it routes stable CR studies to the worker by Lua), else a
   built-in receiving SCP that the demo sends through.
3. Sends the real CR chest from pydicom-data and two phantom studies (one with an
   opacity, one without), waits for the results, prints a table and writes PNG
   previews of the Secondary Captures.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom import Dataset

ROOT = Path(__file__).resolve().parent.parent
DEMO_LABEL = "demo model trained on synthetic phantoms - not for clinical use"


def build_demo_model(work: Path, console: Any) -> Path:
    """Phantoms -> fit -> evaluate -> export, reusing whatever an earlier run left."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    from trainer.config import load_config
    from trainer.evaluate import evaluate
    from trainer.export import export
    from trainer.fit import fit
    from trainer.phantoms import write_phantoms

    model = work / "model.onnx"
    if model.is_file():
        return model
    console.rule(f"Building the {DEMO_LABEL} (a few minutes on a CPU)")
    data, run = work / "phantoms", work / "run"
    if not (data / "test.csv").is_file():
        # At the size the demo studies have (512 px): the trainer brings them to the model size
        # as the worker does, so unseen phantoms look like the training ones to the OOD gate.
        write_phantoms(data, 400, size=512, seed=4)
    if not (run / "model.keras").is_file():
        fit(data, run, load_config("demo-train"), verbose=1)
    if not (run / "metrics.json").is_file():
        metrics = evaluate(run)
        console.print(f"phantom test AUC {metrics['metrics']['auc']:.3f}, "
                      f"pointing game {metrics['localisation'].get('pointing_game', float('nan')):.2f}")
    export(run, model, version="demo-1")
    return model


def demo_studies(work: Path) -> list[tuple[str, Path]]:
    """The real CR chest and two phantom studies, as files to send."""
    from pydicom.data import get_testdata_file

    from trainer.dicom_phantoms import cr_dataset
    from trainer.phantoms import make_phantom

    out = work / "studies"
    out.mkdir(parents=True, exist_ok=True)
    files = [("real CR chest (RG1_UNCR)", Path(get_testdata_file("RG1_UNCR.dcm")))]
    for label, positive, seed in (("phantom with opacity", True, 21), ("phantom without opacity", False, 22)):
        path = out / f"{label.replace(' ', '-')}.dcm"
        if not path.is_file():
            image, mask = make_phantom(np.random.default_rng(seed), 512, positive)
            while positive and mask.mean() < 0.03:  # show a clearly visible opacity
                seed += 100
                image, mask = make_phantom(np.random.default_rng(seed), 512, positive)
            cr_dataset(image, patient_id=f"DEMO-{seed}", patient_name=f"Demo^Phantom{seed}").save_as(
                path, enforce_file_format=True)
        files.append((label, path))
    return files


def c_store(host: str, port: int, ae_title: str, paths: list[Path]) -> None:
    from pynetdicom import AE

    datasets = [pydicom.dcmread(p) for p in paths]
    ae = AE(ae_title="DEMO-MODALITY")
    for sop_class, syntax in {(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID) for ds in datasets}:
        ae.add_requested_context(sop_class, syntax)
    assoc = ae.associate(host, port, ae_title=ae_title)
    if not assoc.is_established:
        raise SystemExit(f"demo: cannot associate with {ae_title}@{host}:{port}")
    try:
        for ds in datasets:
            status = assoc.send_c_store(ds)
            if getattr(status, "Status", None) != 0:
                raise SystemExit(f"demo: C-STORE to {ae_title} failed: {status}")
    finally:
        assoc.release()


def sr_result(sr: Dataset) -> tuple[float, str]:
    probability, presence = float("nan"), "?"
    stack = list(sr.ContentSequence)
    while stack:
        item = stack.pop()
        stack += list(item.get("ContentSequence", []))
        name = item.ConceptNameCodeSequence[0].CodeValue if "ConceptNameCodeSequence" in item else ""
        if item.ValueType == "NUM" and name == "PNEUMONIA-PROB":
            probability = float(item.MeasuredValueSequence[0].NumericValue)
        if item.ValueType == "CODE" and name == "233604007":
            presence = str(item.ConceptCodeSequence[0].CodeMeaning)
    return probability, presence


def main(argv: list[str] | None = None) -> int:
    from rich.console import Console
    from rich.table import Table

    from cxr_demo.orthanc import OrthancPACS, find_orthanc
    from worker.config import Hl7Destination, default_config, get_settings, parse_destination

    p = argparse.ArgumentParser(prog="cxr-demo", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--work", type=Path, default=ROOT / "var" / "demo")
    p.add_argument("--model", type=Path, help="an exported model (default: build the demo model)")
    p.add_argument("--keep-running", action="store_true", help="keep worker and PACS running until Ctrl-C")
    p.add_argument("--timeout", type=float, default=300.0)
    p.add_argument("--ris", metavar="mllp://HOST:PORT", action="append", default=[],
                   help="also send an HL7 ORU^R01 per image to this RIS (beside any in the config)")
    args = p.parse_args(argv)
    console = Console()
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    settings = get_settings(default_config())
    model = args.model or settings.model.path or build_demo_model(work / "model", console)
    ris = [*(str(d) for d in settings.send.destinations if isinstance(d, Hl7Destination)),
           *(str(parse_destination(url)) for url in args.ris)]  # as the worker logs them

    orthanc_bin = find_orthanc()
    worker_port = settings.dicom.port
    procs: list[Any] = []
    pacs: OrthancPACS | None = None
    previews = work / "previews"
    previews.mkdir(exist_ok=True)
    try:
        if orthanc_bin:
            pacs = OrthancPACS(work / "orthanc", settings.dicom.ae_title, worker_port)
            destination = f"{pacs.ae_title}@127.0.0.1:{pacs.dicom_port}"
            console.print(f"PACS: Orthanc (DICOM {pacs.dicom_port}, web {pacs.url})")
        else:
            received = work / "received"
            received.mkdir(exist_ok=True)
            scp_port = worker_port + 1
            procs.append(subprocess.Popen([sys.executable, "-m", "cxr_demo.receiver", str(received), str(scp_port)]))
            destination = f"DEMO-PACS@127.0.0.1:{scp_port}"
            console.print(f"PACS: built-in receiving SCP on port {scp_port} (Orthanc is not installed)")
        log = open(work / "worker.log", "ab")  # noqa: SIM115
        worker = subprocess.Popen(
            [sys.executable, "-m", "worker.cli", "serve", "--config", str(default_config()),
             "--model", str(model), "--spool", str(work / "spool"), "--destination", destination,
             *(arg for url in ris for arg in ("--destination", url))],
            stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=dashboard_env(work, settings))
        procs.append(worker)
        dashboard_url, demo_password = start_dashboard(work, settings, procs, ROOT)
        if pacs is not None:
            pacs.start()
        time.sleep(3)
        if worker.poll() is not None:
            console.print(f"[red]the worker exited; see {work / 'worker.log'}[/red]")
            return 1
        console.print(f"worker: {settings.dicom.ae_title} on port {worker_port}, log {work / 'worker.log'}")
        studies = demo_studies(work)
        started = time.monotonic()
        if pacs is not None:
            c_store("127.0.0.1", pacs.dicom_port, pacs.ae_title, [f for _, f in studies])
        else:
            c_store("127.0.0.1", worker_port, settings.dicom.ae_title, [f for _, f in studies])
        table = Table(title="cxr-gradcam demo (" + DEMO_LABEL + ")" if model == work / "model" / "model.onnx"
                      else "cxr-gradcam demo")
        for col in ("image", "probability", "decision", "outputs", *(["RIS (ORU^R01)"] if ris else []), "seconds"):
            table.add_column(col)
        rows: list[tuple[str, Dataset, list[str]]] = []
        for label, path in studies:
            src = pydicom.dcmread(path, stop_before_pixels=True)
            sc_png, sr, seconds = wait_result(src, pacs, work, args.timeout, started)
            if sr is None:
                rows.append((label, src, [label, "-", "no result", "-", f"{seconds:.1f}"]))
                continue
            probability, presence = sr_result(sr)
            name = previews / f"{label.replace(' ', '-').replace('(', '').replace(')', '')}.png"
            if sc_png is not None:
                name.write_bytes(sc_png)
            verdict = {"Present": "pneumonia", "Absent": "no pneumonia"}.get(
                presence, "withheld: outside the training distribution")  # SR finding Not Evaluated
            rows.append((label, src, [label, "-" if probability != probability else f"{probability:.3f}", verdict,
                                      "", f"{seconds:.1f}"]))
        time.sleep(2)  # the GSPS and the ORU leave in the same round as the SR: let them land
        sent = sent_to_ris(work / "worker.log", ris)
        for _, src, cells in rows:
            if cells[3] == "":
                cells[3] = " + ".join(outputs_arrived(src, pacs, work)) or "-"
            if ris:
                uid = str(src.SOPInstanceUID)
                cells.insert(4, "acknowledged (AA)" if uid in sent else "not acknowledged" if cells[2] != "no result"
                             else "-")
            table.add_row(*cells)
        console.print(table)
        console.print(f"PNG previews of the Secondary Captures: {previews}")
        if pacs is not None:
            console.print(f"Browse the study in Orthanc: {pacs.url}/app/explorer.html")
        if dashboard_url:
            console.print(f"Review dashboard: {dashboard_url}  (login: demo / {demo_password})"
                          + ("" if args.keep_running else "; add --keep-running to keep it up"))
        if args.keep_running:
            console.print("serving; Ctrl-C stops")
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
            signal.sigwait({signal.SIGINT, signal.SIGTERM})
        return 0
    except KeyboardInterrupt:
        return 130
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        if pacs is not None:
            pacs.stop()


def dashboard_env(work: Path, settings: Any) -> dict[str, str]:
    """Worker and dashboard share the demo's spool (the results database) and the review link."""
    return {**os.environ, "CXR_SPOOL__DIR": str(work / "spool"),
            "CXR_DASHBOARD__PUBLIC_URL": f"http://{settings.dashboard.bind}:{settings.dashboard.port}"}


def start_dashboard(work: Path, settings: Any, procs: list[Any], root: Path) -> tuple[str, str]:
    """``cxr-worker dashboard`` beside the worker, with a ``demo`` reader whose password is new
    each run; ("", "") when it cannot start (the demo goes on without it)."""
    import secrets

    from worker.config import default_config

    password = secrets.token_urlsafe(9)
    env = dashboard_env(work, settings)
    config = ["--config", str(default_config())]
    added = subprocess.run([sys.executable, "-m", "worker.cli", "user", "add", "demo", "--role", "admin", *config],
                           input=password + "\n", text=True, capture_output=True, env=env, cwd=root, timeout=120)
    if added.returncode != 0:
        return "", ""
    log = open(work / "dashboard.log", "ab")  # noqa: SIM115
    procs.append(subprocess.Popen([sys.executable, "-m", "worker.cli", "dashboard", *config],
                                  stdout=log, stderr=subprocess.STDOUT, cwd=root, env=env))
    return env["CXR_DASHBOARD__PUBLIC_URL"], password


def wait_result(src: Dataset, pacs: Any, work: Path, timeout: float, started: float
                ) -> tuple[bytes | None, Dataset | None, float]:
    """(SC preview PNG, SR, seconds since the studies were sent) for one source image."""
    import io

    deadline = started + timeout
    while time.monotonic() < deadline:
        if pacs is not None:
            series = pacs.series_of_study(str(src.StudyInstanceUID))
            sr_s = [s for s in series if s["MainDicomTags"].get("Modality") == "SR"]
            sc_s = [s for s in series if s["MainDicomTags"].get("SeriesDescription") == "AI Grad-CAM Pneumonia"]
            for s in sr_s:
                for inst in s["Instances"]:
                    sr = pydicom.dcmread(io.BytesIO(pacs.get(f"/instances/{inst}/file")))
                    refs = {str(e.ReferencedSOPInstanceUID) for ev in sr.CurrentRequestedProcedureEvidenceSequence
                            for se in ev.ReferencedSeriesSequence for e in se.ReferencedSOPSequence}
                    if str(src.SOPInstanceUID) in refs and sc_s:
                        sc_id = next(i for s2 in sc_s for i in s2["Instances"]
                                     if pacs.get(f"/instances/{i}/simplified-tags").get("SOPInstanceUID") in refs)
                        return pacs.get(f"/instances/{sc_id}/preview"), sr, time.monotonic() - started
        else:
            for f in (work / "received").glob("*.dcm"):
                ds = pydicom.dcmread(f)
                if ds.Modality == "SR" and str(src.SOPInstanceUID) in str(ds.CurrentRequestedProcedureEvidenceSequence):
                    return _local_preview(work, ds), ds, time.monotonic() - started
        time.sleep(1.0)
    return None, None, time.monotonic() - started


#: How each output is recognised in the PACS: SC by its series description (its Modality is OT),
#: SR and GSPS by Modality.
OUTPUT_NAMES = (("SC", "SeriesDescription", "AI Grad-CAM Pneumonia"), ("SR", "Modality", "SR"),
                ("GSPS", "Modality", "PR"))


def outputs_arrived(src: Dataset, pacs: Any, work: Path) -> list[str]:
    """Which of the SC, SR and GSPS for ``src`` the PACS holds (each demo study has one image)."""
    if pacs is not None:
        tags = [s["MainDicomTags"] for s in pacs.series_of_study(str(src.StudyInstanceUID))]
    else:
        tags = [{"SeriesDescription": str(ds.get("SeriesDescription", "")), "Modality": str(ds.Modality)}
                for ds in (pydicom.dcmread(f, stop_before_pixels=True) for f in (work / "received").glob("*.dcm"))
                if ds.StudyInstanceUID == src.StudyInstanceUID]
    return [name for name, key, value in OUTPUT_NAMES if any(t.get(key) == value for t in tags)]


def sent_to_ris(log: Path, ris: list[str]) -> set[str]:
    """SOP Instance UIDs whose ORU^R01 a RIS acknowledged with AA (the worker logs "sent")."""
    import json

    if not ris or not log.is_file():
        return set()
    done = set()
    for line in log.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("message") == "sent" and record.get("destination") in ris:
            done.add(str(record.get("sop_instance_uid")))
    return done


def _local_preview(work: Path, sr: Dataset) -> bytes | None:
    import cv2

    refs = str(sr.CurrentRequestedProcedureEvidenceSequence)
    for f in (work / "received").glob("*.dcm"):
        ds = pydicom.dcmread(f)
        if ds.Modality != "SR" and str(ds.SOPInstanceUID) in refs and ds.get("SamplesPerPixel") == 3:
            ok, png = cv2.imencode(".png", cv2.cvtColor(ds.pixel_array, cv2.COLOR_RGB2BGR))
            return png.tobytes() if ok else None
    return None


if __name__ == "__main__":
    sys.exit(main())
