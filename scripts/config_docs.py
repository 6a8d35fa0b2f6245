"""Generate the configuration reference and the example configs from the settings classes.

The pydantic settings classes (``worker/config.py``, ``trainer/config.py``) are the one
source of every key: its default, its description and its environment variable. From
them this script writes ``docs/configuration.md``, ``config/worker.toml`` with its
packaged twin ``worker/defaults/worker.toml``, and ``config/train.toml`` with
``trainer/defaults/train.toml``.

    python scripts/config_docs.py           # write the files (make config-docs)
    python scripts/config_docs.py --check   # exit 1 naming each file that differs
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined, to_jsonable_python

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

import worker.config  # noqa: E402
from trainer.config import TrainConfig  # noqa: E402
from worker.config import Settings  # noqa: E402

WORKER_ENV_PREFIX = "CXR_"
WIDTH = 100


@dataclass(frozen=True)
class Key:
    """One settings field, flattened: ``section.key`` and what the docs say about it."""

    path: tuple[str, ...]
    field: FieldInfo
    owner: type[BaseModel]

    @property
    def name(self) -> str:
        return ".".join(self.path)

    @property
    def env(self) -> str:
        return WORKER_ENV_PREFIX + "__".join(self.path).upper()

    @property
    def default(self) -> Any:
        """The default as JSON-able data; PydanticUndefined when the field is required."""
        if self.field.is_required():
            return PydanticUndefined
        return to_jsonable_python(self.field.get_default(call_default_factory=True))

    @property
    def example(self) -> Any:
        examples = self.field.examples or []
        return to_jsonable_python(examples[0]) if examples else None

    def description(self, env: bool) -> str:
        """The description, without a mention of the environment variable (the outputs add it)."""
        text = " ".join((self.field.description or "").split())
        if env:
            text = re.sub(rf"[\s;,.(]*((environment( variable)?|env):?\s*)?`?{re.escape(self.env)}`?\)?", "", text,
                          flags=re.IGNORECASE)
        return text.strip().rstrip(".")


def _is_section(field: FieldInfo) -> bool:
    return isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)


def keys(model: type[BaseModel], prefix: tuple[str, ...] = ()) -> Iterator[Key]:
    """Every leaf field of ``model``, in declaration order; nested models recurse."""
    for name, field in model.model_fields.items():
        if _is_section(field):
            assert isinstance(field.annotation, type)
            yield from keys(field.annotation, (*prefix, name))
        else:
            yield Key((*prefix, name), field, model)


def destination_tables() -> list[type[BaseModel]]:
    """The worker's models that are not sections: the kinds of table ``send.destinations`` takes.

    Found rather than listed, so that a new kind of destination is documented (and must be
    described) without editing this script.
    """
    sections = {k.owner for k in keys(Settings)}
    return [cls for cls in vars(worker.config).values()
            if isinstance(cls, type) and issubclass(cls, BaseModel) and cls.__module__ == "worker.config"
            and not cls.__name__.startswith("_") and cls is not Settings and cls not in sections]


def all_keys() -> list[Key]:
    """The worker's, its destination tables' and the trainer's keys: everything that needs a description."""
    tables = [k for cls in destination_tables() for k in keys(cls, ("send", "destinations[]"))]
    return [*keys(Settings), *tables, *keys(TrainConfig)]


def missing_descriptions() -> list[str]:
    """``Class.field`` of each settings field without a ``description=``."""
    return sorted({f"{k.owner.__name__}.{k.path[-1]}" for k in all_keys() if not (k.field.description or "").strip()})


# --- TOML ---------------------------------------------------------------------------------------------------

def toml_value(value: Any) -> str:
    """A JSON-able value as TOML (inline tables for dicts)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items() if v is not None) + "}"
    raise TypeError(f"cannot write {value!r} as TOML")


def _comment(text: str) -> list[str]:
    return textwrap.wrap(text, WIDTH, initial_indent="# ", subsequent_indent="# ") if text else []


def _toml(model: type[BaseModel], header: str, env: bool) -> str:
    lines = header.strip("\n").splitlines()
    section: tuple[str, ...] = ()
    for key in keys(model):
        if key.path[:-1] != section:
            section = key.path[:-1]
            doc = (key.owner.__doc__ or "").strip().split("\n\n")[0]
            lines += ["", f"[{'.'.join(section)}]", *_comment(" ".join(doc.split()))]
        lines += ["", *_comment(key.description(env))]
        variable = f"  # {key.env}" if env else ""
        default, example = key.default, key.example
        if default is PydanticUndefined or default is None:  # no value to show: an example, commented out
            shown = toml_value(example) if example is not None else "..."
            lines.append(f"# {key.path[-1]} = {shown}{variable}")
        else:
            lines.append(f"{key.path[-1]} = {toml_value(default)}{variable}")
            if example is not None and example != default:
                lines.append(f"# {key.path[-1]} = {toml_value(example)}")
    return "\n".join(lines) + "\n"


WORKER_TOML_HEADER = """
# cxr-worker configuration: every key with its default (a commented key has none).
# Precedence, highest first: environment (CXR_<SECTION>__<KEY>, lists as JSON), flags, this file,
# defaults. Generated from worker/config.py by `make config-docs`: edit the descriptions there.
# Two identical copies: config/worker.toml (to read and copy) and worker/defaults/worker.toml
# (installed with the package).
"""

TRAIN_TOML_HEADER = """
# cxr-train defaults: the paper's recipe. Flags of `cxr-train fit` override these.
# Generated from trainer/config.py by `make config-docs`: edit the descriptions there.
# Two identical copies: config/train.toml (to read and copy) and trainer/defaults/train.toml
# (installed with the package).
"""


def worker_toml() -> str:
    return _toml(Settings, WORKER_TOML_HEADER, env=True)


def train_toml() -> str:
    return _toml(TrainConfig, TRAIN_TOML_HEADER, env=False)


# --- Markdown -----------------------------------------------------------------------------------------------

def _md(text: str) -> str:
    return text.replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")


def _md_default(key: Key) -> str:
    default = key.default
    if default is PydanticUndefined:
        return "required"
    if default is None:
        return "none"
    return f"`{toml_value(default)}`"


def _md_table(model: type[BaseModel], prefix: tuple[str, ...], env: bool, headings: bool = True) -> list[str]:
    """A table per section, under a ``### [section]`` heading with the section's docstring."""
    out: list[str] = []
    section: tuple[str, ...] | None = None
    for key in keys(model, prefix):
        if key.path[:-1] != section:
            section = key.path[:-1]
            doc = " ".join((key.owner.__doc__ or "").strip().split("\n\n")[0].split())
            if headings:
                out += ["", f"### `[{'.'.join(section)}]`", *(["", _md(doc)] if doc else [])]
            out += ["",
                    "| key | default | " + ("environment | " if env else "") + "meaning |",
                    "|---|---|" + ("---|" if env else "") + "---|"]
        shown = toml_value(key.example) if key.example is not None else ""
        # A long example (a list of tables) would turn the cell into a paragraph: the TOML file has it.
        meaning = _md(key.description(env)) + (f" (e.g. `{shown}`)" if shown and len(shown) <= 60 else "")
        out.append(f"| `{key.path[-1]}` | {_md_default(key)} | " + (f"`{key.env}` | " if env else "")
                   + f"{meaning} |")
    return out


CONFIGURATION_INTRO = """\
# Configuration

<!-- Generated by `make config-docs` (scripts/config_docs.py) from worker/config.py and
trainer/config.py: edit the field descriptions there, not this file. -->

## The worker

`cxr-worker` reads one TOML file (`--config`; `config/worker.toml` lists every key with its default)
with environment overrides. Precedence, highest first: environment variables `CXR_<SECTION>__<KEY>`
(lists as JSON), command-line flags, the TOML file, the defaults. pydantic-settings merges the
sources key by key, so a flag or a variable changes one key and leaves the rest of its section to
the file.

A bad value stops start-up with one line naming the key, the value and the environment variable,
wherever it came from: a TOML inline table (`destinations = [{ae_title = "PACS", host = "10.0.0.5",
port = 104}]`) is validated like `AET@HOST:PORT`, and an environment list that is not JSON is named
with its value.

The shipped configs are package data, so an installed worker or trainer has them without this
repository: `worker/defaults/worker.toml` (`worker.config.default_config()`), and
`trainer/defaults/train.toml` and `demo-train.toml` (`cxr-train fit --config demo-train`). The files
in `config/` are identical copies to read, copy and deploy (the Dockerfiles and the systemd unit take
`config/worker.toml`). This page and both copies are generated from the settings classes by
`make config-docs`; a unit test fails when they differ from what it generates.

### Command-line flags

Flags of `cxr-worker serve`: `--config`, `--ae-title`, `--bind`, `--port`, `--model`, `--spool`,
`--destination AET@HOST:PORT|URL` (repeatable). Other commands:

- `cxr-worker process INPUT... --out DIR [--model PATH] [--png]` runs the same pipeline offline on
  files or folders;
- `cxr-worker echo AET@HOST:PORT` sends a C-ECHO (`cxr-worker echo https://…/dicom-web`: one QIDO-RS
  query);
- `cxr-worker dashboard [--config FILE]` serves the [review dashboard](dashboard.md);
- `cxr-worker user add NAME --role reader|admin [--config FILE]` creates or resets a dashboard account
  (password from stdin, or a prompt on a terminal; a reset also enables a disabled account);
  `cxr-worker user disable NAME` refuses an account's logins (and ends its sessions) while keeping
  its feedback, `cxr-worker user enable NAME` allows them again, `cxr-worker user list` lists them;
- `cxr-worker feedback export --out DIR [--since DATE]` writes readers' labels for the
  [trainer](training.md#the-feedback-loop).
"""

DESTINATIONS_INTRO = """
### Destination tables

`send.destinations` takes strings (`AET@HOST:PORT` for C-STORE, a DICOMweb base URL) or tables. A
C-STORE table has `ae_title`, `host` and `port`; a DICOMweb table has `url` and, when the service
needs credentials, `auth` with exactly one of `credentials_file` and `credentials_env` (never the
credentials themselves); an HL7 table names an `mllp://` or `mllps://` address. See [the worker](worker.md)
for how each is used; each kind of table and its keys are listed below. For example:

```toml
[send]
destinations = [
  "PACS@10.0.0.5:104",
  {url = "https://pacs.example.org/dicom-web", auth = "bearer", credentials_file = "/run/secrets/pacs-token"},
  {url = "https://vna.example.org/dicomweb", auth = "basic", credentials_env = "VNA_CREDENTIALS"},
]
```
"""

TRAINER_INTRO = """
## The trainer

`cxr-train` reads `config/train.toml` (the paper's recipe: Adam 1e-4, batch 32, 30 epochs, early
stopping patience 5 on validation loss with best weights restored, dropout 0.5, Dense 256,
rotation ±10°, zoom 10 %, horizontal flip, contrast; class weights when classes are imbalanced).
`cxr-train fit` flags `--epochs`, `--image-size`, `--batch-size`, `--learning-rate` and `--weights`
override it. `--config` takes a file or the name of a shipped config (`train`, the default, or
`demo-train`); a config that is neither stops with one line listing the shipped names, never a
silent fall-back to the defaults. The trainer reads no environment variables.
"""


def configuration_md() -> str:
    lines = [CONFIGURATION_INTRO.rstrip("\n"), "", "## Worker keys"]
    lines += _md_table(Settings, (), env=True)
    lines += DESTINATIONS_INTRO.rstrip("\n").splitlines()
    for cls in destination_tables():
        doc = " ".join((cls.__doc__ or cls.__name__).strip().split("\n\n")[0].split())
        lines += ["", f"`{cls.__name__}`: {_md(doc)}"]
        lines += _md_table(cls, ("send", "destinations[]"), env=False, headings=False)
    lines += TRAINER_INTRO.rstrip("\n").splitlines()
    lines += _md_table(TrainConfig, (), env=False)
    return "\n".join(lines) + "\n"


def outputs() -> dict[Path, str]:
    """Every generated file, by path under the repository root."""
    worker, train = worker_toml(), train_toml()
    return {Path("docs/configuration.md"): configuration_md(),
            Path("config/worker.toml"): worker, Path("worker/defaults/worker.toml"): worker,
            Path("config/train.toml"): train, Path("trainer/defaults/train.toml"): train}


def stale(root: Path = ROOT) -> list[Path]:
    """The generated files whose checked-in text differs from what this script writes."""
    return [path for path, text in outputs().items()
            if not (root / path).is_file() or (root / path).read_text(encoding="utf-8") != text]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 when a file is stale")
    args = parser.parse_args(argv)
    missing = missing_descriptions()
    if missing:
        print(f"config-docs: settings fields without a description: {', '.join(missing)} "
              "(add description= with the unit and why the default, then run make config-docs)", file=sys.stderr)
        return 1
    if args.check:
        paths = stale()
        if paths:
            print(f"config-docs: out of date: {', '.join(map(str, paths))}: run make config-docs", file=sys.stderr)
        return 1 if paths else 0
    for path, text in outputs().items():
        (ROOT / path).parent.mkdir(parents=True, exist_ok=True)
        (ROOT / path).write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
