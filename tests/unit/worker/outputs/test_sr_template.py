"""The SR from a template (build_report) against highdicom's full build (build_report_highdicom):
element for element the same dataset, for every shape of report, image after image."""

from __future__ import annotations

import dataclasses
import datetime
import types
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import highdicom.base
import numpy as np
import pytest
from pydicom import Dataset
from pydicom.uid import generate_uid

from tests.dicom_outputs import MODEL, MODEL_V2, de_identified, real_cr, synthetic_cr
from tests.helpers import dciodvfy_errors
from tests.sr_templates import check_measurement_report
from tests.unit.worker.outputs.builders import SETTINGS
from worker.input_check import CLIPPED, UNIFORM
from worker.model import GATE_OOD_SCORE
from worker.outputs import Trust, build_secondary_capture, output_uids
from worker.outputs.sr import TEMPLATES, build_report, build_report_highdicom
from worker.outputs.sr_template import LRU
from worker.pipeline import encode

# RG1's Referring Physician "ward" is a one-component name; highdicom says so on every build.
pytestmark = pytest.mark.filterwarnings("ignore:The string \"ward\":UserWarning")

#: Both builds stamp this time, so that nothing differs but what is built.
NOW = datetime.datetime(2026, 3, 4, 10, 20, 30, 123456)


@pytest.fixture(autouse=True)
def frozen_highdicom_clock(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """highdicom stamps Instance Creation Date/Time with its own clock, which takes no argument."""

    class Frozen(datetime.datetime):
        @classmethod
        def now(cls, tz: datetime.tzinfo | None = None) -> Frozen:
            return cls.combine(NOW.date(), NOW.time())

    monkeypatch.setattr(highdicom.base, "datetime", types.SimpleNamespace(datetime=Frozen))
    TEMPLATES.clear()
    yield
    TEMPLATES.clear()


def differences(a: Dataset, b: Dataset, where: str = "") -> list[str]:
    """Every tag, VR and value that differs, sequences item by item."""
    out = [f"{where}{tag} only in {'highdicom' if tag in a else 'template'}"
           for tag in sorted(set(a.keys()) ^ set(b.keys()))]
    for tag in sorted(set(a.keys()) & set(b.keys())):
        x, y = a[tag], b[tag]
        name = f"{where}{x.keyword or tag}"
        if x.VR != y.VR:
            out.append(f"{name}: VR {x.VR} != {y.VR}")
        elif x.VR == "SQ":
            if len(x.value) != len(y.value):
                out.append(f"{name}: {len(x.value)} items != {len(y.value)}")
            for i, (p, q) in enumerate(zip(x.value, y.value, strict=False)):
                out += differences(p, q, f"{name}[{i}].")
        elif x.value != y.value or str(x.value) != str(y.value):
            out.append(f"{name}: {x.value!r} != {y.value!r}")
    return out


def patient(source: Dataset, name: str, patient_id: str) -> Dataset:
    """``source`` as another image of another patient: new UIDs, name and ID."""
    source.PatientName, source.PatientID = name, patient_id
    source.StudyInstanceUID, source.SeriesInstanceUID, source.SOPInstanceUID = (generate_uid() for _ in range(3))
    return source


def latin1_cr() -> Dataset:
    """A synthetic CR in ISO_IR 100 with a non-ASCII name, a patient orientation and no pixel spacing."""
    ds = synthetic_cr()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.PatientName = "Müller^Jürgen"
    ds.PatientOrientation = ["A", "F"]
    del ds.ImagerPixelSpacing
    ds.PatientAge, ds.StudyDescription = "054Y", "Thorax p.a."
    return ds


SOURCES: dict[str, Callable[[], Dataset]] = {
    "real": real_cr, "synthetic": synthetic_cr, "de-identified": lambda: de_identified(synthetic_cr()),
    "latin1": latin1_cr,
}
PREVALENCE = dataclasses.replace(MODEL_V2, prevalence=0.5, reported_prevalence=0.1, threshold=0.1234)
CASES: dict[str, tuple[Any, float, Trust, str | None]] = {
    "v1-positive": (MODEL, 0.9, Trust(), None),
    "v1-negative": (MODEL, 0.1, Trust(), None),
    "v1-withheld-uniform": (MODEL, 0.4, Trust(gate=UNIFORM, withheld=True), None),
    "passed-gate-faithful": (MODEL_V2, 0.8, Trust(ood_score=3.25, faithfulness=2.5), "https://dash.example/r/1"),
    "passed-gate-not-faithful": (MODEL_V2, 0.2, Trust(ood_score=1.5, faithfulness=-0.42), None),
    "passed-gate-no-faithfulness": (MODEL_V2, 0.6, Trust(ood_score=2.0), None),
    "withheld-ood": (MODEL_V2, 0.97, Trust(ood_score=27.5, gate=GATE_OOD_SCORE, withheld=True), None),
    "withheld-nan": (MODEL_V2, 0.4, Trust(gate=GATE_OOD_SCORE, withheld=True, ood_not_finite="nan"), None),
    "flagged-clipped": (MODEL_V2, 0.9, Trust(ood_score=4.0, gate=CLIPPED, faithfulness=0.8), "https://d/r/2"),
    "prevalence": (PREVALENCE, 0.12345, Trust(ood_score=1.0), None),
}


def both(source: Dataset, model: Any, probability: float, trust: Trust, link: str | None
         ) -> tuple[Dataset, Dataset]:
    uids = output_uids(source, model.version)
    sc = build_secondary_capture(source, np.zeros((int(source.Rows), int(source.Columns), 3), np.uint8), uids,
                                 model, SETTINGS, trust=trust)
    reference = build_report_highdicom(source, sc, probability, model, uids, SETTINGS, trust=trust,
                                       review_url=link, now=NOW)
    return reference, build_report(source, sc, probability, model, uids, SETTINGS, trust=trust, review_url=link,
                                   now=NOW)


def other_values(source: Dataset, probability: float, trust: Trust, link: str | None
                 ) -> tuple[Dataset, float, Trust, str | None]:
    """Another image of the same shape with a different value wherever one can differ: patient,
    UIDs, modality, size, orientation, spacing, the decision, scores, verdict and link."""
    source = patient(source, "Second^Image", "ID-2")
    source.Modality, source.Rows, source.Columns = "DX", 48, 40
    if "PatientOrientation" in source:
        source.PatientOrientation = ["P", "H"]
    if "ImagerPixelSpacing" in source:
        source.ImagerPixelSpacing = [0.15, 0.143]
    trust = dataclasses.replace(
        trust, ood_score=None if trust.ood_score is None else trust.ood_score + 0.5,
        faithfulness=None if trust.faithfulness is None else -trust.faithfulness)
    return source, round(1 - probability, 3), trust, link and link + "7"


@pytest.mark.parametrize("source", list(SOURCES))
@pytest.mark.parametrize("case", list(CASES))
def test_template_sr_is_highdicoms_element_for_element(source: str, case: str, tmp_path: Path) -> None:
    model, probability, trust, link = CASES[case]
    first = (patient(SOURCES[source](), "First^Image", "ID-1"), probability, trust, link)
    # Two images in a row: the second is filled into the template the first one built.
    for n, (image, p, t, url) in enumerate((first, other_values(SOURCES[source](), probability, trust, link))):
        reference, fast = both(image, model, p, t, url)
        assert differences(reference, fast) == [], f"image {n + 1}"
        assert differences(reference.file_meta, fast.file_meta) == []
        assert encode(fast) == encode(reference)  # byte for byte, as it goes to the PACS
    assert TEMPLATES.builds == 1


def test_template_srs_pass_dciodvfy_and_the_template_checks(tmp_path: Path) -> None:
    for case, (model, probability, trust, link) in CASES.items():
        _, fast = both(real_cr(), model, probability, trust, link)
        path = tmp_path / f"{case}.dcm"
        path.write_bytes(encode(fast))
        assert dciodvfy_errors(path) == [], case
        assert check_measurement_report(fast) == [], case


def test_second_image_carries_nothing_of_the_first() -> None:
    model, probability, trust, link = CASES["passed-gate-faithful"]
    first = patient(synthetic_cr(), "Alpha^Firstpatient", "PHI-FIRST-0001")
    first.PatientBirthDate, first.AccessionNumber = "19410203", "ACC-FIRST"
    _, sr_first = both(first, model, probability, trust, link)
    second = patient(synthetic_cr(), "Beta^Secondpatient", "PHI-SECOND-0002")
    del second.PatientBirthDate, second.AccessionNumber
    _, sr_second = both(second, model, 0.3, Trust(ood_score=4.5, faithfulness=0.1), "https://dash.example/r/9")
    assert TEMPLATES.builds == 1
    first_bytes, second_bytes = encode(sr_first), encode(sr_second)
    for value in (b"Alpha", b"Firstpatient", b"PHI-FIRST-0001", b"19410203", b"ACC-FIRST",
                  str(first.SOPInstanceUID).encode(), str(first.StudyInstanceUID).encode(), b"/r/1"):
        assert value in first_bytes and value not in second_bytes
    assert not sr_second.PatientBirthDate and not sr_second.AccessionNumber  # empty: the second has none
    # Nor does the template hold a patient's values: it was built without them.
    template = next(iter(TEMPLATES._items.values()))
    assert template is not None and b"Alpha" not in template.body and b"PHI-FIRST" not in template.body


@pytest.mark.filterwarnings("ignore:Invalid value for VR:UserWarning")
@pytest.mark.parametrize(("keyword", "value"), [("PatientSex", "X"), ("PatientBirthDate", "03/02/1941"),
                                                ("StudyTime", "25:99")])
def test_template_refuses_what_highdicom_refuses(keyword: str, value: str) -> None:
    source = synthetic_cr()
    model, probability, trust, link = CASES["v1-positive"]
    uids = output_uids(source, model.version)
    sc = build_secondary_capture(source, np.zeros((64, 64, 3), np.uint8), uids, model, SETTINGS)
    setattr(source, keyword, value)  # after the SC, which highdicom refuses too
    with pytest.raises(ValueError):
        build_report_highdicom(source, sc, probability, model, uids, SETTINGS, trust=trust)
    with pytest.raises(ValueError):
        build_report(source, sc, probability, model, uids, SETTINGS, trust=trust)


def test_lru_keeps_the_most_recently_used() -> None:
    cache = LRU(maxsize=2)
    cache.get("a", lambda: None)
    cache.get("b", lambda: None)
    cache.get("a", lambda: None)  # a is now the most recent
    cache.get("c", lambda: None)  # so b goes
    assert list(cache._items) == ["a", "c"] and cache.builds == 3


def test_another_model_or_site_setting_gets_its_own_template() -> None:
    model, probability, trust, link = CASES["v1-positive"]
    renamed = dataclasses.replace(model, name="other-model")
    for m in (model, renamed, model):
        uids = output_uids(source := synthetic_cr(), m.version)
        sc = build_secondary_capture(source, np.zeros((64, 64, 3), np.uint8), uids, m, SETTINGS)
        for settings in (SETTINGS, SETTINGS.model_copy(update={"institution_name": "Other Hospital"})):
            reference = build_report_highdicom(source, sc, probability, m, uids, settings, now=NOW)
            fast = build_report(source, sc, probability, m, uids, settings, now=NOW)
            assert differences(reference, fast) == [] and encode(fast) == encode(reference)
    assert TEMPLATES.builds == 4


def test_build_threads_share_one_template_without_mixing_images() -> None:
    model, probability, trust, link = CASES["passed-gate-faithful"]
    images = [patient(synthetic_cr(), f"Patient^{n}", f"ID-{n:03d}") for n in range(16)]
    inputs = []
    for image in images:
        uids = output_uids(image, model.version)
        inputs.append((image, build_secondary_capture(image, np.zeros((64, 64, 3), np.uint8), uids, model, SETTINGS,
                                                      trust=trust), uids))

    def fast(args: tuple[Dataset, Dataset, Any]) -> bytes:
        image, sc, uids = args
        return encode(build_report(image, sc, probability, model, uids, SETTINGS, trust=trust, review_url=link,
                                   now=NOW))

    with ThreadPoolExecutor(4) as pool:
        built = list(pool.map(fast, inputs))
    for (image, sc, uids), got in zip(inputs, built, strict=True):
        assert got == encode(build_report_highdicom(image, sc, probability, model, uids, SETTINGS, trust=trust,
                                                    review_url=link, now=NOW))
