"""``cxr-worker``: serve | process | echo."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from worker.codes import SUCCESS
from worker.config import Destination, Settings, get_settings
from worker.errors import ConfigError, WorkerError

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
    s.add_argument("--destination", action="append", metavar="AET@HOST:PORT",
                   help="where results go (repeatable)")

    s = sub.add_parser("process", help="the same pipeline offline, for files or folders")
    s.add_argument("inputs", nargs="+", type=Path)
    s.add_argument("--out", type=Path, required=True)
    s.add_argument("--config", type=Path)
    s.add_argument("--model", type=Path)
    s.add_argument("--png", action="store_true", help="also write PNG previews of the SC")

    s = sub.add_parser("echo", help="C-ECHO a DICOM node")
    s.add_argument("destination", metavar="AET@HOST:PORT")
    s.add_argument("--config", type=Path)
    s.add_argument("--timeout", type=float, default=10.0)
    return p


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
    model = OnnxModel(settings.model.path, providers=settings.model.providers, threads=settings.model.threads)
    logger.info("model loaded", extra={"model": model.info.name, "version": model.info.version,
                                       "input_size": model.info.input_size, "threshold": model.info.threshold,
                                       "providers": model.providers, "intended_use": model.info.intended_use,
                                       "precision": model.info.precision})
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
            if args.png:
                cv2.imwrite(str(args.out / f"{stem}.sc.png"), cv2.cvtColor(result.rgb, cv2.COLOR_RGB2BGR))
            rows.append({"input": str(path), "probability": round(result.probability, 4),
                         "decision": "withheld" if result.withheld else "positive" if result.positive else "negative",
                         "gate": result.gate, "ood_score": result.ood_score, "faithfulness": result.faithfulness,
                         "sc": str(args.out / f"{stem}.sc.dcm"), "sr": str(args.out / f"{stem}.sr.dcm")})
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

            status = echo(Destination.parse(args.destination), settings.dicom.ae_title, args.timeout)
            print(f"C-ECHO {args.destination}: status 0x{status:04X}")
            return 0 if status == SUCCESS else 1
        if args.command == "process":
            return _process(args, settings)
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
