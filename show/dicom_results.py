"""lungdet's boxes for one X-ray as DICOM: a Structured Report, an overlay image and a presentation state, in the X-ray's own study.

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

**The overlay** (with ``--dicom-out-overlay``) is a Secondary Capture image in the same study,
series 9902: the X-ray as lungdet reads it with the boxes and the not-a-diagnostic-device notice
burnt in (the drawing of ``lungdet visualize``), with the source's rows, columns, pixel spacing
and patient orientation.

**The presentation state** (with ``--dicom-out-gsps``) is a Grayscale Softcopy Presentation State,
series 9903, that a GSPS-capable viewer draws over the untouched X-ray as a switchable layer: each
box as a closed polyline in the source's pixels with its confidence as text, the research-use
notice, the window lungdet displayed (:func:`lungdet.data_tools.dicom_io.display_window`), the
whole image as the displayed area, and an INVERSE presentation LUT for MONOCHROME1 sources.

What every result shares (which model made it, the UIDs derived from that, the values copied from
the X-ray and how they are repaired) is in :mod:`lungdet.show.dicom_derived`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from tqdm import tqdm

from lungdet.atomic import write_bytes_atomic
from lungdet.data_tools.dicom_io import dicom_bytes, display_window, read_dataset, read_dicom
from lungdet.errors import DicomReadError
from lungdet.show.dicom_derived import (
    GSPS_SERIES_DESCRIPTION,
    GSPS_SERIES_NUMBER,
    MANUFACTURER,
    OVERLAY_SERIES_DESCRIPTION,
    OVERLAY_SERIES_NUMBER,
    REPORT_SERIES_DESCRIPTION,
    REPORT_SERIES_NUMBER,
    RESEARCH_NOTICE,
    ModelIdentity,
    box_polyline,
    derived_uid,
    gsps_uid,
    overlay_uid,
    polyline_box,
    quiet_highdicom,
    repair_copied_values,
    report_uid,
    series_uid,
    with_empty_laterality,
    with_type2_present,
)
from lungdet.show.visualize import draw_overlay
from lungdet.submission.prediction_string import Prediction

try:
    import highdicom as hd
except ImportError as error:  # the dicom extra; cli callers turn this into a one-line message
    raise ImportError(f"lungdet's DICOM results need highdicom ({error}); pip install 'lungdet[dicom]'") from error

GSPS_LAYER = "LUNGDET"
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


def overlay_image(source: Dataset, pixels: np.ndarray, prediction: Prediction, model: ModelIdentity) -> hd.sc.SCImage:
    """A Secondary Capture of ``pixels`` (the source as lungdet reads it, uint8 ``[rows, columns]``) with the boxes and notice burnt in."""
    source = with_type2_present(source)
    if pixels.shape[:2] != (int(source.Rows), int(source.Columns)):
        raise ValueError(f"pixels {pixels.shape[:2]} do not match the source's {source.Rows} x {source.Columns}")
    rgb = draw_overlay(
        pixels,
        truth=None,
        prediction=prediction,
        title=f"lungdet {model.version}: {RESEARCH_NOTICE}",
        truth_in_legend=False,
    )
    orientation = tuple(source.get("PatientOrientation") or ())
    spacing = source.get("PixelSpacing") or source.get("ImagerPixelSpacing")
    with quiet_highdicom():
        image = hd.sc.SCImage.from_ref_dataset(
            source,
            rgb,
            "RGB",
            8,
            "PATIENT",
            series_uid(source, model, "overlay"),
            OVERLAY_SERIES_NUMBER,
            overlay_uid(source, model),
            int(source.get("InstanceNumber") or 1),
            MANUFACTURER,
            pixel_spacing=tuple(float(value) for value in spacing) if spacing else None,
            # highdicom needs an orientation to build the image; the source's own value (often empty) is put back below.
            patient_orientation=orientation if len(orientation) == 2 else ("L", "F"),
            series_description=OVERLAY_SERIES_DESCRIPTION,
        )
    image.PatientOrientation = source.get("PatientOrientation", "")
    return repair_copied_values(with_empty_laterality(image))


def presentation_state(
    source: Dataset, stored_pixels: np.ndarray, prediction: Prediction, model: ModelIdentity
) -> hd.pr.GrayscaleSoftcopyPresentationState:
    """A GSPS over ``source``: its boxes as polylines with their confidences, the notice, and lungdet's window.

    ``stored_pixels`` are the source's stored values (``source.pixel_array``), from which the window is
    worked out as lungdet reads the image; ``prediction`` is XYWH_ABS in the source's pixels.
    """
    source = with_type2_present(source)
    photometric = str(source.get("PhotometricInterpretation", "")).upper()
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise ValueError(
            f"a grayscale presentation state needs a MONOCHROME1/2 image; this one is {photometric or 'without PhotometricInterpretation'}"
        )
    window = display_window(stored_pixels, source)
    layer = hd.pr.GraphicLayer(layer_name=GSPS_LAYER, order=1, description=f"lungdet boxes - {RESEARCH_NOTICE}")
    columns = int(source.Columns)
    graphics, texts = [], []
    for index, (score, box) in enumerate(zip(prediction.scores, prediction.boxes, strict=True), start=1):
        x, y, width, _ = (float(value) for value in box)
        graphics.append(
            hd.pr.GraphicObject(
                graphic_type=hd.pr.GraphicTypeValues.POLYLINE,
                graphic_data=box_polyline(box),
                units=hd.pr.AnnotationUnitsValues.PIXEL,
                tracking_id=f"lung opacity {index}",
                tracking_uid=derived_uid(gsps_uid(source, model), "box", index),
            )
        )
        # The label sits on the box's top edge, inside it, so it stays on the image for a box at the top.
        label_height = max(12.0, min(40.0, 0.03 * int(source.Rows)))
        texts.append(
            hd.pr.TextObject(
                text_value=f"opacity {float(score):.2f}",
                units=hd.pr.AnnotationUnitsValues.PIXEL,
                bounding_box=(x, y, min(x + max(width, 4 * label_height), float(columns)), y + label_height),
                text_justification=hd.pr.TextJustificationValues.LEFT,
            )
        )
    notice_height = max(12.0, 0.03 * int(source.Rows))
    texts.append(
        hd.pr.TextObject(
            text_value=f"lungdet {model.version}: {RESEARCH_NOTICE}",
            units=hd.pr.AnnotationUnitsValues.PIXEL,
            bounding_box=(0.0, 0.0, float(columns), notice_height),
            text_justification=hd.pr.TextJustificationValues.LEFT,
        )
    )
    annotation = hd.pr.GraphicAnnotation(
        referenced_images=[source], graphic_layer=layer, graphic_objects=graphics or None, text_objects=texts
    )
    rescaled = "RescaleSlope" in source or "RescaleIntercept" in source
    with quiet_highdicom():
        state = hd.pr.GrayscaleSoftcopyPresentationState(
            referenced_images=[source],
            series_instance_uid=series_uid(source, model, "gsps"),
            series_number=GSPS_SERIES_NUMBER,
            sop_instance_uid=gsps_uid(source, model),
            instance_number=int(source.get("InstanceNumber") or 1),
            manufacturer=MANUFACTURER,
            manufacturer_model_name=",".join(model.architectures)[:64],
            software_versions=f"lungdet {model.version}",
            device_serial_number=model.checkpoint_sha256s[0][:16],
            content_label="LUNGDET_BOXES",
            content_description=f"lungdet boxes - {RESEARCH_NOTICE}"[:64],
            graphic_annotations=[annotation],
            graphic_layers=[layer],
            # The rescale lungdet applied (none for 8-bit data), stated so a viewer does not apply the image's own on top.
            modality_lut_transformation=hd.ModalityLUTTransformation(
                rescale_intercept=window.intercept, rescale_slope=window.slope, rescale_type="US"
            )
            if rescaled
            else None,
            voi_lut_transformations=[
                hd.pr.SoftcopyVOILUTTransformation(
                    window_center=[window.center],
                    window_width=[window.width],
                    window_explanation=["lungdet's window"],
                )
            ],
            # MONOCHROME1 shows low values bright: INVERSE, or a viewer shows the X-ray as a negative.
            presentation_lut_transformation=hd.PresentationLUTTransformation(
                presentation_lut_shape="INVERSE" if photometric == "MONOCHROME1" else "IDENTITY"
            ),
            series_description=GSPS_SERIES_DESCRIPTION,
        )
    return repair_copied_values(with_empty_laterality(state))


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


def result_datasets(
    source: Dataset,
    pixels: np.ndarray | None,
    prediction: Prediction,
    probability: float | None,
    model: ModelIdentity,
    *,
    overlay: bool = False,
    gsps: bool = False,
) -> list[Dataset]:
    """Every result lungdet files for one X-ray: the report, then the overlay and the GSPS when asked for.

    ``source`` must hold its pixel data for ``gsps`` (the window is worked out from its stored values);
    ``pixels`` (the source as lungdet reads it) are needed for ``overlay``.
    """
    datasets: list[Dataset] = [structured_report(source, prediction, probability, model)]
    if overlay:
        if pixels is None:
            raise ValueError("an overlay needs the pixels lungdet read")
        datasets.append(overlay_image(source, pixels, prediction, model))
    if gsps:
        datasets.append(presentation_state(source, source.pixel_array, prediction, model))
    return datasets


RESULT_SUFFIXES = {"SR": "sr", "OT": "overlay", "PR": "gsps"}


def result_name(dataset: Dataset) -> str:
    """The file-name suffix of a result: ``sr``, ``overlay`` or ``gsps`` (by its modality)."""
    return RESULT_SUFFIXES[str(dataset.Modality)]


def write_results(
    out_dir: Path,
    name: str,
    source: Dataset,
    prediction: Prediction,
    probability: float | None,
    model: ModelIdentity,
    *,
    pixels: np.ndarray | None = None,
    gsps: bool = False,
) -> list[Path]:
    """Write ``OUT/{name}_sr.dcm``, ``OUT/{name}_overlay.dcm`` when ``pixels`` are given and ``OUT/{name}_gsps.dcm`` with ``gsps``, each whole or not at all."""
    datasets = result_datasets(source, pixels, prediction, probability, model, overlay=pixels is not None, gsps=gsps)
    paths = [Path(out_dir) / f"{name}_{result_name(dataset)}.dcm" for dataset in datasets]
    for path, dataset in zip(paths, datasets, strict=True):
        write_bytes_atomic(path, dicom_bytes(dataset))
    return paths


def write_results_for_files(
    out_dir: Path,
    results: Sequence[tuple[Path, Prediction, float | None]],
    model: ModelIdentity,
    *,
    overlay: bool = False,
    gsps: bool = False,
    progress: bool = True,
) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Reports (and overlays, and presentation states) for predicted files: ``(files written, [(input skipped, why)])``.

    Each input is ``(path, prediction already cut off, image probability or None)``. A file that
    is not a DICOM image (a PNG, a JPEG) has no study to file a report in and is skipped with
    its reason, as is one whose tags cannot be read.
    """
    written: list[Path] = []
    skipped: list[tuple[Path, str]] = []
    for path, prediction, probability in tqdm(
        results, desc="dicom out", unit="file", disable=None if progress else True
    ):
        try:
            source = read_dataset(path, headers_only=not gsps)
            missing = [
                keyword
                for keyword in (
                    "SOPClassUID",
                    "SOPInstanceUID",
                    "StudyInstanceUID",
                    "SeriesInstanceUID",
                    "Rows",
                    "Columns",
                )
                if keyword not in source
            ]
        except DicomReadError as error:
            skipped.append(
                (
                    Path(path),
                    f"not a DICOM image, so there is no study to file a report in ({error.reason.split('; ')[0][:80]})",
                )
            )
            continue
        if missing:
            skipped.append((Path(path), f"lacks {', '.join(missing)}, which a report must reference"))
            continue
        try:
            pixels = read_dicom(Path(path)).pixels if overlay else None
        except DicomReadError as error:
            skipped.append((Path(path), error.reason))
            continue
        photometric = str(source.get("PhotometricInterpretation", "")).upper()
        if gsps and photometric not in ("MONOCHROME1", "MONOCHROME2"):
            skipped.append(
                (
                    Path(path),
                    f"is {photometric or 'without PhotometricInterpretation'}; a grayscale presentation state needs MONOCHROME1/2 (--dicom-out-gsps)",
                )
            )
            continue
        written += write_results(
            out_dir, Path(path).stem, source, prediction, probability, model, pixels=pixels, gsps=gsps
        )
    return written, skipped
