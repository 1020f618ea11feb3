"""One X-ray with its boxes drawn: truth green, predictions orange with their confidence, errors dashed, and a legend.

What ``lungdet visualize``, the EDA samples, the server's picture, the DICOM overlay and the
augmentation check all draw with. Boxes are XYWH_ABS in the pixels of the image they are drawn
on; :func:`fit_for_display` shrinks an image and its boxes together.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

from lungdet.boxes import as_box_array, scale_xywh
from lungdet.errors import LungdetError
from lungdet.submission.prediction_string import Prediction
from lungdet.submission.score import match_predictions, score_image

# RGB. Green and orange stay apart for the common red-green colour blindness (they differ in
# lightness and blue), and neither is a grey that could be mistaken for anatomy.
TRUTH_COLOR = (40, 220, 60)
PREDICTION_COLOR = (255, 140, 0)
# Errors are dashed as well as coloured, so they stand out without relying on colour alone.
MISSED_COLOR = (255, 40, 255)  # a truth box no prediction found
FALSE_ALARM_COLOR = (255, 40, 40)  # a prediction that found no truth box
TEXT_COLOR = (255, 255, 255)
# A prediction counts as finding a truth box above this IoU, the middle of the metric's 0.40-0.75.
MATCH_IOU = 0.5
DISCLAIMER = "Not a diagnostic device"
DEFAULT_MAX_SIZE = 1024


def encode_image(pixels: np.ndarray, extension: str, *, what: str, parameters: Sequence[int] = ()) -> bytes:
    """Grey ``[H, W]`` or RGB ``[H, W, 3]`` uint8 pixels encoded by OpenCV as ``extension`` ('.png', '.jpg').

    ``what`` names the picture in the error, which only a broken OpenCV install would raise.
    """
    ok, encoded = cv2.imencode(
        extension, cv2.cvtColor(pixels, cv2.COLOR_RGB2BGR) if pixels.ndim == 3 else pixels, list(parameters)
    )
    if not ok:
        raise LungdetError(
            f"{what}: OpenCV could not encode a {pixels.shape} image as {extension}; check the OpenCV install"
        )
    return encoded.tobytes()


def _line_thickness(rows: int, columns: int) -> int:
    # 3 px at 1024, 1 px at 256: thin enough not to hide a small box, thick enough to see.
    return max(1, round(min(rows, columns) / 340))


def _font_scale(rows: int, columns: int) -> float:
    # Hershey text is about 22 px tall at scale 1; below 0.35 it is no longer readable.
    return max(0.35, min(rows, columns) / 1400)


def _pixel_corners(box: np.ndarray) -> tuple[tuple[int, int], tuple[int, int]]:
    """Top-left and bottom-right pixel of one XYWH_ABS box, for ``cv2.rectangle``."""
    x, y, width, height = (float(value) for value in box)
    return (round(x), round(y)), (max(round(x), round(x + width) - 1), max(round(y), round(y + height) - 1))


def _overlap_area(region: tuple[int, int, int, int], boxes: np.ndarray) -> float:
    """Total area of ``[N, 4]`` XYWH_ABS ``boxes`` inside ``region`` (XYXY, pixels)."""
    if len(boxes) == 0:
        return 0.0
    x0, y0, x1, y1 = region
    width = (np.minimum(boxes[:, 0] + boxes[:, 2], x1) - np.maximum(boxes[:, 0], x0)).clip(min=0)
    height = (np.minimum(boxes[:, 1] + boxes[:, 3], y1) - np.maximum(boxes[:, 1], y0)).clip(min=0)
    return float((width * height).sum())


def _draw_text_block(
    image: np.ndarray,
    lines: Sequence[tuple[str, tuple[int, int, int] | None]],
    *,
    corners: Sequence[str],
    avoid: np.ndarray,
    scale: float,
) -> str:
    """Draw ``lines`` (text, optional colour swatch) on a darkened panel; return the corner used.

    The panel goes in whichever of ``corners`` ('top-left', 'top-right', 'bottom-left',
    'bottom-right') covers the least of the ``avoid`` boxes (``[N, 4]`` XYWH_ABS), the first on a tie.
    """
    rows, columns = image.shape[:2]
    thickness = max(1, round(scale * 1.6))
    has_swatch = any(color is not None for _, color in lines)
    text_height = cv2.getTextSize("Ag", cv2.FONT_HERSHEY_SIMPLEX, scale, thickness)[0][1]
    swatch = round(text_height * 1.6) if has_swatch else 0
    widest = max(
        cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, thickness)[0][0] + (swatch if color else 0)
        for text, color in lines
    )
    # Shrink the text rather than let the panel cover most of a small image.
    budget = 0.9 * columns
    needed = widest + text_height * 2
    if needed > budget:
        shrink = budget / needed
        scale, widest, text_height, swatch = (
            scale * shrink,
            widest * shrink,
            max(1, round(text_height * shrink)),
            round(swatch * shrink),
        )
        thickness = max(1, round(scale * 1.6))
    line_step = round(text_height * 1.7)
    pad = max(2, round(text_height * 0.5))
    panel_width = int(pad * 2 + widest)
    panel_height = int(pad * 2 + line_step * (len(lines) - 1) + text_height * 1.3)
    margin_x, margin_y = max(1, round(columns * 0.01)), max(1, round(rows * 0.01))

    def region(corner: str) -> tuple[int, int, int, int]:
        x0 = margin_x if corner.endswith("left") else columns - margin_x - panel_width
        y0 = margin_y if corner.startswith("top") else rows - margin_y - panel_height
        return max(0, x0), max(0, y0), min(columns, x0 + panel_width), min(rows, y0 + panel_height)

    corner = min(corners, key=lambda candidate: _overlap_area(region(candidate), avoid))
    x0, y0, x1, y1 = region(corner)
    # Darken rather than blank the panel, so the anatomy under the legend stays faintly visible.
    image[y0:y1, x0:x1] = (image[y0:y1, x0:x1] * 0.3).astype(np.uint8)
    for index, (text, color) in enumerate(lines):
        baseline = y0 + pad + text_height + index * line_step
        text_x = x0 + pad
        if color is not None:
            half_line = max(1, round(text_height * 0.25))
            middle = baseline - text_height // 2
            cv2.rectangle(
                image, (text_x, middle - half_line), (text_x + round(swatch * 0.75), middle + half_line), color, -1
            )
            text_x += swatch
        cv2.putText(
            image, text, (text_x, baseline), cv2.FONT_HERSHEY_SIMPLEX, scale, TEXT_COLOR, thickness, cv2.LINE_AA
        )
    return corner


def _draw_box(image: np.ndarray, box: np.ndarray, color: tuple[int, int, int], thickness: int, *, dashed: bool) -> None:
    """One XYWH_ABS box outline; ``dashed`` draws it as dashes a few line widths long."""
    (x1, y1), (x2, y2) = _pixel_corners(box)
    if not dashed:
        cv2.rectangle(image, (x1, y1), (x2, y2), color, thickness, cv2.LINE_8)
        return
    dash = max(4, 4 * thickness)
    for start, end in (((x1, y1), (x2, y1)), ((x2, y1), (x2, y2)), ((x2, y2), (x1, y2)), ((x1, y2), (x1, y1))):
        length = max(abs(end[0] - start[0]), abs(end[1] - start[1]))
        for offset in range(0, length + 1, 2 * dash):
            stop = min(offset + dash, length)
            a = (
                start[0] + (end[0] - start[0]) * offset // max(length, 1),
                start[1] + (end[1] - start[1]) * offset // max(length, 1),
            )
            b = (
                start[0] + (end[0] - start[0]) * stop // max(length, 1),
                start[1] + (end[1] - start[1]) * stop // max(length, 1),
            )
            cv2.line(image, a, b, color, thickness, cv2.LINE_8)


def match_boxes(
    truth: np.ndarray, prediction: Prediction, *, iou_threshold: float = MATCH_IOU
) -> tuple[np.ndarray, np.ndarray]:
    """``(found, correct)``: which truth boxes a prediction matched, and which predictions matched one, by the metric's greedy rule."""
    found = np.zeros(len(truth), dtype=bool)
    correct = np.zeros(len(prediction.scores), dtype=bool)
    for match in match_predictions(truth, prediction, iou_threshold=iou_threshold):
        found[match.truth_index] = True
        correct[match.prediction_index] = True
    return found, correct


def _draw_confidence_tags(image: np.ndarray, prediction: Prediction, *, scale: float, thickness: int) -> None:
    """Each predicted box's confidence on an orange tag above it (inside its top edge when there is no room)."""
    columns = image.shape[1]
    text_thickness = max(1, round(scale * 1.6))
    order = np.argsort(prediction.scores, kind="stable")
    for score, box in zip(prediction.scores[order], as_box_array(prediction.boxes)[order], strict=True):
        text = f"{float(score):.2f}"
        (text_width, text_height), descent = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, text_thickness)
        (x1, y1), _ = _pixel_corners(box)
        pad = max(1, round(text_height * 0.3))
        tag_height = text_height + descent + 2 * pad
        # Above the box when there is room, else just inside its top edge.
        top = y1 - tag_height if y1 - tag_height >= 0 else y1 + thickness
        left = min(max(0, x1), max(0, columns - text_width - 2 * pad))
        cv2.rectangle(image, (left, top), (left + text_width + 2 * pad, top + tag_height), PREDICTION_COLOR, -1)
        cv2.putText(
            image,
            text,
            (left + pad, top + pad + text_height),
            cv2.FONT_HERSHEY_SIMPLEX,
            scale,
            (0, 0, 0),
            text_thickness,
            cv2.LINE_AA,
        )


def _legend_lines(
    title: str,
    truth_boxes: np.ndarray | None,
    prediction: Prediction | None,
    verdicts: tuple[np.ndarray, np.ndarray],
    *,
    truth_in_legend: bool,
) -> list[tuple[str, tuple[int, int, int] | None]]:
    """The legend's ``(text, colour swatch)`` lines: the title, then counts per colour (per verdict when judged).

    ``verdicts`` is :func:`match_boxes`' ``(found, correct)``, used when both truth and prediction are given.
    """
    if truth_boxes is not None and prediction is not None:
        found, correct = verdicts
        image_score = score_image(truth_boxes, prediction)
        verdict = f"   RSNA score {image_score.score:.2f}" if image_score is not None else "   not scored (no boxes)"
        return [
            (title + verdict, None),
            (f"truth found ({int(found.sum())})", TRUTH_COLOR),
            (f"truth missed, dashed ({int((~found).sum())})", MISSED_COLOR),
            (f"prediction correct ({int(correct.sum())})", PREDICTION_COLOR),
            (f"false alarm, dashed ({int((~correct).sum())})", FALSE_ALARM_COLOR),
        ]
    truth_line = f"truth ({len(truth_boxes)})" if truth_boxes is not None else "truth: not given"
    prediction_line = (
        f"prediction (confidence) ({len(prediction.scores)})" if prediction is not None else "prediction: not given"
    )
    lines = [(title, None), (truth_line, TRUTH_COLOR), (prediction_line, PREDICTION_COLOR)]
    if not truth_in_legend:
        lines.pop(1)
    return lines


def draw_overlay(
    pixels: np.ndarray,
    *,
    truth: np.ndarray | None,
    prediction: Prediction | None,
    title: str,
    truth_in_legend: bool = True,
) -> np.ndarray:
    """The X-ray with truth and predicted boxes and a legend, as RGB.

    Parameters
    ----------
    pixels
        uint8 ``[H, W]`` grey image (bright = dense).
    truth
        ``[N, 4]`` XYWH_ABS in the pixels of ``pixels``, or None when there is no truth to show.
        Drawn as green outlines.
    prediction
        Scores ``[M]`` and ``[M, 4]`` XYWH_ABS boxes in the pixels of ``pixels``, or None. Drawn as
        orange outlines labelled with the confidence (two decimals); the most confident on top.
        With truth too, each is judged by the metric's greedy matching at IoU > :data:`MATCH_IOU`:
        truth no prediction found is drawn dashed magenta, a prediction that found no truth dashed
        red, and the legend gives the counts and the image's RSNA score.
    title
        First legend line, usually the patientId.
    truth_in_legend
        False leaves the truth line out of the legend, for an image that never has truth (an upload).

    Returns
    -------
    np.ndarray
        uint8 ``[H, W, 3]`` RGB.
    """
    if pixels.ndim != 2 or pixels.dtype != np.uint8:
        raise ValueError(f"pixels must be a uint8 [H, W] grey image, got {pixels.dtype} {pixels.shape}")
    rows, columns = pixels.shape
    image = np.ascontiguousarray(np.repeat(pixels[:, :, None], 3, axis=2))
    thickness = _line_thickness(rows, columns)
    scale = _font_scale(rows, columns)

    truth_boxes = as_box_array(truth) if truth is not None else None
    judged = truth_boxes is not None and prediction is not None
    if judged:
        found, correct = match_boxes(truth_boxes, prediction)
    else:
        found = np.ones(0 if truth_boxes is None else len(truth_boxes), dtype=bool)
        correct = np.ones(0 if prediction is None else len(prediction.scores), dtype=bool)
    if prediction is not None:
        order = np.argsort(prediction.scores, kind="stable")  # least confident first, so the best ends on top
        for index in order:
            color = PREDICTION_COLOR if correct[index] else FALSE_ALARM_COLOR
            _draw_box(image, as_box_array(prediction.boxes)[index], color, thickness, dashed=not correct[index])
    if truth_boxes is not None:
        for box, was_found in zip(truth_boxes, found, strict=True):
            _draw_box(image, box, TRUTH_COLOR if was_found else MISSED_COLOR, thickness, dashed=not was_found)
    if prediction is not None:
        _draw_confidence_tags(image, prediction, scale=scale, thickness=thickness)

    drawn = [
        boxes
        for boxes in (truth_boxes, None if prediction is None else as_box_array(prediction.boxes))
        if boxes is not None
    ]
    avoid = np.concatenate(drawn) if drawn else as_box_array([])
    legend_lines = _legend_lines(title, truth_boxes, prediction, (found, correct), truth_in_legend=truth_in_legend)
    # The legend takes the corner that hides the fewest boxes; the notice the bottom corner left over.
    legend_corner = _draw_text_block(
        image, legend_lines, corners=("top-left", "top-right", "bottom-left", "bottom-right"), avoid=avoid, scale=scale
    )
    footer_corners = [corner for corner in ("bottom-left", "bottom-right") if corner != legend_corner]
    _draw_text_block(image, [(DISCLAIMER, None)], corners=footer_corners, avoid=avoid, scale=scale * 0.8)
    return image


def judge_image(truth: np.ndarray | None, prediction: Prediction | None) -> dict[str, object]:
    """``score``, ``missed`` and ``false_alarms`` of one image for the gallery (all empty unless truth and prediction are both given)."""
    if truth is None or prediction is None:
        return {"score": None, "missed": 0, "false_alarms": 0}
    truth = as_box_array(truth)
    found, correct = match_boxes(truth, prediction)
    image_score = score_image(truth, prediction)
    return {
        "score": None if image_score is None else image_score.score,
        "missed": int((~found).sum()),
        "false_alarms": int((~correct).sum()),
    }


def fit_for_display(
    pixels: np.ndarray, truth: np.ndarray | None, prediction: Prediction | None, *, max_size: int
) -> tuple[np.ndarray, np.ndarray | None, Prediction | None]:
    """Shrink ``pixels`` so its longer side is at most ``max_size``, scaling the XYWH_ABS boxes with it.

    Boxes come in the pixels of ``pixels`` and go out in the pixels of the returned image.
    Images already small enough are returned unchanged (never enlarged).
    """
    rows, columns = pixels.shape
    if max(rows, columns) <= max_size:
        return pixels, truth, prediction
    ratio = max_size / max(rows, columns)
    new_rows, new_columns = max(1, round(rows * ratio)), max(1, round(columns * ratio))
    # INTER_AREA averages, so thin structures survive the shrink instead of aliasing.
    resized = cv2.resize(pixels, (new_columns, new_rows), interpolation=cv2.INTER_AREA)
    scale_x, scale_y = new_columns / columns, new_rows / rows
    if truth is not None:
        truth = scale_xywh(truth, scale_x=scale_x, scale_y=scale_y)
    if prediction is not None:
        prediction = Prediction(prediction.scores, scale_xywh(prediction.boxes, scale_x=scale_x, scale_y=scale_y))
    return resized, truth, prediction
