"""Score a Kaggle submission against RSNA labels with the official competition metric.

Run it as ``lungdet score --submission submission.csv --labels stage_2_train_labels.csv``.

The metric (RSNA Pneumonia Detection Challenge, 2018), as implemented here:

- IoU thresholds ``t`` in (0.40, 0.45, 0.50, 0.55, 0.60, 0.65, 0.70, 0.75).
- Per image and threshold, predictions are taken in descending confidence (ties keep their
  order in the PredictionString). Each one is matched to the still-unmatched truth box with the
  highest IoU with it (ties: the first such truth box). It is a hit (TP) only if that IoU is
  strictly greater than ``t`` (Kaggle: "a hit if its IoU with a ground truth object is greater
  than the threshold"); otherwise it is a false positive (FP) and takes no truth box. Truth boxes
  left unmatched are false negatives (FN). Precision at ``t`` is TP / (TP + FP + FN).
- An image's score is the mean of its precisions over the 8 thresholds. An image with neither
  truth nor predicted boxes is left out of the mean; one with predicted boxes but no truth
  scores 0, as does one with truth but no predicted boxes.
- The dataset score (mAP) is the mean image score over the images not left out, and 0.0 when
  every image is left out (``n_scored`` is then 0, which says why).

Reported beside it: mean IoU of the pairs matched by the same greedy rule at IoU > 0 (any
overlap), image-level sensitivity (positive images with at least one predicted box) and
specificity (negative images with none), and per threshold the mean precision and the TP, FP
and FN counts summed over the scored images.

Labelled patients with no row in the submission count as having no predicted boxes; submission
rows for patients not in the labels are not scored, only counted.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from data_tools.boxes import as_box_array, iou_matrix_xywh
from data_tools.cli_types import fraction
from data_tools.labels import read_labels
from submission.prediction_string import Prediction, keep_confident, read_submission

# Exact literals, not np.arange(0.4, 0.8, 0.05): arange accumulates float error (its 0.65 is
# 0.6499999999999999), which would make an IoU of exactly 0.65 a hit at t = 0.65.
RSNA_IOU_THRESHOLDS: tuple[float, ...] = (0.40, 0.45, 0.50, 0.55, 0.60, 0.65, 0.70, 0.75)


class Match(NamedTuple):
    """One (prediction, truth) pair matched by the greedy rule."""

    prediction_index: int  # row of the Prediction as given (not in confidence order)
    truth_index: int  # row of the truth boxes
    iou: float


class ThresholdResult(NamedTuple):
    """Counts for one image at one IoU threshold."""

    iou_threshold: float
    true_positives: int
    false_positives: int
    false_negatives: int

    @property
    def precision(self) -> float:
        """TP / (TP + FP + FN); only defined when the image has a truth or a predicted box."""
        return self.true_positives / (self.true_positives + self.false_positives + self.false_negatives)


@dataclass(frozen=True)
class ImageScore:
    """The metric for one image: ``score`` is the mean precision over ``per_threshold``."""

    score: float
    per_threshold: tuple[ThresholdResult, ...]


@dataclass(frozen=True)
class ThresholdSummary:
    """One IoU threshold over a dataset: mean precision and summed counts over the scored images."""

    iou_threshold: float
    mean_precision: float
    true_positives: int
    false_positives: int
    false_negatives: int


@dataclass(frozen=True)
class ScoreReport:
    """The metric over a dataset, with the counts needed to read it. See the module docstring."""

    map: float  # mean image score over the scored images; 0.0 when n_scored is 0
    mean_iou: float | None  # over pairs matched at IoU > 0; None when no pair overlaps
    sensitivity: float | None  # positive images with >= 1 predicted box / n_positive; None if n_positive is 0
    specificity: float | None  # negative images with no predicted box / n_negative; None if n_negative is 0
    n_images: int  # labelled images considered (all of the truth mapping)
    n_scored: int  # images in the mean: those with a truth or a predicted box
    n_positive: int  # labelled images with >= 1 truth box
    n_negative: int  # labelled images with no truth box
    n_predicted_boxes: int  # predicted boxes scored, after the min_confidence filter
    n_missing_predictions: int  # labelled patients with no row in the submission (scored as no boxes)
    n_unknown_predictions: int  # submission patients not in the labels (not scored)
    min_confidence: float
    per_threshold: tuple[ThresholdSummary, ...]

    def to_dict(self) -> dict[str, object]:
        """A JSON-ready dict with the same keys as the fields; ``per_threshold`` becomes a list of dicts."""
        return {**asdict(self), "per_threshold": [asdict(summary) for summary in self.per_threshold]}


def _match_by_iou(iou: np.ndarray, *, iou_threshold: float) -> list[tuple[int, int]]:
    """Greedy matching on an ``[P, T]`` IoU matrix whose rows are already in descending confidence.

    Returns ``(row, truth_index)`` pairs. A row takes the unmatched truth with the highest IoU
    (``argmax`` picks the first on ties) if that IoU is strictly above ``iou_threshold``.
    """
    unmatched = np.ones(iou.shape[1], dtype=bool)
    pairs: list[tuple[int, int]] = []
    for row in range(iou.shape[0]):
        if not unmatched.any():
            break  # every later prediction is a false positive
        # -1 is below any threshold >= 0, so a matched truth is never chosen again.
        candidates = np.where(unmatched, iou[row], -1.0)
        best = int(np.argmax(candidates))
        if candidates[best] > iou_threshold:
            unmatched[best] = False
            pairs.append((row, best))
    return pairs


def _confidence_order(prediction: Prediction) -> np.ndarray:
    """Indices of the predicted boxes in descending confidence, ties in their given order."""
    return np.argsort(-prediction.scores, kind="stable")


def match_predictions(truth_boxes: np.ndarray, prediction: Prediction, *, iou_threshold: float) -> list[Match]:
    """Match one image's predicted boxes to its truth boxes with the metric's greedy rule.

    ``truth_boxes`` is ``[T, 4]`` and ``prediction.boxes`` ``[P, 4]``, both XYWH_ABS in the same
    pixel space. A prediction is matched when its IoU is strictly greater than ``iou_threshold``
    (pass 0.0 to match any overlap). Matches come in descending confidence.
    """
    order = _confidence_order(prediction)
    iou = iou_matrix_xywh(prediction.boxes[order], as_box_array(truth_boxes))
    pairs = _match_by_iou(iou, iou_threshold=iou_threshold)
    return [Match(int(order[row]), truth, float(iou[row, truth])) for row, truth in pairs]


def score_image(
    truth_boxes: np.ndarray, prediction: Prediction, *, thresholds: Sequence[float] = RSNA_IOU_THRESHOLDS
) -> ImageScore | None:
    """Score one image: mean over ``thresholds`` of TP / (TP + FP + FN).

    ``truth_boxes`` is ``[T, 4]`` and ``prediction.boxes`` ``[P, 4]``, both XYWH_ABS in the same
    pixel space (the DICOM's original pixels for RSNA). Returns ``None`` when both are empty: such
    an image is left out of the dataset mean.
    """
    if not thresholds:
        raise ValueError("thresholds must not be empty")
    truth = as_box_array(truth_boxes)
    n_truth, n_predicted = truth.shape[0], prediction.boxes.shape[0]
    if n_truth == 0 and n_predicted == 0:
        return None
    iou = iou_matrix_xywh(prediction.boxes[_confidence_order(prediction)], truth)
    results = []
    for threshold in thresholds:
        n_matched = len(_match_by_iou(iou, iou_threshold=threshold))
        results.append(ThresholdResult(threshold, n_matched, n_predicted - n_matched, n_truth - n_matched))
    return ImageScore(score=float(np.mean([result.precision for result in results])), per_threshold=tuple(results))


def _fraction_or_none(numerator: int, denominator: int) -> float | None:
    return numerator / denominator if denominator else None


def score_dataset(
    truth: Mapping[str, np.ndarray], predictions: Mapping[str, Prediction], *, min_confidence: float = 0.0
) -> ScoreReport:
    """Score ``predictions`` against ``truth`` over every patient in ``truth``.

    ``truth`` maps patientId to its ``[T, 4]`` XYWH_ABS truth boxes (``T`` is 0 for negatives);
    ``predictions`` maps patientId to a :class:`Prediction` in the same pixel space. Predicted
    boxes with a confidence below ``min_confidence`` (in [0, 1]) are dropped first. A patient in
    ``truth`` but not in ``predictions`` has no predicted boxes; a patient only in ``predictions``
    is counted in ``n_unknown_predictions`` and otherwise ignored.
    """
    if not 0.0 <= min_confidence <= 1.0:
        raise ValueError(f"min_confidence must be in [0, 1], got {min_confidence}")
    image_scores: list[ImageScore] = []
    matched_ious: list[float] = []
    n_positive = n_detected_positive = n_clear_negative = n_predicted_boxes = 0
    for patient_id, truth_boxes in truth.items():
        boxes = as_box_array(truth_boxes)
        prediction = keep_confident(predictions.get(patient_id, Prediction.empty()), min_confidence=min_confidence)
        n_predicted = prediction.boxes.shape[0]
        n_predicted_boxes += n_predicted
        if boxes.shape[0]:
            n_positive += 1
            n_detected_positive += int(n_predicted > 0)
        else:
            n_clear_negative += int(n_predicted == 0)
        image_score = score_image(boxes, prediction)
        if image_score is not None:
            image_scores.append(image_score)
        matched_ious.extend(match.iou for match in match_predictions(boxes, prediction, iou_threshold=0.0))

    per_threshold = tuple(
        ThresholdSummary(
            iou_threshold=threshold,
            mean_precision=float(np.mean([image.per_threshold[k].precision for image in image_scores])) if image_scores else 0.0,
            true_positives=sum(image.per_threshold[k].true_positives for image in image_scores),
            false_positives=sum(image.per_threshold[k].false_positives for image in image_scores),
            false_negatives=sum(image.per_threshold[k].false_negatives for image in image_scores),
        )
        for k, threshold in enumerate(RSNA_IOU_THRESHOLDS)
    )
    n_negative = len(truth) - n_positive
    return ScoreReport(
        map=float(np.mean([image.score for image in image_scores])) if image_scores else 0.0,
        mean_iou=float(np.mean(matched_ious)) if matched_ious else None,
        sensitivity=_fraction_or_none(n_detected_positive, n_positive),
        specificity=_fraction_or_none(n_clear_negative, n_negative),
        n_images=len(truth),
        n_scored=len(image_scores),
        n_positive=n_positive,
        n_negative=n_negative,
        n_predicted_boxes=n_predicted_boxes,
        n_missing_predictions=sum(patient_id not in predictions for patient_id in truth),
        n_unknown_predictions=sum(patient_id not in truth for patient_id in predictions),
        min_confidence=min_confidence,
        per_threshold=per_threshold,
    )


def format_report(report: ScoreReport) -> str:
    """A short human-readable table of ``report``."""

    def show(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.4f}"

    lines = [
        f"mAP          {show(report.map)}   images scored {report.n_scored} / {report.n_images}",
        f"mean IoU     {show(report.mean_iou)}",
        f"sensitivity  {show(report.sensitivity)}   positive images with a box ({report.n_positive} positive)",
        f"specificity  {show(report.specificity)}   negative images with no box ({report.n_negative} negative)",
        "",
        "IoU >  precision       TP       FP       FN",
    ]
    lines += [
        f"{summary.iou_threshold:.2f}   {summary.mean_precision:9.4f} {summary.true_positives:8d} "
        f"{summary.false_positives:8d} {summary.false_negatives:8d}"
        for summary in report.per_threshold
    ]
    return "\n".join(lines)


def get_args_parser() -> argparse.ArgumentParser:
    """The ``lungdet score`` command line; parsing does no work, so tests can call it alone."""
    parser = argparse.ArgumentParser(
        prog="lungdet score",
        description="Score a Kaggle submission.csv against RSNA labels with the official RSNA mAP\n"
        "(IoU thresholds 0.40..0.75), plus mean IoU, sensitivity and specificity.",
        epilog="example:\n  lungdet score --submission runs/fold0/submission.csv "
        "--labels data/stage_2_train_labels.csv --min-confidence 0.3 --json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--submission", type=Path, required=True, metavar="PATH", help="submission CSV: patientId,PredictionString"
    )
    parser.add_argument(
        "--labels",
        type=Path,
        required=True,
        metavar="PATH",
        help="RSNA labels CSV (stage_2_train_labels.csv format); every patient in it is scored",
    )
    parser.add_argument(
        "--min-confidence",
        type=fraction,
        default=0.0,
        metavar="FLOAT",
        help="drop predicted boxes with a lower confidence before scoring, in [0, 1] (default: 0, keep all)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    return parser


def main(args: argparse.Namespace) -> int:
    """Read the submission and labels, score, print the report; domain errors propagate to ``lungdet``."""
    predictions = read_submission(args.submission)
    labels = read_labels(args.labels)
    report = score_dataset(
        {patient_id: patient.boxes for patient_id, patient in labels.items()},
        predictions,
        min_confidence=args.min_confidence,
    )
    # Warnings go to stderr so that --json leaves exactly one JSON object on stdout.
    if report.n_unknown_predictions:
        print(
            f"warning: {report.n_unknown_predictions} patient(s) in {args.submission} are not in {args.labels}; "
            "they were not scored. Is this the labels file the images came from?",
            file=sys.stderr,
        )
    if report.n_missing_predictions:
        print(
            f"warning: {report.n_missing_predictions} of {report.n_images} labelled patient(s) have no row in "
            f"{args.submission}; they were scored as 'no boxes'. To score a subset (e.g. one fold), "
            "pass a labels CSV with only those patients.",
            file=sys.stderr,
        )
    print(json.dumps(report.to_dict()) if args.json else format_report(report))
    return 0
