"""lungdet's boxes for one X-ray as DICOM: a Structured Report, an overlay image and a presentation state, in the X-ray's own study.

**The report** is a TID 1500 Measurement Report with one region per box, or, for an image
without boxes, a Chest CAD SR without findings: :mod:`lungdet.show.dicom_sr` builds it and reads it back.

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
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset
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
    RESEARCH_NOTICE,
    ModelIdentity,
    box_polyline,
    derived_uid,
    gsps_uid,
    highdicom_missing,
    overlay_uid,
    quiet_highdicom,
    repair_copied_values,
    series_uid,
    with_empty_laterality,
    with_type2_present,
)
from lungdet.show.dicom_sr import structured_report
from lungdet.show.visualize import draw_overlay
from lungdet.submission.prediction_string import Prediction

try:
    import highdicom as hd
except ImportError as error:  # the dicom extra; cli callers turn this into a one-line message
    raise highdicom_missing(error) from error

GSPS_LAYER = "LUNGDET"


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
