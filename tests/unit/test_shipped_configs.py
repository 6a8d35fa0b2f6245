"""The configs the trainer, the worker and the demo read come with the installed package
(package data), stay identical to the copies in config/, and a missing one is an error."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from trainer.config import load_config, shipped_configs
from trainer.errors import ConfigError
from worker.config import default_config

ROOT = Path(__file__).resolve().parent.parent.parent
COPIES = {"worker.toml": ROOT / "worker" / "defaults", "train.toml": ROOT / "trainer" / "defaults",
          "demo-train.toml": ROOT / "trainer" / "defaults"}


@pytest.mark.parametrize("name", sorted(COPIES))
def test_packaged_config_is_the_documented_copy(name: str) -> None:
    documented, packaged = ROOT / "config" / name, COPIES[name] / name
    assert packaged.read_bytes() == documented.read_bytes(), f"{documented} and {packaged} differ: edit both"


def test_shipped_configs_are_read_from_the_package() -> None:
    assert sorted(shipped_configs()) == ["demo-train", "train"]
    assert default_config() == COPIES["worker.toml"] / "worker.toml"
    assert load_config("demo-train").model.name == "cxr-gradcam-demo-phantoms"
    assert load_config(None) == load_config("train") == load_config(ROOT / "config" / "train.toml")


def test_a_missing_named_config_is_an_error_not_the_defaults(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config not found: demo-trian .*demo-train, train"):
        load_config("demo-trian")
    with pytest.raises(ConfigError, match="config not found"):
        load_config(tmp_path / "train.toml")
    out = subprocess.run([sys.executable, "-m", "trainer.cli", "fit", "--data", str(tmp_path), "--out",
                          str(tmp_path / "run"), "--config", str(tmp_path / "missing.toml")],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 1, out.stderr
    assert out.stderr.count("\n") == 1 and "config not found" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.integration
def test_wheel_installs_the_configs(tmp_path: Path) -> None:
    """pip builds the wheel (setuptools from the index) and a non-editable install reads its own copies."""
    # Build from a copy: setuptools writes build/ and *.egg-info into the source tree.
    source = tmp_path / "source"
    for name in ("pyproject.toml", "README.md", "cxr_contract", "worker", "trainer", "cxr_demo"):
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            source.mkdir(exist_ok=True)
            shutil.copy(ROOT / name, source / name)
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path / "dist"),
                            str(source)], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stdout + built.stderr
    [wheel] = (tmp_path / "dist").glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"worker/defaults/worker.toml", "trainer/defaults/train.toml", "trainer/defaults/demo-train.toml"} <= names
    site = tmp_path / "site"
    installed = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site),
                                str(wheel)], capture_output=True, text=True, timeout=300)
    assert installed.returncode == 0, installed.stdout + installed.stderr
    probe = ("import worker.config, trainer.config as t; p = worker.config.default_config(); "
             f"print(p.is_file(), p.is_relative_to({str(site)!r}), t.load_config('demo-train').model.image_size)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                         cwd=tmp_path, env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"})
    assert out.stdout.split() == ["True", "True", "128"], out.stderr
