"""Draw truth and predicted boxes over chest X-rays, one PNG per DICOM plus an HTML index.

Truth boxes (from an RSNA labels CSV) are green, predicted boxes (from a Kaggle submission CSV)
orange with their confidence; a legend on each image names the colours, the patientId and says
that this is not a diagnostic device. Boxes are XYWH_ABS in the DICOM's original pixels and are
scaled with the image when ``--max-size`` shrinks it.

Run::

    lungdet visualize --dicom-dir stage_2_train_images --labels stage_2_train_labels.csv \\
        --submission submission.csv --out overlays --limit 50

then open ``overlays/index.html``.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from lungdet.atomic import write_bytes_atomic, write_text_atomic
from lungdet.boxes import as_box_array, scale_xywh
from lungdet.cli_types import fraction, int_in_range
from lungdet.data_tools.dicom_io import find_dicoms
from lungdet.data_tools.image_io import find_images, read_file_pixels
from lungdet.data_tools.labels import PatientLabels, read_labels
from lungdet.errors import ImageReadError, LungdetError
from lungdet.show.pages import render_page
from lungdet.submission.prediction_string import Prediction, keep_confident, read_submission
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
INDEX_FILE = "index.html"
DEFAULT_MAX_SIZE = 1024


@dataclass(frozen=True)
class OverlayEntry:
    """One written PNG, as the HTML index lists it. Counts are None when that source was not given."""

    patient_id: str
    png_name: str
    truth_count: int | None
    prediction_count: int | None
    max_confidence: float | None
    score: float | None = None  # the image's RSNA score, when truth and predictions are both given and it is scored
    missed: int = 0  # truth boxes no prediction found at IoU > MATCH_IOU
    false_alarms: int = 0  # predictions that found no truth box at IoU > MATCH_IOU


@dataclass(frozen=True)
class VisualizeSummary:
    """What :func:`write_overlays` wrote and what it skipped (``(path, reason)`` pairs)."""

    entries: list[OverlayEntry]
    skipped: list[tuple[Path, str]]
    index_html: Path


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


def render_index_html(entries: Sequence[OverlayEntry], skipped: Sequence[tuple[Path, str]]) -> str:
    """An HTML page showing every overlay PNG in a grid with its caption, and the skipped files.

    With truth and predictions, the gallery can be sorted worst first (by RSNA score) and
    filtered to images with misses or with false alarms (a few lines of inline script; the page
    stays one file that opens from disk).
    """
    judged = any(entry.score is not None or entry.missed or entry.false_alarms for entry in entries)
    legend = [(TRUTH_COLOR, "truth"), (PREDICTION_COLOR, "prediction (confidence)")]
    if judged:
        legend = [
            (TRUTH_COLOR, "truth found"),
            (MISSED_COLOR, "truth missed (dashed)"),
            (PREDICTION_COLOR, "correct prediction"),
            (FALSE_ALARM_COLOR, "false alarm (dashed)"),
        ]
    return render_page(
        "overlays.html.j2",
        title="lungdet overlays",
        heading=f"lungdet overlays ({len(entries)} images)",
        disclaimer=DISCLAIMER,
        notice="These pictures show a model's output for research and debugging only; they are not for diagnosis or treatment.",
        dark=True,
        entries=entries,
        judged=judged,
        legend=legend,
        match_iou=MATCH_IOU,
        skipped=skipped,
    )


def write_overlays(
    paths: Sequence[Path],
    out_dir: Path,
    *,
    labels: Mapping[str, PatientLabels] | None,
    predictions: Mapping[str, Prediction] | None,
    max_size: int = DEFAULT_MAX_SIZE,
    min_confidence: float = 0.0,
    progress: bool = False,
) -> VisualizeSummary:
    """Write ``out_dir/{patientId}.png`` for each X-ray (DICOM, PNG or JPEG; patientId = file stem) in ``paths`` and ``out_dir/index.html``.

    ``labels`` and ``predictions`` map patientId to boxes in each image's original pixels (XYWH_ABS);
    None means that source was not given, and a patient missing from a given source is shown
    as 'not given' too. Unreadable files are skipped and returned with the reason.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    entries: list[OverlayEntry] = []
    skipped: list[tuple[Path, str]] = []
    for path in tqdm(paths, desc="visualize", unit="img", disable=None if progress else True):
        try:
            pixels = read_file_pixels(path)
        except ImageReadError as error:
            skipped.append((Path(path), error.reason))
            tqdm.write(f"skipped {path}: {error.reason}")
            continue
        patient_id = Path(path).stem
        truth = labels[patient_id].boxes if labels is not None and patient_id in labels else None
        prediction = predictions.get(patient_id) if predictions is not None else None
        if prediction is not None:
            prediction = keep_confident(prediction, min_confidence=min_confidence)
        pixels, shown_truth, shown_prediction = fit_for_display(pixels, truth, prediction, max_size=max_size)
        rgb = draw_overlay(pixels, truth=shown_truth, prediction=shown_prediction, title=patient_id)
        png_name = f"{patient_id}.png"
        write_bytes_atomic(out_dir / png_name, encode_image(rgb, ".png", what=f"{path}: the overlay"))
        judged = judge_image(truth, prediction)
        entries.append(
            OverlayEntry(
                patient_id=patient_id,
                png_name=png_name,
                truth_count=None if truth is None else len(truth),
                prediction_count=None if prediction is None else len(prediction.scores),
                max_confidence=float(prediction.scores.max())
                if prediction is not None and len(prediction.scores)
                else None,
                **judged,
            )
        )
    index_html = out_dir / INDEX_FILE
    write_text_atomic(index_html, render_index_html(entries, skipped))
    return VisualizeSummary(entries=entries, skipped=skipped, index_html=index_html)


def worst_first(
    paths: Sequence[Path], truth: Mapping[str, np.ndarray], predictions: Mapping[str, Prediction]
) -> list[Path]:
    """``paths`` ordered by their image's RSNA score, worst first; images with no truth and no box (they cost nothing) last.

    The patientId is the file stem; ties keep patientId order. A gallery drawn in this order
    opens on the model's mistakes.
    """

    def key(path: Path) -> tuple[float, str]:
        patient = Path(path).stem
        prediction = predictions.get(patient, Prediction.empty())
        boxes = truth.get(patient, np.zeros((0, 4)))
        scored = score_image(boxes, prediction)
        return (2.0 if scored is None else scored.score, patient)

    return sorted(paths, key=key)


def select_images(
    paths: Sequence[Path],
    *,
    labels: Mapping[str, PatientLabels] | None,
    predictions: Mapping[str, Prediction] | None,
    only_positive: bool,
    limit: int | None,
) -> list[Path]:
    """``paths`` (in order) kept to those with a truth or predicted box when ``only_positive``, then cut to ``limit``.

    The file stem is the patientId, so this needs no DICOM reads.
    """
    selected = list(paths)
    if only_positive:

        def has_box(patient_id: str) -> bool:
            in_truth = labels is not None and patient_id in labels and len(labels[patient_id].boxes) > 0
            in_prediction = (
                predictions is not None and patient_id in predictions and len(predictions[patient_id].scores) > 0
            )
            return in_truth or in_prediction

        selected = [path for path in selected if has_box(Path(path).stem)]
    return selected[:limit] if limit is not None else selected


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    """Arguments of ``lungdet visualize``."""
    parser = argparse.ArgumentParser(
        prog="lungdet visualize",
        description="Draw truth (green) and predicted (orange, with confidence) boxes over DICOMs (or PNG/JPEG X-rays): one PNG each plus index.html.",
        epilog=(
            "example: lungdet visualize --dicom-dir data/stage_2_train_images --labels data/stage_2_train_labels.csv "
            "--submission runs/exp1/submission.csv --out runs/exp1/overlays --limit 50 --only-positive"
        ),
        add_help=add_help,
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--dicom-dir", type=Path, help="folder of .dcm files (searched recursively)")
    source.add_argument(
        "--image-dir", type=Path, help="folder of {patientId}.png|.jpg X-rays (searched recursively), instead of DICOMs"
    )
    parser.add_argument(
        "--labels", type=Path, help="RSNA labels CSV (patientId,x,y,width,height,Target) for the truth boxes"
    )
    parser.add_argument(
        "--submission", type=Path, help="Kaggle submission CSV (patientId,PredictionString) for the predicted boxes"
    )
    parser.add_argument("--out", type=Path, required=True, help="folder to write {patientId}.png and index.html into")
    parser.add_argument(
        "--limit", type=int_in_range(1), help="draw at most this many images (after --only-positive); default: all"
    )
    parser.add_argument(
        "--only-positive",
        action="store_true",
        help="only images with at least one truth or predicted box (needs --labels or --submission)",
    )
    parser.add_argument(
        "--max-size",
        type=int_in_range(64),
        default=DEFAULT_MAX_SIZE,
        help=f"shrink images so the longer side is at most this many pixels (default: {DEFAULT_MAX_SIZE})",
    )
    parser.add_argument(
        "--min-confidence",
        type=fraction,
        default=0.0,
        help="hide predicted boxes below this confidence, 0..1 (default: 0, show all)",
    )
    return parser


def main(args: argparse.Namespace) -> int:
    """Run ``lungdet visualize``; returns the exit status."""
    if args.only_positive and args.labels is None and args.submission is None:
        raise LungdetError(
            "--only-positive needs --labels or --submission to know which images have boxes; add one or drop --only-positive"
        )
    # Read both CSVs before any drawing, so a bad file fails in a second, not after an hour.
    labels = read_labels(args.labels) if args.labels is not None else None
    predictions = read_submission(args.submission) if args.submission is not None else None
    all_paths = find_dicoms(args.dicom_dir) if args.dicom_dir is not None else find_images(args.image_dir)
    kind = "DICOMs" if args.dicom_dir is not None else "images"
    if not all_paths:
        found = (
            "no .dcm files found; pass the folder that holds the DICOMs (e.g. stage_2_train_images/)"
            if args.dicom_dir is not None
            else "no .png or .jpg files found; pass the folder that holds the X-ray images"
        )
        raise LungdetError(f"{args.dicom_dir or args.image_dir}: {found}")
    paths = select_images(
        all_paths, labels=labels, predictions=predictions, only_positive=args.only_positive, limit=args.limit
    )
    summary = write_overlays(
        paths,
        args.out,
        labels=labels,
        predictions=predictions,
        max_size=args.max_size,
        min_confidence=args.min_confidence,
        progress=True,
    )
    print(
        f"wrote {len(summary.entries)} overlay PNGs to {args.out} (of {len(all_paths)} {kind} found, {len(paths)} selected)"
    )
    print(f"  index: {summary.index_html}")
    if summary.skipped:
        print(f"skipped {len(summary.skipped)} unreadable file(s):")
        for path, reason in summary.skipped:
            print(f"  {path}: {reason}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(get_args_parser().parse_args()))
