"""The settings classes are the one source of every config key: each field is described, and
the configuration page and the example configs are what scripts/config_docs.py generates."""

from __future__ import annotations

import tomllib

from pydantic import BaseModel, Field

from scripts import config_docs
from trainer.config import TrainConfig
from worker.config import Settings


def test_every_settings_field_has_a_description() -> None:
    missing = config_docs.missing_descriptions()
    assert not missing, (f"settings fields without a description: {', '.join(missing)}: add description= "
                         "(what it is, its unit, why its default), then run make config-docs")


def test_checked_in_config_files_are_generated() -> None:
    stale = config_docs.stale()
    assert not stale, f"out of date: {', '.join(map(str, stale))}: run make config-docs"


def test_the_generated_tomls_state_the_defaults() -> None:
    assert Settings.model_validate(tomllib.loads(config_docs.worker_toml())) == Settings()
    assert TrainConfig.model_validate(tomllib.loads(config_docs.train_toml())) == TrainConfig()


class _Inner(BaseModel):
    """A section."""

    described: int = Field(3, description="seconds; CXR_INNER__DESCRIBED")
    bare: str | None = None


class _Outer(BaseModel):
    inner: _Inner = _Inner()


def test_a_field_without_description_is_found_and_the_variable_is_not_repeated() -> None:
    found = {k.name: k for k in config_docs.keys(_Outer)}
    assert sorted(found) == ["inner.bare", "inner.described"]
    assert not found["inner.bare"].field.description
    assert found["inner.described"].env == "CXR_INNER__DESCRIBED"
    assert found["inner.described"].description(env=True) == "seconds"
    toml = config_docs._toml(_Outer, "# header", env=True)
    assert "described = 3  # CXR_INNER__DESCRIBED" in toml and "# bare = ..." in toml
    assert tomllib.loads(toml) == {"inner": {"described": 3}}
