"""Lost C-STORE responses on the worker's sender (not a test): ``worker.send.store`` delivers a
large and a small object per association to DCMTK's storescp (Nagle off on its side, as
Orthanc's ``TcpNoDelay`` default), from several sender threads at once while other processes
keep the cores busy (as the worker's inference does), and counts the rounds in which the
sender got no answer for an object the PACS had stored: pynetdicom's association reactor
took the response (``worker.compat.keep_responses_for_the_sender``). Each variant runs in its
own process, since the guard is process-wide:

- Nagle on, pynetdicom as it is (the sender without the guard and with Nagle);
- Nagle off, pynetdicom as it is (faster, and responses lost);
- Nagle off with the guard (the worker now).

The DIMSE timeout is 5 s here (60 s by default), so a lost response costs 5 s.

Usage: python benchmarks/bench_send_race.py [--rounds 100] [--senders 4] [--busy 2] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import report, summary  # noqa: E402

VARIANTS = {"nagle_on": (False, False), "nagle_off": (True, False), "nagle_off_guard": (True, True)}
STORESCP = "/usr/bin/storescp"


def objects() -> list[Path]:
    """A real CR chest (JPEG 2000, 0.7 MB, like the worker's 0.5 MB SC: tens of PDUs) and a 10 KB MR
    (like its SR): a round's large and small object."""
    from pydicom.data import get_testdata_file

    return [Path(str(get_testdata_file(name))) for name in ("RG1_J2KI.dcm", "MR_small.dcm")]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def child(variant: str, rounds: int, senders: int) -> dict[str, Any]:
    """One variant, in this process: ``senders`` threads of ``rounds`` associations each."""
    from worker import compat, send
    from worker.config import Destination, SendSection

    nodelay, guard = VARIANTS[variant]
    if not nodelay:  # the handler looked up at each association: DCMTK's and pynetdicom's default
        send.no_delay = lambda event: None  # type: ignore[assignment]
    if not guard:  # mark the guard installed without installing it: pynetdicom as it is
        compat._original_serve = object()  # type: ignore[assignment]
    port = free_port()
    with tempfile.TemporaryDirectory() as out:
        scp = subprocess.Popen([STORESCP, "-aet", "PACS", "-od", out, "+xa", str(port)],
                               env={**os.environ, "TCP_NODELAY": "1"},
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            time.sleep(0.5)
            settings = SendSection(destinations=[f"PACS@127.0.0.1:{port}"], dimse_timeout=5, acse_timeout=60)
            dest = Destination.parse(f"PACS@127.0.0.1:{port}")
            paths = objects()
            seconds: list[float] = []
            lost: list[str] = []

            def sender(k: int) -> None:
                for i in range(rounds):
                    t = time.perf_counter()
                    results = send.store(dest, paths, settings, "CXR")
                    seconds.append(time.perf_counter() - t)
                    lost.extend(f"{k}/{i}: {err}" for err in results if err is not None)

            threads = [threading.Thread(target=sender, args=(k,)) for k in range(senders)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        finally:
            scp.terminate()
            scp.wait(10)
    return {"rounds": rounds * senders, "lost": len(lost), "examples": lost[:3], **summary(seconds)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=100, help="associations per sender thread")
    parser.add_argument("--senders", type=int, default=4)
    parser.add_argument("--busy", type=int, default=2, help="processes that keep a core busy meanwhile")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each variant, interleaved")
    parser.add_argument("--child", choices=sorted(VARIANTS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.rounds, args.senders)))
        return
    if not Path(STORESCP).is_file():
        print(f"needs DCMTK's storescp at {STORESCP}; nothing measured")
        return
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in VARIANTS}
    for _ in range(args.repeat):
        for variant in VARIANTS:
            busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.busy)]
            try:
                proc = subprocess.run([sys.executable, __file__, "--child", variant, "--rounds", str(args.rounds),
                                       "--senders", str(args.senders)], capture_output=True, text=True, check=True)
            finally:
                for p in busy:
                    p.kill()
            runs[variant].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    rows = [("setup", f"{args.senders} senders x {args.rounds} associations (0.7 MB CR + 10 KB MR each), "
                      f"{args.busy} busy processes, DIMSE timeout 5 s, {args.repeat} runs per variant")]
    for variant, got in runs.items():
        lost = [r["lost"] for r in got]
        rows.append((variant, f"responses lost {sum(lost)} in {sum(r['rounds'] for r in got)} associations "
                              f"(per run {lost}); round p50 {statistics.median(r['p50_ms'] for r in got):.0f} ms"))
    report("bench_send_race", rows, {"variants": runs, "args": vars(args)})


if __name__ == "__main__":
    main()
