"""The presentation state on one X-ray: lungdet's boxes as a switchable layer over the untouched image.

**The presentation state** (with ``--dicom-out-gsps``) is a Grayscale Softcopy Presentation State,
series 9903, that a GSPS-capable viewer draws over the untouched X-ray as a switchable layer: each
box as a closed polyline in the source's pixels with its confidence as text, the research-use
notice, the window lungdet displayed (:func:`lungdet.data_tools.dicom_io.display_window`), the
whole image as the displayed area, and an INVERSE presentation LUT for MONOCHROME1 sources.
"""

from __future__ import annotations

import numpy as np
from pydicom.dataset import Dataset

from lungdet.data_tools.dicom_io import display_window
from lungdet.show.dicom_derived import (
    GSPS_SERIES_DESCRIPTION,
    GSPS_SERIES_NUMBER,
    MANUFACTURER,
    RESEARCH_NOTICE,
    ModelIdentity,
    box_polyline,
    derived_uid,
    gsps_uid,
    highdicom_missing,
    quiet_highdicom,
    repair_copied_values,
    series_uid,
    with_empty_laterality,
    with_type2_present,
)
from lungdet.submission.prediction_string import Prediction

try:
    import highdicom as hd
except ImportError as error:  # the dicom extra; cli callers turn this into a one-line message
    raise highdicom_missing(error) from error

GSPS_LAYER = "LUNGDET"


def box_annotations(
    source: Dataset, prediction: Prediction, model: ModelIdentity
) -> tuple[list[hd.pr.GraphicObject], list[hd.pr.TextObject]]:
    """Each box of ``prediction`` (XYWH_ABS, ``source``'s pixels) as a closed polyline, and its confidence as a text label on its top edge."""
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
    return graphics, texts


def notice_text(source: Dataset, model: ModelIdentity) -> hd.pr.TextObject:
    """The research-use notice, with lungdet's version, as a text object across the top of ``source``."""
    columns = int(source.Columns)
    notice_height = max(12.0, 0.03 * int(source.Rows))
    return hd.pr.TextObject(
        text_value=f"lungdet {model.version}: {RESEARCH_NOTICE}",
        units=hd.pr.AnnotationUnitsValues.PIXEL,
        bounding_box=(0.0, 0.0, float(columns), notice_height),
        text_justification=hd.pr.TextJustificationValues.LEFT,
    )


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
    graphics, texts = box_annotations(source, prediction, model)
    texts.append(notice_text(source, model))
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
