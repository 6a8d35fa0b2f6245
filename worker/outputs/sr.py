"""The TID 1500 Measurement Report: one builder, with the templates of :mod:`highdicom.sr`."""

from __future__ import annotations

import hashlib
import math
import weakref
from datetime import datetime

import highdicom as hd
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from highdicom.enum import PatientSexValues
from pydicom import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.tag import Tag
from pydicom.valuerep import DA, TM

from cxr_contract import faithfulness as faith
from cxr_contract.model import ModelInfo
from worker.errors import WorkerError
from worker.outputs.codes import (
    ABOVE_CHANCE,
    ABSENT,
    ASSUMED_PREVALENCE,
    CHEST_XR_SINGLE_VIEW,
    HEATMAP_FAITHFULNESS,
    HEATMAP_FAITHFULNESS_CUTOFF,
    HEATMAP_FAITHFULNESS_VERDICT,
    NO_OOD_EVIDENCE,
    NOT_ABOVE_CHANCE,
    NOT_EVALUATED,
    OOD_EVIDENCE,
    OOD_REASONS,
    OOD_SCORE,
    OOD_STATEMENT,
    OOD_THRESHOLD,
    OUTSIDE_DISTRIBUTION,
    PNEUMONIA,
    PNEUMONIA_PROBABILITY,
    PRESENT,
    PRIVATE_SCHEME,
    REVIEW_LINK,
    TRAINING_DISTRIBUTION,
)
from worker.outputs.common import (
    PATIENT_STUDY_TYPE2,
    BuildSettings,
    OutputUIDs,
    Trust,
    add_contributing_equipment,
    as_reference,
    check_probability,
    decision,
    derived_uid,
    device_uid,
    patient_orientation,
    stamp_dates,
)
from worker.outputs.sr_template import LRU, Template, copy_patient_and_study, evidence, patient_study_tags, slot_of


def _trust_content(model: ModelInfo, trust: Trust) -> tuple[list[hd.sr.QualitativeEvaluation],
                                                             list[hd.sr.Measurement]]:
    """The SR items that say how far to trust the answer (codes: docs/conformance.md)."""
    evaluations, measurements = [], []
    if trust.gate is not None or model.has_ood_gate:
        outside = trust.gate is not None
        evaluations.append(hd.sr.QualitativeEvaluation(
            name=TRAINING_DISTRIBUTION, value=OUTSIDE_DISTRIBUTION if outside else NO_OOD_EVIDENCE))
        if trust.gate is not None:
            evaluations.append(hd.sr.QualitativeEvaluation(name=OOD_EVIDENCE, value=OOD_REASONS[trust.gate]))
    if trust.ood_score is not None and model.ood_threshold is not None:
        measurements += [
            hd.sr.Measurement(name=OOD_SCORE, value=trust.ood_score, unit=codes.UCUM.NoUnits),
            hd.sr.Measurement(name=OOD_THRESHOLD, value=model.ood_threshold, unit=codes.UCUM.NoUnits),
        ]
    cutoff = model.faithfulness_cutoff
    if trust.faithfulness is not None and not trust.withheld and cutoff is not None:
        above = faith.above_chance(trust.faithfulness, cutoff)
        evaluations.append(hd.sr.QualitativeEvaluation(
            name=HEATMAP_FAITHFULNESS_VERDICT, value=ABOVE_CHANCE if above else NOT_ABOVE_CHANCE))
        measurements += [
            hd.sr.Measurement(name=HEATMAP_FAITHFULNESS, value=trust.faithfulness, unit=codes.UCUM.NoUnits),
            hd.sr.Measurement(name=HEATMAP_FAITHFULNESS_CUTOFF, value=cutoff, unit=codes.UCUM.NoUnits),
        ]
    return evaluations, measurements


def acquisition_modality(source: Dataset) -> Code:
    """The source's Modality as a CID 29 (Acquisition Modality) code; from its SOP class when
    the attribute is not a CID 29 value."""
    value = str(source.get("Modality", ""))
    for keyword in codes.cid29.dir():
        code = getattr(codes.cid29, keyword)
        if code.value == value:
            return Code(code.value, code.scheme_designator, code.meaning)
    coded = hd.sr.templates._get_coded_modality(source.SOPClassUID)  # noqa: SLF001  # highdicom's own map
    return Code(coded.value, coded.scheme_designator, coded.meaning)


def _library_descriptors(source: Dataset) -> list[hd.sr.ContentItem]:
    """The TID 1602/1603 descriptors of the Image Library entry the source has values for."""
    acq = hd.sr.RelationshipTypeValues.HAS_ACQ_CONTEXT
    pixels = hd.sr.CodedConcept(value="{pixels}", meaning="Pixels", scheme_designator="UCUM")
    descriptors: list[hd.sr.ContentItem] = [
        hd.sr.CodeContentItem(name=codes.DCM.Modality, value=acquisition_modality(source), relationship_type=acq),
        hd.sr.NumContentItem(name=codes.DCM.PixelDataRows, value=int(source.Rows), unit=pixels,
                             relationship_type=acq),
        hd.sr.NumContentItem(name=codes.DCM.PixelDataColumns, value=int(source.Columns), unit=pixels,
                             relationship_type=acq),
    ]
    orientation = patient_orientation(source)
    if orientation:
        descriptors += [
            hd.sr.TextContentItem(name=codes.DCM.PatientOrientationRow, value=orientation[0], relationship_type=acq),
            hd.sr.TextContentItem(name=codes.DCM.PatientOrientationColumn, value=orientation[1],
                                  relationship_type=acq),
        ]
    try:
        row, col = (float(v) for v in source.get("ImagerPixelSpacing"))
    except (TypeError, ValueError):
        row = col = 0.0
    if row > 0 and col > 0 and math.isfinite(row + col):
        descriptors += [
            hd.sr.NumContentItem(name=codes.DCM.HorizontalPixelSpacing, value=col, unit=codes.UCUM.Millimeter,
                                 relationship_type=acq),
            hd.sr.NumContentItem(name=codes.DCM.VerticalPixelSpacing, value=row, unit=codes.UCUM.Millimeter,
                                 relationship_type=acq),
        ]
    return descriptors


def _library_image(source: Dataset) -> hd.sr.ImageContentItem:
    """The TID 1601 entry's image reference, without its descriptors."""
    return hd.sr.ImageContentItem(
        name=hd.sr.CodedConcept(value="260753009", meaning="Source", scheme_designator="SCT"),
        referenced_sop_class_uid=source.SOPClassUID, referenced_sop_instance_uid=source.SOPInstanceUID,
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
    )


def _image_library(source: Dataset) -> hd.sr.ContainerContentItem:
    """TID 1600 Image Library with one TID 1601 entry: the image the model read.

    highdicom's :class:`~highdicom.sr.ImageLibrary` demands TID 1603's Imager Pixel Spacing of
    a CR or DX, which many lack; this entry carries the TID 1602/1603 descriptors the source has
    values for, and its real acquisition modality (CID 29). The SC is not an acquired image
    (its Modality "OT" is not in CID 29); it is listed in the evidence instead.
    """
    image = _library_image(source)
    image.ContentSequence = hd.sr.ContentSequence(_library_descriptors(source))
    group = hd.sr.ContainerContentItem(name=codes.DCM.ImageLibraryGroup,
                                       relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)
    group.ContentSequence = hd.sr.ContentSequence([image])
    library = hd.sr.ContainerContentItem(name=codes.DCM.ImageLibrary,
                                         relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)
    library.ContentSequence = hd.sr.ContentSequence([group])
    return library


def _findings(probability: float, model: ModelInfo, trust: Trust) -> tuple[list[hd.sr.QualitativeEvaluation],
                                                                          list[hd.sr.Measurement]]:
    """The measurement group's evaluations (the finding first) and measurements (the probability first)."""
    presence = NOT_EVALUATED if trust.withheld else PRESENT if decision(probability, model.threshold) else ABSENT
    evaluations, measurements = _trust_content(model, trust)
    if not trust.withheld:
        measurements.insert(0, hd.sr.Measurement(
            name=PNEUMONIA_PROBABILITY, value=probability, unit=codes.UCUM.NoUnits))
        if model.assumed_prevalence is not None:  # the probability is only true at this prevalence
            measurements.insert(1, hd.sr.Measurement(
                name=ASSUMED_PREVALENCE, value=round(100 * model.assumed_prevalence, 4), unit=codes.UCUM.Percent))
    # Name = the finding, value = Present/Absent/Not Evaluated: one item a reader cannot misread.
    return [hd.sr.QualitativeEvaluation(name=PNEUMONIA, value=presence), *evaluations], measurements


def _tracking(uids: OutputUIDs, settings: BuildSettings) -> hd.sr.TrackingIdentifier:
    return hd.sr.TrackingIdentifier(uid=derived_uid(settings.uid_prefix, "tracking", uids.sr_instance),
                                    identifier="Pneumonia")


def _texts(model: ModelInfo, trust: Trust, review_url: str | None) -> list[hd.sr.TextContentItem]:
    """The TEXT items at the end of the measurement group."""
    items = []
    statement = trust.ood_statement(model)
    if statement:  # what the gate found, with its numbers, in words a reader takes as they are
        items.append(hd.sr.TextContentItem(
            name=OOD_STATEMENT, value=statement, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS))
    if review_url:  # a PACS viewer shows it as text; the reader opens the case in the dashboard
        items.append(hd.sr.TextContentItem(
            name=REVIEW_LINK, value=review_url, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS))
    return items


def _check(source: Dataset, sc: Dataset, probability: float, model: ModelInfo) -> None:
    check_probability(probability, model.threshold)
    if sc.StudyInstanceUID != source.StudyInstanceUID:
        raise WorkerError(
            f"SC and source must share a study. Received: {sc.StudyInstanceUID} "
            f"and {source.StudyInstanceUID}"
        )


def build_report_highdicom(
    source: Dataset, sc: Dataset, probability: float, model: ModelInfo, uids: OutputUIDs,
    settings: BuildSettings, *, trust: Trust | None = None, review_url: str | None = None,
    now: datetime | None = None,
) -> hd.sr.Comprehensive3DSR:
    """The TID 1500 Measurement Report as highdicom builds and validates it: the reference that
    :func:`build_report` reproduces element for element (arguments as there)."""
    trust = trust or Trust()
    _check(source, sc, probability, model)
    now = now or datetime.now()
    device = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=device_uid(model, settings),
            name=model.name,
            manufacturer_name=settings.manufacturer,
        ),
    )
    evaluations, measurements = _findings(probability, model, trust)
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=_tracking(uids, settings),
        finding_type=PNEUMONIA,
        algorithm_id=hd.sr.AlgorithmIdentification(
            name=model.name,
            version=model.version,
            parameters=[f"weights_sha256={model.weights_sha256}", f"threshold={model.threshold!r}",
                        *([f"prevalence={model.assumed_prevalence!r}"] if model.assumed_prevalence is not None
                          else [])],
        ),
        qualitative_evaluations=evaluations,
        measurements=measurements,
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(source)],
    )
    group[0].ContentSequence.extend(_texts(model, trust, review_url))
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=device),
        procedure_reported=CHEST_XR_SINGLE_VIEW,
        imaging_measurements=[group],
    )
    root = report[0]
    # TID 1500 row 5 (Image Library) comes before row 6 (Imaging Measurements).
    position = next(i for i, item in enumerate(root.ContentSequence)
                    if item.ConceptNameCodeSequence[0].CodeValue == codes.DCM.ImagingMeasurements.value)
    root.ContentSequence.insert(position, _image_library(source))
    # The SC was made for this request: Current Requested Procedure Evidence (PS3.3 C.17.2.3)
    # lists it beside the source, which the content tree references.
    sr = hd.sr.Comprehensive3DSR(
        evidence=[as_reference(source), sc], content=root,
        series_instance_uid=uids.sr_series, series_number=settings.sr_series_number,
        sop_instance_uid=uids.sr_instance, instance_number=1, manufacturer=settings.manufacturer,
        series_description=settings.sr_series_description,
        institution_name=settings.institution_name,
        # PRELIMINARY and UNVERIFIED: a machine reading that awaits a human's report.
        is_complete=True, is_final=False, is_verified=False,
        coding_schemes=[CodingSchemeIdentificationItem(
            PRIVATE_SCHEME, name="cxr-gradcam concepts",
            responsible_organization=settings.manufacturer,
        )],
        content_date=now.date(), content_time=now.time(),
    )
    add_contributing_equipment(sr, model, settings)
    stamp_dates(sr)
    return sr


#: SR shapes kept: one per model, site settings, character set and set of per-image items
#: (answered or withheld, gate, faithfulness, link, orientation, spacing); a site sees a handful.
TEMPLATES = LRU(maxsize=64)

#: What the content tree reads from the source, none of it about the patient: a template is
#: built from these alone, with placeholder UIDs, so it holds no patient's values.
_SHAPE_ATTRIBUTES = ("SOPClassUID", "Modality", "Rows", "Columns", "PatientOrientation", "ImagerPixelSpacing",
                     "SamplesPerPixel", "PixelRepresentation", "NumberOfFrames", "SpecificCharacterSet")


_MODEL_KEYS: dict[int, tuple[weakref.ref[ModelInfo], str]] = {}


def _model_key(model: ModelInfo) -> str:
    """A digest of every field of ``model``, computed once per model object: its repr carries the
    faithfulness reference image and the drift reference, too long to rebuild for every SR."""
    entry = _MODEL_KEYS.get(id(model))
    if entry is None or entry[0]() is not model:  # a new object, or a dead one's reused id
        if len(_MODEL_KEYS) >= 64:
            _MODEL_KEYS.clear()
        entry = (weakref.ref(model), hashlib.sha256(repr(model).encode()).hexdigest())
        _MODEL_KEYS[id(model)] = entry
    return entry[1]


def _per_image(source: Dataset, probability: float, model: ModelInfo, trust: Trust, uids: OutputUIDs,
               settings: BuildSettings, review_url: str | None) -> list[hd.sr.ContentItem]:
    """The content items whose values can differ from one image to the next, each built as
    :func:`build_report_highdicom` builds it (so with highdicom's checks of its value)."""
    evaluations, measurements = _findings(probability, model, trust)
    return [*_library_descriptors(source), _library_image(source), *_tracking(uids, settings),
            hd.sr.SourceImageForMeasurementGroup.from_source_image(source),
            *(e[0] for e in evaluations), *(m[0] for m in measurements), *_texts(model, trust, review_url)]


def _check_patient_study(reference: Dataset) -> None:
    """The checks highdicom's SOPClass makes of the values it copies from the source, which
    refuse the same images here (highdicom.base.SOPClass.__init__)."""
    DA(reference.PatientBirthDate)
    if reference.PatientSex not in (None, ""):
        PatientSexValues(reference.PatientSex)
    if reference.StudyDate is not None:
        DA(reference.StudyDate)
    if reference.StudyTime is not None:
        TM(reference.StudyTime)


def _template(source: Dataset, sc: Dataset, probability: float, model: ModelInfo, trust: Trust,
              settings: BuildSettings, review_url: str | None) -> Template | None:
    """highdicom's SR for this image's shape, built from a copy of the source without the patient."""
    placeholder = {name: derived_uid(None, "sr-template", name) for name in ("study", "series", "sop", "sc", "sr")}
    probe = Dataset()
    for keyword in _SHAPE_ATTRIBUTES:
        if keyword in source:
            probe[keyword] = source[keyword]
    probe.StudyInstanceUID, probe.SeriesInstanceUID = placeholder["study"], placeholder["series"]
    probe.SOPInstanceUID = placeholder["sop"]
    probe_sc = Dataset()
    probe_sc.SOPClassUID, probe_sc.SOPInstanceUID = sc.SOPClassUID, placeholder["sc"]
    probe_sc.StudyInstanceUID, probe_sc.SeriesInstanceUID = placeholder["study"], placeholder["sc"]
    uids = OutputUIDs(sc_series=placeholder["sc"], sc_instance=placeholder["sc"], sr_series=placeholder["sr"],
                      sr_instance=placeholder["sr"])
    link = "-" if review_url else None
    sr = build_report_highdicom(probe, probe_sc, probability, model, uids, settings, trust=trust, review_url=link)
    # Every attribute highdicom's constructor sets from the source must be one the copy replaces.
    if not {Tag(k) for k in ("StudyInstanceUID", *PATIENT_STUDY_TYPE2)} <= set(
            patient_study_tags(str(source.SOPClassUID))):
        return None
    return Template.from_dataset(sr, _per_image(probe, probability, model, trust, uids, settings, link))


def build_report(
    source: Dataset, sc: Dataset, probability: float, model: ModelInfo, uids: OutputUIDs,
    settings: BuildSettings, *, trust: Trust | None = None, review_url: str | None = None,
    now: datetime | None = None,
) -> Dataset:
    """A TID 1500 Measurement Report: the probability, the decision and the model identity.

    Element for element the dataset :func:`build_report_highdicom` builds, at a fraction of its
    CPU: highdicom builds and checks the report once per shape (:data:`TEMPLATES`), and each
    image's values are filled into a copy of it (:mod:`worker.outputs.sr_template`).

    Args:
        source: The image the model read.
        sc: The overlay from :func:`build_secondary_capture`; evidence and Image Library.
        probability: Model output in [0, 1]; ``model.threshold`` makes the decision.
        model, uids, settings: The model, output UIDs, site choices.
        trust: Out-of-distribution gate and heatmap faithfulness. When ``trust.withheld``
            the finding is Not Evaluated and no probability is reported.
        review_url: The dashboard's link to this result, carried as a TEXT item of the group.
        now: Content, Series and Instance Creation Date/Time; the clock's when None.
    """
    trust = trust or Trust()
    _check(source, sc, probability, model)
    now = now or datetime.now()
    reference = as_reference(source)
    per_image = _per_image(source, probability, model, trust, uids, settings, review_url)
    shape = (_model_key(model), settings.model_dump_json(), repr(source.get("SpecificCharacterSet")),
             tuple(slot_of(item) for item in per_image))
    template = TEMPLATES.get(shape, lambda: _template(source, sc, probability, model, trust, settings, review_url))
    if template is None:  # a shape the template cannot express: highdicom builds each one
        return build_report_highdicom(source, sc, probability, model, uids, settings, trust=trust,
                                      review_url=review_url, now=now)
    _check_patient_study(reference)
    sr = template.instance(uids.sr_instance)
    if not template.fill(sr, per_image):
        raise WorkerError("SR template does not match the image's content items")  # a bug in `shape`
    sr.SOPInstanceUID, sr.SeriesInstanceUID = str(uids.sr_instance), str(uids.sr_series)
    sr.InstanceCreationDate, sr.InstanceCreationTime = DA(now.date()), TM(now.time())
    sr.ContentDate, sr.ContentTime = DA(now.date()), TM(now.time())
    sr.SeriesDate, sr.SeriesTime = sr.ContentDate, sr.ContentTime  # as stamp_dates
    sr.CurrentRequestedProcedureEvidenceSequence = evidence([reference, sc])
    copy_patient_and_study(sr, reference)
    return sr
