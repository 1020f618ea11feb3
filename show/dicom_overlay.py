"""The overlay on one X-ray: a Secondary Capture image of the X-ray with lungdet's boxes burnt in.

**The overlay** (with ``--dicom-out-overlay``) is a Secondary Capture image in the same study,
series 9902: the X-ray as lungdet reads it with the boxes and the not-a-diagnostic-device notice
burnt in (the drawing of ``lungdet visualize``), with the source's rows, columns, pixel spacing
and patient orientation.
"""

from __future__ import annotations

import numpy as np
from pydicom.dataset import Dataset

from lungdet.show.dicom_derived import (
    MANUFACTURER,
    OVERLAY_SERIES_DESCRIPTION,
    OVERLAY_SERIES_NUMBER,
    RESEARCH_NOTICE,
    ModelIdentity,
    highdicom_missing,
    overlay_uid,
    quiet_highdicom,
    repair_copied_values,
    series_uid,
    with_empty_laterality,
    with_type2_present,
)
from lungdet.show.draw import draw_overlay
from lungdet.submission.prediction_string import Prediction

try:
    import highdicom as hd
except ImportError as error:  # the dicom extra; cli callers turn this into a one-line message
    raise highdicom_missing(error) from error


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
