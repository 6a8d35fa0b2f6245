"""A template-level check of a TID 1500 Measurement Report: each content item must sit in a row of
its template (TID 1500, 1600-1603, 1501 with 4108, 4019 and 300), with that row's relationship,
value type and concept name, and as many times as the row allows.

dciodvfy checks the IOD and DCMTK's ``dsrdump`` the SR encoding; neither checks template rows.
The rows are those of PS3.16 as DCMTK's libcmr implements them (``dcmsr/cmr/tid1500.cc``,
``tid1501.cc``, ``tid1600.cc``); TID 1501's Source of Measurement is highdicom's
(``SourceImageForMeasurementGroup``).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from pydicom import Dataset
from pydicom.sr.codedict import codes


@dataclass(frozen=True)
class Row:
    relationship: str
    value_type: str
    #: (scheme, value) of the concept name; None: any concept name not claimed by another row.
    concept: tuple[str, str] | None
    minimum: int = 0
    maximum: int | None = None


def _rows(*rows: Row) -> list[Row]:
    return list(rows)


DCM, SCT, UMLS = "DCM", "SCT", "UMLS"
OBS, CMOD, ACQ, CONTAINS = "HAS OBS CONTEXT", "HAS CONCEPT MOD", "HAS ACQ CONTEXT", "CONTAINS"

#: TID 1001-1004 Observation Context (device observer), included by TID 1500 row 3.
OBSERVER = [Row(OBS, "CODE", (DCM, "121005"), 0, 1)] + [
    Row(OBS, vt, (DCM, v), 0, 1) for vt, v in (("UIDREF", "121012"), ("TEXT", "121013"), ("TEXT", "121014"),
                                                ("TEXT", "121015"), ("TEXT", "121016"), ("TEXT", "121017"))
]
TID_1500 = _rows(
    Row(CMOD, "CODE", (DCM, "121049"), 0, 1),  # TID 1204 Language of Content Item and Descendants
    *OBSERVER,
    Row(CMOD, "CODE", (DCM, "121058"), 1, None),  # row 4 Procedure reported
    Row(CONTAINS, "CONTAINER", (DCM, "111028"), 0, 1),  # row 5 Image Library (TID 1600)
    Row(CONTAINS, "CONTAINER", (DCM, "126010"), 0, 1),  # row 6 Imaging Measurements
    Row(CONTAINS, "CONTAINER", (UMLS, "C0034375"), 0, 1),  # row 12 Qualitative Evaluations
)
TID_1600 = _rows(Row(CONTAINS, "CONTAINER", (DCM, "126200"), 1, None))  # Image Library Group
#: TID 1602 and 1603 (projection radiography) descriptors, on an entry or its group.
DESCRIPTORS = _rows(
    Row(ACQ, "CODE", (DCM, "121139"), 0, 1),  # Modality, CID 29
    Row(ACQ, "UIDREF", (DCM, "112227"), 0, 1),  # Frame of Reference UID
    Row(ACQ, "NUM", (DCM, "110910"), 0, 1), Row(ACQ, "NUM", (DCM, "110911"), 0, 1),  # Pixel Data Rows/Columns
    Row(ACQ, "DATE", (DCM, "111060"), 0, 1), Row(ACQ, "TIME", (DCM, "111061"), 0, 1),  # Study Date/Time
    Row(ACQ, "TEXT", (DCM, "111044"), 0, 1), Row(ACQ, "TEXT", (DCM, "111043"), 0, 1),  # Patient Orientation
    Row(ACQ, "NUM", (DCM, "111026"), 0, 1), Row(ACQ, "NUM", (DCM, "111066"), 0, 1),  # pixel spacing
)
TID_1601_GROUP = _rows(*DESCRIPTORS, Row(CONTAINS, "IMAGE", None, 1, None))
TID_1501 = _rows(
    Row(OBS, "TEXT", (DCM, "112039"), 1, 1),  # row 2 Tracking Identifier (TID 4108)
    Row(OBS, "UIDREF", (DCM, "112040"), 1, 1),  # row 3 Tracking Unique Identifier
    Row(CONTAINS, "CODE", (DCM, "121071"), 0, 1),  # row 3b Finding
    Row(CMOD, "CODE", (SCT, "276214006"), 0, 1),  # Finding category
    Row(CMOD, "TEXT", (DCM, "111001"), 0, 1),  # TID 4019 Algorithm Name
    Row(CMOD, "TEXT", (DCM, "111003"), 0, 1),  # TID 4019 Algorithm Version
    Row(CMOD, "TEXT", (DCM, "111002"), 0, None),  # TID 4019 Algorithm Parameters
    Row(CMOD, "CODE", (SCT, "370129005"), 0, 1),  # row 5 Measurement Method
    Row(CMOD, "CODE", (SCT, "363698007"), 0, None),  # row 6 Finding Site
    Row(CONTAINS, "IMAGE", (DCM, "121112"), 0, None),  # Source of Measurement
    Row(CONTAINS, "COMPOSITE", (DCM, "126100"), 0, 1),  # row 9 Real World Value Map used
    Row(CONTAINS, "NUM", None, 0, None),  # row 10 Measurement (TID 300)
    Row(CONTAINS, "CODE", None, 0, None),  # row 11 Qualitative evaluation, coded
    Row(CONTAINS, "TEXT", None, 0, None),  # row 12 Qualitative evaluation, text
)
#: CID 29 Acquisition Modality: its code values.
CID_29 = {getattr(codes.cid29, k).value for k in codes.cid29.dir()}


def concept(item: Dataset) -> tuple[str, str]:
    name = item.ConceptNameCodeSequence[0]
    return str(name.CodingSchemeDesignator), str(name.CodeValue)


def _check(items: list[Dataset], rows: list[Row], where: str) -> list[str]:
    """Problems with ``items`` against ``rows``: unplaced items and multiplicities."""
    problems, counts = [], Counter[int]()
    named = {r.concept for r in rows if r.concept is not None}
    for item in items:
        key = concept(item)
        fits = [i for i, r in enumerate(rows) if r.relationship == item.RelationshipType
                and r.value_type == item.ValueType and (r.concept == key or (r.concept is None and key not in named))]
        if not fits:
            problems.append(f"{where}: {item.RelationshipType} {item.ValueType} {key} is in no row")
            continue
        counts[fits[0]] += 1
    for i, row in enumerate(rows):
        n = counts[i]
        if n < row.minimum or (row.maximum is not None and n > row.maximum):
            problems.append(f"{where}: row {row.concept or row.value_type} occurs {n} times, "
                            f"allowed {row.minimum}-{row.maximum or 'n'}")
    return problems


def _children(item: Dataset) -> list[Dataset]:
    return list(item.get("ContentSequence", []))


def check_measurement_report(sr: Dataset) -> list[str]:
    """Every template problem of a TID 1500 SR, as lines; empty when it follows its templates."""
    problems: list[str] = []
    template = sr.ContentTemplateSequence[0].TemplateIdentifier if "ContentTemplateSequence" in sr else None
    if template != "1500" or concept(sr) != (DCM, "126000"):
        return [f"root: not a TID 1500 Imaging Measurement Report (template {template}, concept {concept(sr)})"]
    root = _children(sr)
    problems += _check(root, TID_1500, "TID 1500")
    for library in (i for i in root if concept(i) == (DCM, "111028")):
        problems += _check(_children(library), TID_1600, "TID 1600")
        for group in _children(library):
            problems += _check(_children(group), TID_1601_GROUP, "TID 1601 group")
            group_modality = [i for i in _children(group) if concept(i) == (DCM, "121139")]
            for image in (i for i in _children(group) if i.ValueType == "IMAGE"):
                problems += _check(_children(image), DESCRIPTORS, "TID 1602")
                modality = group_modality + [i for i in _children(image) if concept(i) == (DCM, "121139")]
                if len(modality) != 1:
                    problems.append(f"TID 1602: {len(modality)} Modality items for an image, need 1")
                for m in modality:
                    value = str(m.ConceptCodeSequence[0].CodeValue)
                    if value not in CID_29:
                        problems.append(f"TID 1602: Modality {value} is not in CID 29")
    for container in (i for i in root if concept(i) == (DCM, "126010")):
        groups = _children(container)
        problems += _check(groups, [Row(CONTAINS, "CONTAINER", (DCM, "125007"), 1, None)], "Imaging Measurements")
        for group in groups:
            problems += _check(_children(group), TID_1501, "TID 1501")
            for num in (i for i in _children(group) if i.ValueType == "NUM"):
                value = num.get("MeasuredValueSequence") or [Dataset()]
                if "MeasurementUnitsCodeSequence" not in value[0]:
                    problems.append(f"TID 300: NUM {concept(num)} has no value with units")
    return problems
