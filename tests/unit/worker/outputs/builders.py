"""Shared sources, builds and readers for the output builders' tests (test_sc.py, test_sr.py,
test_common.py, test_render.py): not a test module."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom import Dataset

from cxr_contract.model import ModelInfo
from tests.dicom_outputs import MODEL, hot_gradcam, real_cr, synthetic_cr
from tests.helpers import dciodvfy_errors
from worker.decode import dataset_to_unit_image
from worker.outputs import (
    BuildSettings,
    Trust,
    build_report,
    build_secondary_capture,
    output_uids,
    render_heatmap_overlay,
    render_withheld,
)

#: Uncompressed, so that the pixel tests below can compare exact values; the compressed SC
#: (the default) has its own tests in test_outputs.py.
SETTINGS = BuildSettings(sc_compression="none")


SOURCES = {"real": real_cr, "synthetic": synthetic_cr}


def build_both(source: Dataset, probability: float, folder: Path) -> tuple[Path, Path]:
    uids = output_uids(source, MODEL.version)
    rgb = render_heatmap_overlay(
        dataset_to_unit_image(source),
        hot_gradcam(),
        probability=probability,
        threshold=MODEL.threshold,
        model_name=MODEL.name,
        model_version=MODEL.version,
        opacity=SETTINGS.opacity,
    )
    sc = build_secondary_capture(source, rgb, uids, MODEL, SETTINGS)
    sr = build_report(source, sc, probability, MODEL, uids, SETTINGS)
    sc_path, sr_path = folder / "sc.dcm", folder / "sr.dcm"
    sc.save_as(sc_path, enforce_file_format=True)
    sr.save_as(sr_path, enforce_file_format=True)
    return sc_path, sr_path


@pytest.fixture(scope="module", params=[(s, p) for s in SOURCES for p in (0.9, 0.1)],
                ids=lambda sp: f"{sp[0]}-p{sp[1]}")
def built(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[
    tuple[Dataset, float, Path, Path]
]:
    name, probability = request.param
    source = SOURCES[name]()
    sc_path, sr_path = build_both(source, probability, tmp_path_factory.mktemp(name))
    yield source, probability, sc_path, sr_path


def walk(items: Any) -> Iterator[Dataset]:
    for item in items:
        yield item
        yield from walk(item.get("ContentSequence", []))


def code_of(item: Dataset, sequence: str) -> str:
    return str(item[sequence][0].CodeValue) if sequence in item else ""


def redness(block: np.ndarray[Any, Any]) -> float:
    block = block.astype(np.float64)
    return float(block[..., 0].mean() - block[..., 2].mean())


def sr_items(sr: Dataset) -> list[Dataset]:
    return list(walk(sr.ContentSequence))


def coded(sr: Dataset, name: str) -> list[str]:
    """Meanings of the values of the CODE items named ``name`` (a viewer shows these words)."""
    return [str(i.ConceptCodeSequence[0].CodeMeaning) for i in sr_items(sr)
            if i.ValueType == "CODE" and code_of(i, "ConceptNameCodeSequence") == name]


def numbers(sr: Dataset, name: str) -> list[float]:
    return [float(i.MeasuredValueSequence[0].NumericValue) for i in sr_items(sr)
            if i.ValueType == "NUM" and code_of(i, "ConceptNameCodeSequence") == name]


def texts(sr: Dataset, name: str) -> list[str]:
    return [str(i.TextValue) for i in sr_items(sr)
            if i.ValueType == "TEXT" and code_of(i, "ConceptNameCodeSequence") == name]


def build_with(source: Dataset, probability: float, model: ModelInfo, trust: Trust, folder: Path,
               rgb: np.ndarray[Any, Any] | None = None) -> tuple[Dataset, Dataset, np.ndarray[Any, Any]]:
    """SC and SR as the pipeline builds them, saved and read back."""
    uids = output_uids(source, model.version)
    unit = dataset_to_unit_image(source)
    if rgb is None and trust.withheld:
        rgb = render_withheld(unit, reason=trust.gate_line(model), model_name=model.name,
                              model_version=model.version)
    elif rgb is None:
        rgb = render_heatmap_overlay(unit, hot_gradcam(), probability=probability, threshold=model.threshold,
                                     model_name=model.name, model_version=model.version,
                                     heatmap_scale=model.heatmap_scale, faithfulness=trust.faithfulness)
    sc = build_secondary_capture(source, rgb, uids, model, SETTINGS, trust=trust)
    sr = build_report(source, sc, probability, model, uids, SETTINGS, trust=trust)
    sc_path, sr_path = folder / "sc.dcm", folder / "sr.dcm"
    sc.save_as(sc_path, enforce_file_format=True)
    sr.save_as(sr_path, enforce_file_format=True)
    assert dciodvfy_errors(sc_path) == [] and dciodvfy_errors(sr_path) == []
    return pydicom.dcmread(sc_path), pydicom.dcmread(sr_path), rgb


def one_cell(value: float) -> np.ndarray[Any, Any]:
    cam = np.zeros((8, 8), np.float32)
    cam[6, 6] = value
    return cam
