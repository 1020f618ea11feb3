"""Score a Kaggle submission against RSNA labels with the official competition metric.

Pure functions that return numbers; ``lungdet score --submission submission.csv --labels
stage_2_train_labels.csv`` (:mod:`lungdet.show.score_cli`) reads the files, calls them and prints,
and :mod:`lungdet.show.score_report` draws the page.

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

Also here: a 95% bootstrap interval of the mAP over patients (:func:`bootstrap_interval`),
scores by slice of view position, sex and age band (:func:`score_slices`), and the image-level
head's ROC and AUC (:func:`roc_curve`, :func:`roc_auc`).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from lungdet.atomic import write_text_atomic
from lungdet.boxes import as_box_array, iou_matrix_xywh
from lungdet.data_tools.metadata import UNKNOWN, age_band
from lungdet.errors import SubmissionError
from lungdet.submission.prediction_string import Prediction, keep_confident

# Exact literals, not np.arange(0.4, 0.8, 0.05): arange accumulates float error (its 0.65 is
# 0.6499999999999999), which would make an IoU of exactly 0.65 a hit at t = 0.65.
RSNA_IOU_THRESHOLDS: tuple[float, ...] = (0.40, 0.45, 0.50, 0.55, 0.60, 0.65, 0.70, 0.75)
# Resamples of the patients for a score's 95% interval; 1,000 puts the interval's ends within
# about 0.002 of their limit on a few thousand images.
BOOTSTRAP_DRAWS = 1000


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
    # 95% bootstrap interval of map over patients; None when not computed
    map_interval: tuple[float, float] | None = None

    def to_dict(self) -> dict[str, object]:
        """A JSON-ready dict with the same keys as the fields; ``per_threshold`` becomes a list of dicts."""
        return {**asdict(self), "per_threshold": [asdict(summary) for summary in self.per_threshold]}


def match_by_iou(iou: np.ndarray, *, iou_threshold: float) -> list[tuple[int, int]]:
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
    pairs = match_by_iou(iou, iou_threshold=iou_threshold)
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
        n_matched = len(match_by_iou(iou, iou_threshold=threshold))
        results.append(ThresholdResult(threshold, n_matched, n_predicted - n_matched, n_truth - n_matched))
    return ImageScore(score=float(np.mean([result.precision for result in results])), per_threshold=tuple(results))


def _fraction_or_none(numerator: int, denominator: int) -> float | None:
    return numerator / denominator if denominator else None


def bootstrap_interval(
    patient_scores: np.ndarray, *, draws: int = BOOTSTRAP_DRAWS, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mAP: resample patients with replacement ``draws`` times.

    ``patient_scores`` has one entry per labelled patient, NaN for one left out of the mean
    (neither truth nor predicted boxes), so a draw's mAP is the mean of its scored patients, as
    the metric's (0.0 for a draw with none). Seeded: the same inputs give the same interval.
    """
    scores = np.asarray(patient_scores, dtype=np.float64)
    if scores.size == 0:
        return 0.0, 0.0
    generator = np.random.default_rng(seed)
    means = np.empty(draws, dtype=np.float64)
    # Draws in chunks: all 1,000 draws of 26,684 patients at once would take 200 MB.
    chunk = max(1, 4_000_000 // scores.size)
    scored = ~np.isnan(scores)
    filled = np.where(scored, scores, 0.0)
    for start in range(0, draws, chunk):
        rows = min(chunk, draws - start)
        picks = generator.integers(0, scores.size, size=(rows, scores.size))
        counts = scored[picks].sum(axis=1)
        means[start : start + rows] = np.divide(filled[picks].sum(axis=1), counts, out=np.zeros(rows), where=counts > 0)
    tail = (1.0 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


def score_dataset(
    truth: Mapping[str, np.ndarray],
    predictions: Mapping[str, Prediction],
    *,
    min_confidence: float = 0.0,
    bootstrap_draws: int = 0,
    seed: int = 0,
) -> ScoreReport:
    """Score ``predictions`` against ``truth`` over every patient in ``truth``.

    ``truth`` maps patientId to its ``[T, 4]`` XYWH_ABS truth boxes (``T`` is 0 for negatives);
    ``predictions`` maps patientId to a :class:`Prediction` in the same pixel space. Predicted
    boxes with a confidence below ``min_confidence`` (in [0, 1]) are dropped first. A patient in
    ``truth`` but not in ``predictions`` has no predicted boxes; a patient only in ``predictions``
    is counted in ``n_unknown_predictions`` and otherwise ignored. With ``bootstrap_draws``, the
    report carries a 95% interval of the mAP (see :func:`bootstrap_interval`, seeded by ``seed``).
    """
    if not 0.0 <= min_confidence <= 1.0:
        raise ValueError(f"min_confidence must be in [0, 1], got {min_confidence}")
    patient_scores = np.full(len(truth), np.nan)
    image_scores: list[ImageScore] = []
    matched_ious: list[float] = []
    n_positive = n_detected_positive = n_clear_negative = n_predicted_boxes = 0
    for index, (patient_id, truth_boxes) in enumerate(truth.items()):
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
            patient_scores[index] = image_score.score
        matched_ious.extend(match.iou for match in match_predictions(boxes, prediction, iou_threshold=0.0))

    per_threshold = tuple(
        ThresholdSummary(
            iou_threshold=threshold,
            mean_precision=float(np.mean([image.per_threshold[k].precision for image in image_scores]))
            if image_scores
            else 0.0,
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
        map_interval=bootstrap_interval(patient_scores, draws=bootstrap_draws, seed=seed) if bootstrap_draws else None,
    )


# --- the image-level head's probabilities ----------------------------------------------------------


def roc_curve(labels: Sequence[bool], probabilities: Sequence[float]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(false positive rates, true positive rates, thresholds)``, thresholds descending, from (0, 0) to (1, 1).

    A point per distinct probability: calling positive every image at or above it.
    """
    truth = np.asarray(labels, dtype=bool)
    scores = np.asarray(probabilities, dtype=np.float64)
    order = np.argsort(-scores, kind="stable")
    truth, scores = truth[order], scores[order]
    last_of_each = np.r_[np.nonzero(np.diff(scores))[0], len(scores) - 1] if len(scores) else np.array([], dtype=int)
    true_positives = np.cumsum(truth)[last_of_each]
    false_positives = np.cumsum(~truth)[last_of_each]
    positives, negatives = max(int(truth.sum()), 1), max(int((~truth).sum()), 1)
    return (
        np.r_[0.0, false_positives / negatives],
        np.r_[0.0, true_positives / positives],
        np.r_[np.inf, scores[last_of_each]],
    )


def roc_auc(labels: Sequence[bool], probabilities: Sequence[float]) -> float | None:
    """Area under the ROC curve (ties count half); None unless there are both positive and negative images."""
    truth = np.asarray(labels, dtype=bool)
    if truth.all() or not truth.any():
        return None
    false_rates, true_rates, _ = roc_curve(labels, probabilities)
    return float(np.trapezoid(true_rates, false_rates))


def youden_threshold(labels: Sequence[bool], probabilities: Sequence[float]) -> float | None:
    """The probability cut-off with the largest sensitivity + specificity - 1 (Youden's J); None without both classes."""
    truth = np.asarray(labels, dtype=bool)
    if truth.all() or not truth.any():
        return None
    false_rates, true_rates, thresholds = roc_curve(labels, probabilities)
    best = int(np.argmax(true_rates[1:] - false_rates[1:])) + 1  # the first point calls nothing positive
    return float(thresholds[best])


# --- slices: the score by view position, sex and age ----------------------------------------------

SLICE_KEYS = ("view_position", "sex", "age_band")


def read_slice_metadata(path: Path) -> dict[str, dict[str, str]]:
    """``{patientId: {view_position, sex, age_band}}`` from a ``lungdet convert`` annotations.json (its image records)."""
    path = Path(path)
    try:
        images = json.loads(path.read_text(encoding="utf-8"))["images"]
        return {
            str(image["patient_id"]): {
                "view_position": str(image.get("view_position") or UNKNOWN),
                "sex": str(image.get("sex") or UNKNOWN),
                "age_band": age_band(image.get("age")),
            }
            for image in images
        }
    except FileNotFoundError:
        raise SubmissionError(
            f"{path}: file not found; --metadata takes the annotations.json that lungdet convert wrote"
        ) from None
    except (ValueError, KeyError, TypeError) as error:
        raise SubmissionError(
            f"{path}: not a lungdet convert annotations.json ({type(error).__name__}: {error}); its 'images' need patient_id, age, sex, view_position"
        ) from None


@dataclass(frozen=True)
class SliceReport:
    """The metric over the patients whose ``by`` is ``value`` (e.g. view_position = 'AP')."""

    by: str
    value: str
    report: ScoreReport


def score_slices(
    truth: Mapping[str, np.ndarray],
    predictions: Mapping[str, Prediction],
    metadata: Mapping[str, Mapping[str, str]],
    by: Sequence[str],
    *,
    min_confidence: float = 0.0,
    bootstrap_draws: int = 0,
    seed: int = 0,
) -> list[SliceReport]:
    """One :class:`SliceReport` per value of each key in ``by`` (of :data:`SLICE_KEYS`), values sorted.

    Each slice is scored as a dataset of its own, so for every key the slices' patients add up to
    ``truth`` and their scored images' mean is the whole mAP. A patient missing from
    ``metadata`` falls in 'unknown'.
    """
    unknown = [key for key in by if key not in SLICE_KEYS]
    if unknown:
        raise SubmissionError(f"cannot slice by {', '.join(unknown)}; choose from {', '.join(SLICE_KEYS)}")
    slices = []
    for key in by:
        groups: dict[str, dict[str, np.ndarray]] = {}
        for patient_id, boxes in truth.items():
            groups.setdefault(metadata.get(patient_id, {}).get(key, UNKNOWN), {})[patient_id] = boxes
        for value in sorted(groups):
            report = score_dataset(
                groups[value], predictions, min_confidence=min_confidence, bootstrap_draws=bootstrap_draws, seed=seed
            )
            slices.append(SliceReport(key, value, report))
    return slices


def format_slices(slices: Sequence[SliceReport]) -> str:
    """A table of slices: mAP with its interval, sensitivity, specificity, images."""

    def show(value: float | None) -> str:
        return "   n/a" if value is None else f"{value:6.3f}"

    lines = [f"{'slice':<24} {'mAP':>6}  {'95% interval':<16} {'sens':>6} {'spec':>6} {'images':>7}"]
    for item in slices:
        report = item.report
        interval = f"[{report.map_interval[0]:.3f}, {report.map_interval[1]:.3f}]" if report.map_interval else ""
        lines.append(
            f"{item.by + ' ' + item.value:<24} {report.map:6.3f}  {interval:<16} {show(report.sensitivity)} {show(report.specificity)} {report.n_images:7d}"
        )
    return "\n".join(lines)


def format_report(report: ScoreReport) -> str:
    """A short human-readable table of ``report``."""

    def show(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.4f}"

    interval = f" [{report.map_interval[0]:.4f}, {report.map_interval[1]:.4f}]" if report.map_interval else ""
    lines = [
        f"mAP          {show(report.map)}{interval}   images scored {report.n_scored} / {report.n_images}",
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


PROBABILITY_COLUMNS = ["patientId", "probability"]
PROBABILITY_DECIMALS = 6


def write_probabilities(path: Path, probabilities: Mapping[str, float]) -> None:
    """Write ``patientId,probability`` rows atomically, in the mapping's order (what :func:`read_probabilities` reads)."""
    lines = [",".join(PROBABILITY_COLUMNS)] + [
        f"{patient},{value:.{PROBABILITY_DECIMALS}f}" for patient, value in probabilities.items()
    ]
    write_text_atomic(Path(path), "\n".join(lines) + "\n")


def read_probabilities(path: Path) -> dict[str, float]:
    """``{patientId: probability}`` from a ``patientId,probability`` CSV (``lungdet predict --probabilities``)."""
    path = Path(path)
    if not path.is_file():
        raise SubmissionError(f"{path}: file not found; lungdet predict --probabilities writes it")
    values: dict[str, float] = {}
    with open(path, newline="", encoding="utf-8-sig") as stream:
        reader = csv.reader(stream)
        if next(reader, None) != PROBABILITY_COLUMNS:
            raise SubmissionError(f"{path}: the header must be 'patientId,probability'")
        for fields in reader:
            if not fields:
                continue
            try:
                value = float(fields[1])
            except (IndexError, ValueError):
                raise SubmissionError(
                    f"{path} line {reader.line_num}: expected 'patientId,probability' with a number, got {','.join(fields)!r}"
                ) from None
            if not 0.0 <= value <= 1.0:
                raise SubmissionError(f"{path} line {reader.line_num}: probability {value} is outside [0, 1]")
            values[fields[0]] = value
    return values
