"""``cxr-worker``: serve | process | echo | dashboard | user."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from worker.config import DicomWebDestination, Hl7Destination, Settings, get_settings, parse_destination
from worker.errors import ConfigError, ModelProbeMismatch, WorkerError
from worker.status import SUCCESS

logger = logging.getLogger("worker")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cxr-worker", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="DICOM C-STORE service (runs until SIGTERM)")
    s.add_argument("--config", type=Path, help="TOML file (see config/worker.toml)")
    s.add_argument("--ae-title")
    s.add_argument("--bind", help="address to listen on")
    s.add_argument("--port", type=int)
    s.add_argument("--model", type=Path)
    s.add_argument("--spool", type=Path)
    s.add_argument("--destination", action="append", metavar="AET@HOST:PORT|URL",
                   help="where results go (repeatable): a C-STORE node or a DICOMweb base URL")

    s = sub.add_parser("process", help="the same pipeline offline, for files or folders")
    s.add_argument("inputs", nargs="+", type=Path)
    s.add_argument("--out", type=Path, required=True)
    s.add_argument("--config", type=Path)
    s.add_argument("--model", type=Path)
    s.add_argument("--png", action="store_true", help="also write PNG previews of the SC")

    s = sub.add_parser("feedback", help="readers' feedback for the trainer")
    fsub = s.add_subparsers(dest="feedback_command", required=True)
    f = fsub.add_parser("export", help="readers' labels and their images, de-identified, for cxr-train prepare")
    f.add_argument("--out", type=Path, required=True, help="a new (or empty) folder")
    f.add_argument("--config", type=Path)
    f.add_argument("--since", help="results answered since this date (2026-01-31) or ISO date-time (UTC)")

    s = sub.add_parser("echo", help="C-ECHO a DICOM node, QIDO-RS a DICOMweb base URL, or connect to an MLLP one")
    s.add_argument("destination", metavar="AET@HOST:PORT|URL")
    s.add_argument("--config", type=Path)
    s.add_argument("--timeout", type=float, default=10.0)

    # -- the dashboard (worker.dashboard) and its accounts --------------------------------
    s = sub.add_parser("dashboard", help="review and operations web application (runs until SIGTERM)")
    s.add_argument("--config", type=Path, help="the worker's TOML file ([dashboard] section)")
    s = sub.add_parser("user", help="dashboard accounts")
    s.add_argument("action", choices=["add", "list", "disable", "enable"])
    s.add_argument("name", nargs="?")
    s.add_argument("--role", choices=["reader", "admin"], default="reader")
    s.add_argument("--config", type=Path)
    return p


def _store(settings: Settings) -> Any:
    from worker.store import ResultStore

    return ResultStore.from_settings(settings)


def _user(args: argparse.Namespace, settings: Settings) -> int:
    """``user add NAME --role R`` reads the password from stdin (a prompt on a terminal);
    ``user disable|enable NAME`` keeps the account but refuses (or allows again) its logins."""
    from worker.dashboard.accounts import Accounts

    accounts = Accounts(_store(settings))
    if args.action == "list":
        for u in accounts.users():
            print("\t".join([u.name, u.role] + (["disabled"] if u.disabled else [])))
        return 0
    if not args.name:
        raise ConfigError(f"user {args.action} needs a NAME")
    if args.action in ("disable", "enable"):  # a disabled account's logins end at their next request
        accounts.set_disabled(args.name, args.action == "disable")
        print(f"user {args.name} {args.action}d")
        return 0
    if sys.stdin.isatty():
        import getpass

        password = getpass.getpass(f"password for {args.name}: ")
        if getpass.getpass("again: ") != password:
            raise ConfigError("the passwords differ")
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    accounts.add_user(args.name, args.role, password)
    print(f"user {args.name} ({args.role}) saved")
    return 0


def _settings(args: argparse.Namespace) -> Settings:
    overrides: dict[str, Any] = {
        "dicom": {"ae_title": getattr(args, "ae_title", None), "port": getattr(args, "port", None),
                  "bind": getattr(args, "bind", None)},
        "model": {"path": getattr(args, "model", None)},
        "spool": {"dir": getattr(args, "spool", None)},
        "send": {"destinations": getattr(args, "destination", None)},
    }
    return get_settings(args.config, overrides)


def _load_model(settings: Settings) -> Any:
    from worker.model import OnnxModel

    if settings.model.path is None:
        raise ConfigError("no model: pass --model PATH, set [model] path, or CXR_MODEL__PATH")
    m = settings.model
    def load(path: Path) -> OnnxModel:
        return OnnxModel(path, providers=m.providers, threads=m.threads, io_binding=m.io_binding,
                         batch_size=m.batch_size, pad_batches=m.pad_batches, probe_check=m.probe_check != "off",
                         site_prevalence=m.site_prevalence, target_sensitivity=m.target_sensitivity)

    try:
        model = load(settings.model.path)
    except ModelProbeMismatch as exc:
        if m.probe_check != "fallback" or m.fallback_path is None:
            raise
        logger.warning("model failed its probe check on this machine; answering with the fallback model "
                       "instead", extra={"reason": str(exc), "fallback": str(m.fallback_path)})
        model = load(m.fallback_path)
        model.fell_back_from = str(settings.model.path)
    info = model.info
    logger.info("model loaded", extra={"model": info.name, "version": info.version,
                                       "input_size": info.input_size, "threshold": info.threshold,
                                       **model.execution, "intended_use": info.intended_use,
                                       "precision": info.precision,
                                       "probe_check": model.probe_check["status"],
                                       **({"fell_back_from": model.fell_back_from} if model.fell_back_from else {}),
                                       "prevalence": info.assumed_prevalence,
                                       "model_prevalence": model.exported_info.prevalence,
                                       "graph_threshold": model.exported_info.threshold})
    logger.info("model card", extra={"model": info.name, "version": info.version,
                                     "card": info.model_card or "none (exported before model cards)"})
    return model


def _expand(inputs: list[Path]) -> list[Path]:
    files: list[Path] = []
    for p in inputs:
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.is_file())
        elif p.is_file():
            files.append(p)
        else:
            raise ConfigError(f"input not found: {p}")
    return files


def _process(args: argparse.Namespace, settings: Settings) -> int:
    import cv2

    from worker.pipeline import Processor, Skipped, encode, process_files

    # Offline answers are not recorded for the dashboard, so they carry no review link to it.
    settings = settings.model_copy(update={"dashboard": settings.dashboard.model_copy(update={"record": False})})
    processor = Processor(settings, _load_model(settings))
    args.out.mkdir(parents=True, exist_ok=True)
    failures = 0
    rows = []
    for path, result in process_files(_expand(args.inputs), processor):  # one batch in memory at a time
        if isinstance(result, WorkerError):
            failures += 1
            print(f"{path}: error: {result}", file=sys.stderr)
        elif isinstance(result, Skipped):
            print(f"{path}: skipped: {result}", file=sys.stderr)
        else:
            stem = path.stem
            (args.out / f"{stem}.sc.dcm").write_bytes(encode(result.sc))
            (args.out / f"{stem}.sr.dcm").write_bytes(encode(result.sr))
            if result.gsps is not None:
                (args.out / f"{stem}.gsps.dcm").write_bytes(encode(result.gsps))
            if args.png:
                cv2.imwrite(str(args.out / f"{stem}.sc.png"), cv2.cvtColor(result.rgb, cv2.COLOR_RGB2BGR))
            rows.append({"input": str(path), "probability": round(result.probability, 4),
                         "decision": "withheld" if result.withheld else "positive" if result.positive else "negative",
                         "gate": result.gate, "ood_score": result.ood_score, "faithfulness": result.faithfulness,
                         "sc": str(args.out / f"{stem}.sc.dcm"), "sr": str(args.out / f"{stem}.sr.dcm"),
                         "gsps": str(args.out / f"{stem}.gsps.dcm") if result.gsps is not None else None})
    print(json.dumps(rows, indent=2))
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from worker.logs import configure

    try:
        settings = _settings(args)
        configure(settings.log.level, settings.log.format)
        if args.command == "echo":
            from worker.send import echo

            dest = parse_destination(args.destination)
            if isinstance(dest, DicomWebDestination):
                from worker.config import SendSection
                from worker.dicomweb import StowClient

                StowClient(dest, SendSection(acse_timeout=args.timeout, dimse_timeout=args.timeout),
                           settings.security).check()
                print(f"QIDO-RS {dest}: answered")
                return 0
            if isinstance(dest, Hl7Destination):
                from worker.mllp import MllpClient

                try:
                    MllpClient(dest.model_copy(update={"timeout_s": args.timeout})).check()
                except OSError as exc:
                    print(f"MLLP {dest}: no connection ({type(exc).__name__})", file=sys.stderr)
                    return 1
                print(f"MLLP {dest}: connected")
                return 0
            status = echo(dest, settings.dicom.ae_title, args.timeout)
            print(f"C-ECHO {args.destination}: status 0x{status:04X}")
            return 0 if status == SUCCESS else 1
        if args.command == "feedback":
            from worker.feedback import parse_since, run_export

            report = run_export(settings, args.out, parse_since(args.since) if args.since else None)
            for line in report.skipped:
                print(line, file=sys.stderr)
            print(json.dumps(report.as_dict(), indent=2))
            return 0
        if args.command == "process":
            return _process(args, settings)
        if args.command == "user":
            return _user(args, settings)
        if args.command == "dashboard":
            from worker.dashboard.app import serve

            serve(settings)
            return 0
        import faulthandler
        import signal

        from worker.service import Service

        # `kill -USR1 <pid>` prints every thread's stack (frames only, no data) to stderr.
        faulthandler.register(signal.SIGUSR1, all_threads=True)

        if not settings.send.destinations:
            raise ConfigError("no destination: results would have nowhere to go; pass --destination AET@HOST:PORT, "
                              "set [send] destinations, or CXR_SEND__DESTINATIONS")
        Service(settings, _load_model(settings)).run_forever()
        return 0
    except ValueError as exc:  # Destination.parse
        print(f"cxr-worker {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except WorkerError as exc:
        print(f"cxr-worker {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
