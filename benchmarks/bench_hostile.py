"""Hostile-peer benchmark (not a test): the hostile-peer attacks at full size against a live
``cxr-worker serve``, with the worker's peak resident memory above its warm level for each.

Goal: the peak stays within ~1.5 GiB above warm, whatever a peer sends, within the limits
configured (the defaults of config/worker.toml here). Each scenario's peak is read from
/proc/<pid>/status VmHWM after resetting it (/proc/<pid>/clear_refs).

Usage: python benchmarks/bench_hostile.py [--model PATH] [--quick]
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import report  # noqa: E402
from tests.helpers import (  # noqa: E402
    CR_CX,
    VERIFICATION_CX,
    associate,
    command,
    free_port,
    jp2_claiming,
    p_data,
    raw,
    rss_kb,
    send_fragments,
    wait_for,
    wait_port,
)

FRAGMENT = 200_000


class Worker:
    def __init__(self, work: Path, model: Path, pacs_port: int) -> None:
        self.port, self.spool = free_port(), work / "spool"
        self.config = work / "worker.toml"
        # The defaults of config/worker.toml for every limit; only paths and ports are ours.
        self.config.write_text(f"""
[dicom]
bind = "127.0.0.1"
port = {self.port}
[spool]
dir = "{self.spool}"
reserve_mb = 0
[model]
path = "{model}"
[metrics]
port = 0
[audit]
path = "{work / 'audit.jsonl'}"
[send]
destinations = ["PACS@127.0.0.1:{pacs_port}"]
""")
        self.log = open(work / "worker.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen([sys.executable, "-m", "worker.cli", "serve", "--config", str(self.config)],
                                     stdout=self.log, stderr=subprocess.STDOUT, cwd=ROOT)
        wait_port(self.port, 120)
        time.sleep(2)  # let the model's first allocations settle before calling it warm

    def reset_peak(self) -> None:
        Path(f"/proc/{self.proc.pid}/clear_refs").write_text("5")

    def peak_mb(self, warm_kb: int) -> float:
        return (rss_kb(self.proc.pid, "VmHWM") - warm_kb) / 1024

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(120)
        self.log.close()


def never_complete(worker: Worker, pdus: list[bytes], total: int) -> dict[str, Any]:
    assoc = associate(worker.port)
    *first, repeated = pdus
    for pdu in first:
        raw(assoc).sendall(pdu)
    sent = send_fragments(raw(assoc), repeated, total, stop=lambda: assoc.is_aborted or not assoc.is_established)
    wait_for(lambda: assoc.is_aborted or not assoc.is_established, 60, "the abort")
    return {"offered_mb": total / 2**20, "sent_before_abort_mb": round(sent / 2**20, 1), "aborted": True}


def deflate_bomb(path: Path, inflated: int) -> None:
    """A CR file in Deflated Explicit VR Little Endian whose private OB element of zeros
    inflates to ``inflated`` bytes; written a chunk at a time (about 1 MB on disk)."""
    from pydicom.filewriter import write_file_meta_info
    from pydicom.uid import DeflatedExplicitVRLittleEndian, generate_uid
    from pynetdicom.dsutils import encode

    from trainer.dicom_phantoms import cr_dataset

    ds = cr_dataset(np.zeros((64, 64), np.uint16))
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    before, after = ds[:0x00090000], ds[0x00090000:]  # the private group goes between
    deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    with open(path, "wb") as f:
        f.write(b"\0" * 128 + b"DICM")
        write_file_meta_info(f, ds.file_meta)  # type: ignore[arg-type]
        f.write(deflater.compress(encode(before, False, True) or b""))
        f.write(deflater.compress(b"\x09\x00\x10\x00LO\x04\x00BOMB"))
        f.write(deflater.compress(b"\x09\x00\x10\x10OB\x00\x00" + inflated.to_bytes(4, "little")))
        zeros = b"\0" * (1 << 24)
        for _ in range(inflated >> 24):
            f.write(deflater.compress(zeros))
        f.write(deflater.compress(encode(after, False, True) or b""))
        f.write(deflater.flush())


def store_files(worker: Worker, paths: list[Path]) -> list[str]:
    """C-STORE each file as it is, from one association per file, all at once."""
    from pynetdicom import _config

    out: list[str] = [""] * len(paths)

    def one(i: int) -> None:
        assoc = associate(worker.port, calling="HOSPITAL")
        try:
            status = assoc.send_c_store(paths[i])
            out[i] = f"0x{status.Status:04X} {status.get('ErrorComment', '')}".strip()
        finally:
            assoc.release()

    _config.STORE_SEND_CHUNKED_DATASET = True
    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(paths))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    _config.STORE_SEND_CHUNKED_DATASET = False
    return out


def scenario(worker: Worker, name: str, run: Callable[[], dict[str, Any]], rows: list[tuple[str, str]],
             data: dict[str, Any]) -> None:
    warm = rss_kb(worker.proc.pid)
    worker.reset_peak()
    started = time.perf_counter()
    outcome = run()
    outcome["seconds"] = round(time.perf_counter() - started, 1)
    outcome["peak_above_warm_mb"] = round(worker.peak_mb(warm), 0)
    data[name] = outcome
    rows.append((name, ", ".join(f"{k}={v}" for k, v in outcome.items())))
    print(rows[-1][0], "->", rows[-1][1], flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path(os.environ.get("CXR_TEST_MODEL",
                                                                           "/work/cache/v1/model.onnx")))
    parser.add_argument("--quick", action="store_true", help="a tenth of the volumes")
    args = parser.parse_args()
    scale = 10 if args.quick else 1
    from pydicom.uid import JPEG2000Lossless
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    from tests.helpers import require_tool
    from trainer.dicom_phantoms import cr_dataset

    rows: list[tuple[str, str]] = []
    data: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        pacs_port = free_port()
        (work / "pacs").mkdir()
        pacs = subprocess.Popen([require_tool("/usr/bin/storescp"), "-aet", "PACS", "-od", str(work / "pacs"),
                                 str(pacs_port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        worker = Worker(work, args.model, pacs_port)
        data["warm_rss_mb"] = round(rss_kb(worker.proc.pid) / 1024)
        try:
            offered = 1536 * 2**20 // scale
            scenario(worker, "200 KB data fragments, no command", lambda: never_complete(
                worker, [p_data(CR_CX, 0x00, b"\0" * FRAGMENT)], offered), rows, data)
            scenario(worker, "command fragments that never end", lambda: never_complete(
                worker, [p_data(VERIFICATION_CX, 0x01, b"\0" * FRAGMENT)], offered), rows, data)
            scenario(worker, "C-ECHO announcing a data set", lambda: never_complete(
                worker, [p_data(VERIFICATION_CX, 0x03, command(0x0030, Verification, True)),
                         p_data(VERIFICATION_CX, 0x00, b"\0" * FRAGMENT)], offered), rows, data)

            bombs = []
            for i in range(3):
                bombs.append(work / f"bomb{i}.dcm")
                deflate_bomb(bombs[-1], 2**30 // scale)
            wire = bombs[0].stat().st_size
            scenario(worker, "3 deflated data sets at once, 1 GiB inflated each", lambda: {
                "wire_kb": wire // 1024, "statuses": store_files(worker, bombs)}, rows, data)

            frame = work / "jp2.dcm"
            from pydicom.encaps import encapsulate

            ds = cr_dataset(np.zeros((512, 512), np.uint16))
            ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
            ds.PixelData = encapsulate([jp2_claiming(20000, 20000)])
            ds["PixelData"].VR = "OB"
            ds.save_as(frame, enforce_file_format=True)

            def quarantined() -> dict[str, Any]:
                statuses = store_files(worker, [frame])
                wait_for(lambda: any((worker.spool / "quarantine").glob("*.reason")), 120, "the quarantine")
                reason = next((worker.spool / "quarantine").glob("*.reason")).read_text().split("\t")[-1].strip()
                return {"wire_kb": frame.stat().st_size // 1024, "statuses": statuses, "quarantined": reason}

            scenario(worker, "JP2 boxes claiming 20000 x 20000 behind 512 x 512", quarantined, rows, data)

            side = 4300 if not args.quick else 2150
            yy, xx = np.mgrid[0:side, 0:side]
            big = cr_dataset(((yy + xx) % 4096).astype(np.uint16))
            del yy, xx
            big.compress(JPEG2000Lossless)
            images = []
            for i in range(4):
                big.SOPInstanceUID = f"1.2.826.0.1.3680043.10.999.{i + 1}"
                images.append(work / f"big{i}.dcm")
                big.save_as(images[-1], enforce_file_format=True)
            del big

            def batch() -> dict[str, Any]:
                statuses = store_files(worker, images)
                wait_for(lambda: len(list((work / "pacs").iterdir())) >= 8, 600, "the results")
                import pydicom

                sizes = [pydicom.dcmread(p, stop_before_pixels=True) for p in (work / "pacs").iterdir()]
                sc = [f"{d.Rows}x{d.Columns}" for d in sizes if "Rows" in d]
                return {"wire_kb": images[0].stat().st_size // 1024, "statuses": sorted(set(statuses)),
                        "sc_sizes": sorted(set(sc))}

            scenario(worker, f"4 JPEG 2000 CR of {side} x {side} in one batch", batch, rows, data)

            def doors() -> dict[str, Any]:
                for _ in range(80):
                    with socket.create_connection(("127.0.0.1", worker.port), timeout=5):
                        pass
                    time.sleep(0.05)
                other = associate(worker.port, source="127.0.0.2", calling="PACS")
                ok = other.is_established
                if ok:
                    other.release()
                return {"empty_connections": 80, "pacs_from_127.0.0.2_associates": ok}

            scenario(worker, "80 empty connections, then a PACS on another address", doors, rows, data)
        finally:
            worker.stop()
            pacs.terminate()
            pacs.wait(10)
    report("bench_hostile", rows, data)


if __name__ == "__main__":
    main()
