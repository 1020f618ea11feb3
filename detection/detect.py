"""One X-ray in, one JSON-ready answer out: what ``lungdet serve`` returns and ``lungdet predict --json`` prints.

A :class:`Detector` is a checkpoint loaded once. :func:`detect_bytes` reads one file's bytes
(DICOM, PNG or JPEG, told apart by content), runs the model through the same
:func:`~lungdet.detection.detector.predict_pixels` as a submission, and keeps every box the model gives;
:func:`detection_json` shapes that into the reply, with boxes in the image's original pixels::

    {"id", "label": {"name", "confidence", "probability", "calibrated", "source"}, "custom_labels": [...], "boxes": [...],
     "prediction_string", "image": {...}, "model": {...}, "min_confidence", "elapsed_ms", "notice"}

Run: ``lungdet predict --checkpoint runs/r50/best.pt --input patient.dcm --json``
"""

from __future__ import annotations

import base64
import hashlib
import time
from dataclasses import dataclass
from typing import Any

import cv2

from lungdet.data_tools.gate import refuse_unless_frontal_chest
from lungdet.data_tools.image_io import DEFAULT_MAX_PIXELS, XrayImage, read_xray
from lungdet.data_tools.metadata import ImageTags, laid_over
from lungdet.detection.detector import Detector
from lungdet.errors import ImageReadError
from lungdet.show.draw import DEFAULT_MAX_SIZE, draw_overlay, encode_image, fit_for_display
from lungdet.submission.prediction_string import (
    Prediction,
    format_prediction_string,
    keep_confident,
    parse_prediction_string,
)

LABEL_POSITIVE = "Lung Opacity"
LABEL_NEGATIVE = "No Lung Opacity"
NOTICE = "lungdet is a research tool, not a diagnostic device: its output is not medical advice and must not be used to diagnose or treat anyone."
# Percentages to two decimals keep the four decimals of a box confidence (0.8731 -> 87.31).
PERCENT_DECIMALS = 2
# Box fractions of the image: 6 decimals is a thousandth of a pixel on a 1024 px side.
FRACTION_DECIMALS = 6
# Well under the 1e-4 step of a shown confidence, well over the error of percent / 100.
SHOWN_CONFIDENCE_TOLERANCE = 1e-9
PREVIEW_JPEG_QUALITY = 92
UPLOAD_ID_HEX_DIGITS = 16


def upload_id(data: bytes) -> str:
    """The first 16 hex digits of the SHA-256 of ``data``: names an upload in replies and logs instead of its file name."""
    return hashlib.sha256(data).hexdigest()[:UPLOAD_ID_HEX_DIGITS]


@dataclass(frozen=True)
class Detection:
    """One image's result: every box the model gave (XYWH_ABS, the image's original pixels), before any cut-off,
    and the image head's probability (None for a model without one)."""

    upload_id: str
    image: XrayImage
    prediction: Prediction
    elapsed_ms: float
    probability: float | None = None


def detect_bytes(
    detector: Detector,
    data: bytes,
    *,
    name: str | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    tags: ImageTags | None = None,
    gate: bool = True,
) -> Detection:
    """Decode one X-ray held in memory and run the detector on it.

    ``name`` is what error messages call the file (default: ``upload <id>``); ``tags`` (view, sex,
    age: a metadata row) fill in or replace what the file says, for an image head with metadata. Raises
    :class:`~lungdet.errors.ImageReadError` for anything that is not a readable X-ray (see
    :func:`~lungdet.data_tools.image_io.read_xray`), before the model runs, and with ``gate`` for a DICOM whose
    tags say it is not a frontal chest radiograph (kind 'not_frontal_chest', :mod:`lungdet.data_tools.gate`).
    """
    started = time.perf_counter()
    identifier = upload_id(data)
    shown_name = name or f"upload {identifier}"
    image = read_xray(data, name=shown_name, max_pixels=max_pixels)
    if gate:
        refuse_unless_frontal_chest(image, name=shown_name)
    result = detector.predict(image.pixels, laid_over(image.tags, tags))
    return Detection(
        upload_id=identifier,
        image=image,
        prediction=result.prediction,
        elapsed_ms=(time.perf_counter() - started) * 1000,
        probability=result.probability,
    )


def error_json(error: ImageReadError) -> dict[str, Any]:
    """The reply for a file that is not a readable X-ray: ``{"error": {"kind", "message"}}`` (the server adds ``status``)."""
    return {"error": {"kind": error.kind, "message": str(error)}}


def image_label(
    prediction: Prediction,
    *,
    score_threshold: float,
    probability: float | None = None,
    image_threshold: float | None = None,
    calibrated: bool = False,
) -> dict[str, Any]:
    """The image-level verdict, ``{"name", "confidence", "probability", "calibrated", "source"}``.

    With an image head (``probability`` given), from its probability and its cut-off tuned on
    validation (``image_threshold``; 0.5 without one): source 'image_head', ``probability`` the
    probability of an opacity in percent (``calibrated``: Platt-scaled on validation images, so
    that 80 means about 80 in a population like the training set's) and ``confidence`` the
    percent in the named label (one minus it for "No Lung Opacity"). Without a head, from the
    boxes: positive when one reaches ``score_threshold`` (the rule a submission follows), source
    'max_box', and no percentage at all: a box's confidence is not the chance that the image has
    an opacity, and an image with no box is not 100% clear.
    """
    if probability is None:
        positive = bool(len(prediction.scores)) and float(prediction.scores.max()) >= score_threshold
        return {
            "name": LABEL_POSITIVE if positive else LABEL_NEGATIVE,
            "confidence": None,
            "probability": None,
            "calibrated": False,
            "source": "max_box",
        }
    positive = probability >= (0.5 if image_threshold is None else image_threshold)
    return {
        "name": LABEL_POSITIVE if positive else LABEL_NEGATIVE,
        "confidence": round(100 * (probability if positive else 1.0 - probability), PERCENT_DECIMALS),
        "probability": round(100 * probability, PERCENT_DECIMALS),
        "calibrated": calibrated,
        "source": "image_head",
    }


def detection_json(
    detection: Detection, *, detector_info: dict[str, Any], min_confidence: float | None = None
) -> dict[str, Any]:
    """The reply for one image (see the module docstring).

    ``min_confidence`` (a fraction; default: the checkpoint's ``score_threshold``) filters
    ``boxes``, ``custom_labels`` and ``prediction_string``; the verdict always uses the
    checkpoint's cut-off. ``boxes`` are the PredictionString's groups read back, so both carry
    the same rounding (4 decimals of confidence, 0.1 px) and order (most confident first).
    """
    score_threshold = float(detector_info["score_threshold"])
    cut_off = score_threshold if min_confidence is None else min_confidence
    # Filter on the confidences as shown (4 decimals), so that a shown value typed back as
    # min_confidence keeps that box; the tolerance absorbs percent -> fraction float error.
    rounded = parse_prediction_string(format_prediction_string(detection.prediction))
    shown = keep_confident(rounded, min_confidence=cut_off - SHOWN_CONFIDENCE_TOLERANCE)
    prediction_string = format_prediction_string(shown)
    width, height = detection.image.width, detection.image.height
    boxes = [
        {"x": x, "y": y, "width": box_width, "height": box_height, "confidence": confidence}
        for confidence, (x, y, box_width, box_height) in zip(shown.scores.tolist(), shown.boxes.tolist(), strict=True)
    ]
    custom_labels = [
        {
            "name": LABEL_POSITIVE,
            "confidence": round(100 * box["confidence"], PERCENT_DECIMALS),
            "geometry": {
                "bounding_box": {
                    "left": round(box["x"] / width, FRACTION_DECIMALS),
                    "top": round(box["y"] / height, FRACTION_DECIMALS),
                    "width": round(box["width"] / width, FRACTION_DECIMALS),
                    "height": round(box["height"] / height, FRACTION_DECIMALS),
                }
            },
        }
        for box in boxes
    ]
    return {
        "id": detection.upload_id,
        "label": image_label(
            detection.prediction,
            score_threshold=score_threshold,
            probability=detection.probability,
            image_threshold=detector_info.get("image_threshold"),
            calibrated=bool(detector_info.get("image_calibrated")),
        ),
        "custom_labels": custom_labels,
        "boxes": boxes,
        "prediction_string": prediction_string,
        "image": detection.image.describe(),
        "model": dict(detector_info),
        "min_confidence": round(100 * cut_off, PERCENT_DECIMALS),
        "elapsed_ms": round(detection.elapsed_ms, 1),
        "notice": NOTICE,
    }


def preview_jpeg(image: XrayImage, *, max_size: int = DEFAULT_MAX_SIZE) -> dict[str, Any]:
    """The X-ray as the model read it, for a page to draw boxes over: a JPEG of at most ``max_size`` on the longer side, base64.

    Boxes stay in original pixels: a viewer stretches the preview over ``image.width`` x ``image.height``.
    """
    pixels, _, _ = fit_for_display(image.pixels, None, None, max_size=max_size)
    data = encode_image(pixels, ".jpg", what="the preview", parameters=[cv2.IMWRITE_JPEG_QUALITY, PREVIEW_JPEG_QUALITY])
    return {
        "media_type": "image/jpeg",
        "width": int(pixels.shape[1]),
        "height": int(pixels.shape[0]),
        "data": base64.b64encode(data).decode("ascii"),
    }


def annotated_png(detection: Detection, *, min_confidence: float, max_size: int = DEFAULT_MAX_SIZE) -> bytes:
    """The X-ray with the boxes at or above ``min_confidence`` (a fraction) drawn by ``lungdet visualize``'s code, as PNG bytes.

    The legend names the upload by its id, never by a patient tag; the not-a-diagnostic-device notice is drawn in.
    """
    kept = keep_confident(detection.prediction, min_confidence=min_confidence)
    pixels, _, shown = fit_for_display(detection.image.pixels, None, kept, max_size=max_size)
    rgb = draw_overlay(
        pixels, truth=None, prediction=shown, title=f"lungdet {detection.upload_id}", truth_in_legend=False
    )
    return encode_image(rgb, ".png", what=f"the annotated upload {detection.upload_id}")
