"""The Structured Report on one X-ray: lungdet's boxes as a TID 1500 Measurement Report, or a Chest CAD SR without findings; and reading either back.

**The report** is a TID 1500 Measurement Report (Comprehensive 3D SR, built with highdicom):

- the patient and study modules copied from the source image, so the report files beside it
  (the one place where lungdet carries patient data on, and only inside DICOM);
- a new series, "lungdet boxes - Research use only, not for diagnosis", number 9901;
- per box, one planar region measurement group: the box as a closed 5-point POLYLINE in the
  source's pixel coordinates (column, row; (0, 0) is the top-left corner of the top-left pixel),
  referencing the source's SOP Instance UID; finding type Opacity (DCM 112001) at finding site
  Lung (SCT 39607008); and the box's confidence as a measurement ("Detection confidence", code
  CONF of lungdet's private scheme 99LUNGDET: a detector score, not a calibrated probability);
- no image-level measurement group (viewers such as OHIF read an image region from every group):
  the verdict sits in the report's own Qualitative Evaluations (UMLS C0034375): Opacity
  (DCM 112001) present (SCT 52101004), and, from a model with an image head, its probability as
  TEXT (DCM 122157 Probability, a decimal string such as ``0.8731``, since TID 1500 allows only
  CODE and TEXT there);
- the procedure "Imaging procedure" (SCT 363679005, from CID 100);
- the algorithm (TID 4019): name lungdet, its version, and as parameters every checkpoint's
  sha256, the architecture(s) and the box cut-off; the device observer is lungdet too.

**An image without boxes** gets a Chest CAD SR instead (TID 4100, same series and UID scheme):
"CAD Processing and Findings Summary: All algorithms succeeded; without findings", the detection
performed (Opacity, by lungdet, on the X-ray) and, from a model with an image head, the probability
as the algorithm parameter ``image probability 0.0700``. It is DICOM's form for a CAD result without
findings, and it keeps TID 1500 viewers from opening a report with no region (OHIF's SR viewport
breaks on one).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from lungdet.show.dicom_derived import (
    MANUFACTURER,
    REPORT_SERIES_DESCRIPTION,
    REPORT_SERIES_NUMBER,
    ModelIdentity,
    box_polyline,
    derived_uid,
    highdicom_missing,
    polyline_box,
    quiet_highdicom,
    repair_copied_values,
    report_uid,
    series_uid,
    with_type2_present,
)
from lungdet.submission.prediction_string import Prediction

try:
    import highdicom as hd
except ImportError as error:  # the dicom extra; cli callers turn this into a one-line message
    raise highdicom_missing(error) from error

# lungdet's own coding scheme (DICOM reserves designators starting with 99 for private schemes).
PRIVATE_SCHEME = "99LUNGDET"
BOX_CONFIDENCE = hd.sr.CodedConcept("CONF", PRIVATE_SCHEME, "Detection confidence")
OPACITY = codes.DCM.Opacity
LUNG = codes.SCT.Lung
IMAGE_PROBABILITY = codes.DCM.Probability
# CID 100 (Quantitative Diagnostic Imaging Procedures) has no chest radiograph; its general entry.
PROCEDURE = codes.SCT.ImagingProcedure
QUALITATIVE_EVALUATIONS = hd.sr.CodedConcept("C0034375", "UMLS", "Qualitative Evaluations")
NO_UNITS = codes.UCUM.NoUnits


def algorithm_parameters(model: ModelIdentity) -> list[str]:
    """TID 4019's Algorithm Parameters for ``model``: every checkpoint's sha256, the architectures and the box cut-off."""
    parameters = [f"checkpoint sha256 {sha}" for sha in model.checkpoint_sha256s]
    return parameters + [f"architecture {name}" for name in model.architectures] + [f"box cut-off {model.cut_off:g}"]


def algorithm_identification(model: ModelIdentity) -> hd.sr.AlgorithmIdentification:
    """TID 4019's Algorithm Identification for ``model``: name lungdet, its version and :func:`algorithm_parameters`."""
    parameters = algorithm_parameters(model)
    # No manufacturer row: TID 4019 as PixelMed validates it has none (it is in the equipment module and the device observer).
    return hd.sr.AlgorithmIdentification(name="lungdet", version=model.version, parameters=parameters)


def _code_is(item: Dataset, concept: hd.sr.CodedConcept) -> bool:
    name = item.ConceptNameCodeSequence[0]
    return (name.CodeValue, name.CodingSchemeDesignator) == (concept.value, concept.scheme_designator)


def qualitative_evaluations(probability: float | None) -> hd.sr.ContainerContentItem:
    """TID 1500's report-level Qualitative Evaluations: Opacity present, and the image head's probability."""
    container = hd.sr.ContainerContentItem(
        name=QUALITATIVE_EVALUATIONS, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
    )
    items = [
        hd.sr.CodeContentItem(
            name=OPACITY,
            value=codes.SCT.Present,
            relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
        )
    ]
    if probability is not None:
        items.append(
            hd.sr.TextContentItem(
                name=IMAGE_PROBABILITY,
                value=f"{float(probability):.4f}",
                relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
            )
        )
    container.ContentSequence = items
    return container


CHEST_CAD_SR = "1.2.840.10008.5.1.4.1.1.88.65"
PROBABILITY_PARAMETER = "image probability "


def _template(item: Dataset, identifier: str) -> Dataset:
    template = Dataset()
    template.MappingResource, template.TemplateIdentifier = "DCMR", identifier
    item.ContentTemplateSequence = [template]
    return item


def _image_item(source: Dataset) -> Dataset:
    # TID 4017's image the detection ran on: an IMAGE item without a concept name (the template gives none).
    item, reference = Dataset(), Dataset()
    reference.ReferencedSOPClassUID, reference.ReferencedSOPInstanceUID = source.SOPClassUID, source.SOPInstanceUID
    item.RelationshipType, item.ValueType, item.ReferencedSOPSequence = "INFERRED FROM", "IMAGE", [reference]
    return item


def no_findings_report(source: Dataset, probability: float | None, model: ModelIdentity) -> hd.sr.ComprehensiveSR:
    """The report on an X-ray without boxes: a Chest CAD SR (TID 4100) saying "All algorithms succeeded; without findings".

    This is DICOM's own form for a CAD result without findings (PS3.17 F.3.1), and viewers that
    only draw TID 1500 pass over it: OHIF's SR viewport reads a TID 1500 report's first measurement
    and breaks on a report without one. The detection performed is Opacity (DCM 112001) by
    lungdet (TID 4019, whose parameters carry the checkpoints, the cut-off and, from a model with
    an image head, ``image probability 0.0700``: TID 4100 has no other place for a number).
    """
    source = with_type2_present(source)
    contains, concept_mod = hd.sr.RelationshipTypeValues.CONTAINS, hd.sr.RelationshipTypeValues.HAS_CONCEPT_MOD
    algorithm = [
        hd.sr.TextContentItem(name=codes.DCM.AlgorithmName, value="lungdet", relationship_type=concept_mod),
        hd.sr.TextContentItem(name=codes.DCM.AlgorithmVersion, value=model.version, relationship_type=concept_mod),
    ]
    parameters = algorithm_parameters(model)
    if probability is not None:
        parameters.append(f"{PROBABILITY_PARAMETER}{float(probability):.4f}")
    algorithm += [
        hd.sr.TextContentItem(name=codes.DCM.AlgorithmParameters, value=text, relationship_type=concept_mod)
        for text in parameters
    ]
    detection = hd.sr.CodeContentItem(name=codes.DCM.DetectionPerformed, value=OPACITY, relationship_type=contains)
    detection.ContentSequence = algorithm
    successful = hd.sr.ContainerContentItem(
        name=codes.DCM.SuccessfulDetections, relationship_type=hd.sr.RelationshipTypeValues.INFERRED_FROM
    )
    successful.ContentSequence = [detection]
    detections = hd.sr.CodeContentItem(
        name=codes.DCM.SummaryOfDetections, value=codes.DCM.Succeeded, relationship_type=contains
    )
    detections.ContentSequence = [successful]
    root = _template(hd.sr.ContainerContentItem(name=codes.DCM.ChestCADReport), "4100")
    root.ContentSequence = [
        *hd.sr.LanguageOfContentItemAndDescendants(hd.sr.CodedConcept("en-US", "RFC5646", "English (United States)")),
        hd.sr.CodeContentItem(
            name=codes.DCM.CADProcessingAndFindingsSummary,
            value=codes.DCM.AllAlgorithmsSucceededWithoutFindings,
            relationship_type=contains,
        ),
        detections,
        hd.sr.CodeContentItem(
            name=codes.DCM.SummaryOfAnalyses, value=codes.DCM.NotAttempted, relationship_type=contains
        ),
    ]
    with quiet_highdicom():
        sr = hd.sr.ComprehensiveSR(
            evidence=[source],
            content=root,
            series_instance_uid=series_uid(source, model, "report"),
            series_number=REPORT_SERIES_NUMBER,
            sop_instance_uid=report_uid(source, model),
            instance_number=int(source.get("InstanceNumber") or 1),
            manufacturer=MANUFACTURER,
            is_complete=True,
            series_description=REPORT_SERIES_DESCRIPTION,
        )
    # The image the detection ran on goes in once highdicom is done: it wants every item named, and
    # TID 4017 names none. A plain Sequence, since highdicom's own would check for the name.
    [performed] = (
        [item for item in sr.ContentSequence if _code_is(item, codes.DCM.SummaryOfDetections)][0]
        .ContentSequence[0]
        .ContentSequence
    )
    Dataset.__setattr__(
        performed, "ContentSequence", pydicom.Sequence([*performed.ContentSequence, _image_item(source)])
    )
    # The Chest CAD SR IOD is the Comprehensive SR's modules under its own SOP class.
    sr.SOPClassUID = CHEST_CAD_SR
    sr.file_meta.MediaStorageSOPClassUID = CHEST_CAD_SR
    return repair_copied_values(sr)


def structured_report(
    source: Dataset, prediction: Prediction, probability: float | None, model: ModelIdentity
) -> hd.sr.Comprehensive3DSR | hd.sr.ComprehensiveSR:
    """The report on ``source`` (its metadata; pixels not needed): a Measurement Report with one region per box of ``prediction`` (already cut off).

    ``prediction`` is XYWH_ABS in the source's pixels; ``probability`` is the image head's, or None.
    Without boxes, the report is :func:`no_findings_report`'s.
    """
    source = with_type2_present(source)
    if not len(prediction.scores):
        return no_findings_report(source, probability, model)
    uid = report_uid(source, model)
    algorithm = algorithm_identification(model)
    region_source = hd.sr.SourceImageForRegion(source.SOPClassUID, source.SOPInstanceUID)
    groups: list = []
    for index, (score, box) in enumerate(zip(prediction.scores, prediction.boxes, strict=True), start=1):
        groups.append(
            hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(
                    uid=derived_uid(uid, "box", index), identifier=f"lung opacity {index}"
                ),
                referenced_region=hd.sr.ImageRegion(
                    graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
                    graphic_data=box_polyline(box),
                    source_image=region_source,
                ),
                finding_type=OPACITY,
                finding_sites=[hd.sr.FindingSite(LUNG)],
                algorithm_id=algorithm,
                measurements=[
                    hd.sr.Measurement(name=BOX_CONFIDENCE, value=float(score), unit=NO_UNITS, algorithm_id=algorithm)
                ],
            )
        )
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=derived_uid("lungdet device", model.key),
        name="lungdet",
        manufacturer_name=MANUFACTURER,
        model_name=",".join(model.architectures)[:64],
        serial_number=model.checkpoint_sha256s[0][:16],
    )
    context = hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.DCM.Device, observer_identifying_attributes=device
        )
    )
    # No image library: highdicom's descriptors for CR want ImagerPixelSpacing, which RSNA's files lack;
    # the X-ray is referenced by every box and by the evidence sequence.
    report = hd.sr.MeasurementReport(
        observation_context=context, procedure_reported=PROCEDURE, imaging_measurements=groups
    )
    # highdicom builds no report-level Qualitative Evaluations; it is the root container's last child (TID 1500 row 12).
    report[0].ContentSequence.append(qualitative_evaluations(probability))
    with quiet_highdicom():
        sr = hd.sr.Comprehensive3DSR(
            evidence=[source],
            content=report,
            series_instance_uid=series_uid(source, model, "report"),
            series_number=REPORT_SERIES_NUMBER,
            sop_instance_uid=uid,
            instance_number=int(source.get("InstanceNumber") or 1),
            manufacturer=MANUFACTURER,
            is_complete=True,
            series_description=REPORT_SERIES_DESCRIPTION,
        )
    return repair_copied_values(sr)


@dataclass(frozen=True)
class ReportContents:
    """What a lungdet report says, read back: the image it is about, its boxes and confidences, the verdict and probability."""

    source_sop_instance_uid: str
    prediction: Prediction
    opacity_present: bool
    probability: float | None


def read_report(dataset: Dataset) -> ReportContents:
    """Read a lungdet report back (the check that what was written says what was meant): a Measurement Report, or a no-findings Chest CAD SR."""
    if dataset.SOPClassUID == CHEST_CAD_SR:
        return _read_no_findings_report(dataset)
    with quiet_highdicom():
        report = hd.sr.Comprehensive3DSR.from_dataset(dataset)
    scores, boxes, sources = [], [], set()
    for group in report.content.get_planar_roi_measurement_groups():
        region = group.roi
        boxes.append(polyline_box(region.value))
        sources.add(
            region.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID
        )  # its SELECTED FROM image
        [measurement] = group.get_measurements(name=BOX_CONFIDENCE)
        scores.append(float(measurement.value))
    if len(sources) != 1:
        raise ValueError(f"a lungdet report references one image; this one references {sorted(sources)}")
    [evaluations] = [item for item in dataset.ContentSequence if _code_is(item, QUALITATIVE_EVALUATIONS)]
    [verdict] = [item for item in evaluations.ContentSequence if _code_is(item, OPACITY)]
    probabilities = [float(item.TextValue) for item in evaluations.ContentSequence if _code_is(item, IMAGE_PROBABILITY)]
    present = verdict.ConceptCodeSequence[0]
    return ReportContents(
        source_sop_instance_uid=sources.pop(),
        prediction=Prediction.from_arrays(scores, np.array(boxes).reshape(-1, 4)),
        opacity_present=(present.CodeValue, present.CodingSchemeDesignator)
        == (codes.SCT.Present.value, codes.SCT.Present.scheme_designator),
        probability=probabilities[0] if probabilities else None,
    )


def _read_no_findings_report(dataset: Dataset) -> ReportContents:
    [summary] = [item for item in dataset.ContentSequence if _code_is(item, codes.DCM.CADProcessingAndFindingsSummary)]
    if summary.ConceptCodeSequence[0].CodeValue != codes.DCM.AllAlgorithmsSucceededWithoutFindings.value:
        raise ValueError(
            f"a lungdet Chest CAD SR says 'without findings'; this one says {summary.ConceptCodeSequence[0].CodeMeaning!r}"
        )
    [detections] = [item for item in dataset.ContentSequence if _code_is(item, codes.DCM.SummaryOfDetections)]
    [performed] = detections.ContentSequence[0].ContentSequence
    parameters = [
        item.TextValue
        for item in performed.ContentSequence
        if "ConceptNameCodeSequence" in item and _code_is(item, codes.DCM.AlgorithmParameters)
    ]
    probabilities = [
        float(text.removeprefix(PROBABILITY_PARAMETER)) for text in parameters if text.startswith(PROBABILITY_PARAMETER)
    ]
    [image] = [item for item in performed.ContentSequence if item.ValueType == "IMAGE"]
    return ReportContents(
        source_sop_instance_uid=image.ReferencedSOPSequence[0].ReferencedSOPInstanceUID,
        prediction=Prediction.empty(),
        opacity_present=False,
        probability=probabilities[0] if probabilities else None,
    )
