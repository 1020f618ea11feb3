"""The detection metrics papers report beside the RSNA mAP: COCO AP, FROC, image-level AUC and ECE.

Pure functions that return numbers; ``lungdet score`` (:mod:`lungdet.show.score_cli`) prints
them after the RSNA metric of :mod:`lungdet.submission.score`, and ``--html`` draws them. Boxes are
XYWH_ABS in the labels' pixel space, truth as ``[T, 4]`` arrays and predictions as
:class:`~lungdet.submission.prediction_string.Prediction`. Every labelled patient is one image,
negatives included; patients only in the submission are ignored, as the RSNA metric ignores them.

- **COCO AP@[.50:.95], AP50, AP40** by pycocotools' ``COCOeval`` (``iouType='bbox'``, one
  category, area range 'all'), run once with the IoU thresholds 0.40, 0.50, 0.55, ..., 0.95.
  AP at a threshold is the mean over the 101 recall points of ``eval['precision']`` at that
  threshold; AP@[.50:.95] the mean over the ten thresholds from 0.50 (as ``summarize()``, which
  would also average in 0.40, so it is not called); AP40 is VinDr-CXR's AP at IoU 0.4. A box is
  a hit at IoU >= t (COCO's rule; the RSNA metric's is > t). ``maxDets`` is ``[1, 10, M]`` with
  ``M`` = max(100, most boxes on one image), read at ``M``, so no box is dropped. Without a
  truth box AP is undefined (pycocotools reports -1): the value is None with a reason.
- **FROC**: lesion-level sensitivity (truth boxes hit / truth boxes) at 0.125, 0.25, 0.5, 1, 2,
  4 and 8 false positives per image, and their mean, as MONAI's ``compute_froc_curve_data`` and
  ``compute_froc_score``. A predicted box hits a truth box when their IoU is > 0.4 (the RSNA
  metric's lowest threshold), matched greedily by confidence with the RSNA metric's own rule
  (:func:`~lungdet.submission.score.match_predictions`), so each truth box is hit once and a
  second box on it is a false positive. The curve has a point per distinct confidence (boxes at
  or above it) after (0, 0); sensitivity at a FP rate is ``np.interp`` on it, as MONAI:
  linear between points, the highest sensitivity reached beyond the last point.
- **Image-level AUC** (:func:`~lungdet.submission.score.roc_auc`) and **ECE** of the image
  probabilities, when given: ten equal-width bins (bin ``b`` holds ``[b/10, (b+1)/10)``, 1.0 in
  the last, as the reliability diagram), ECE = sum over bins of the bin's share of images times
  |share of positive images - mean probability|.

Each comes with a 95% percentile bootstrap interval over patients, as the mAP's
(:func:`~lungdet.submission.score.bootstrap_interval`): patients resampled with replacement,
seeded, a patient drawn twice counted twice. COCOeval on every draw is too slow (about 46 s for
1,000 draws of 1,000 images), so COCOeval's per-image matches (``evalImgs``) are re-accumulated
for each draw by :func:`accumulate_precision`, which repeats ``COCOeval.accumulate`` in numpy; the
point estimate is always COCOeval's own. A draw where a metric is undefined (no truth box; one
class for the AUC) is left out of that metric's percentiles.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from lungdet.boxes import as_box_array
from lungdet.submission.prediction_string import Prediction, keep_confident
from lungdet.submission.score import match_predictions, roc_auc

# COCOeval's own ten thresholds (0.50, 0.55, ..., 0.95, the same linspace as its defaults, so the
# floats are identical) with VinDr-CXR's 0.40 in front. Each threshold is matched independently.
COCO_IOU_THRESHOLDS = np.concatenate(
    [[0.4], np.linspace(0.5, 0.95, int(np.round((0.95 - 0.5) / 0.05)) + 1, endpoint=True)]
)
COCO_AP40_ROW = 0  # rows of COCOeval's precision array
COCO_AP50_ROW = 1
COCO_AP_ROWS = slice(1, None)  # 0.50 .. 0.95: AP@[.50:.95]
COCO_MAX_DETECTIONS = 100  # COCOeval's default largest maxDets; raised when an image has more boxes
COCO_CATEGORY_ID = 1  # one category: lung opacity
# COCO images need a size, which the labels do not carry. COCOeval's bbox AP never reads it
# (IoUs come from the boxes, and area range 'all' accepts every area), so it does not change AP.
COCO_IMAGE_SIZE = 1024

FROC_FP_RATES = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)  # false positives per image where sensitivity is read
FROC_IOU_THRESHOLD = 0.4  # a predicted box hits a truth box at IoU strictly above this
CALIBRATION_BINS = 10  # equal-width bins of the image probability for the ECE
INTERVAL_LEVEL = 0.95


# --- COCO AP by pycocotools -----------------------------------------------------------------------


def build_coco(images: Sequence[tuple[np.ndarray, Prediction]]) -> tuple[COCO, COCO]:
    """In-memory COCO ground truth and detections, image ``i`` of ``images`` getting id ``i + 1``.

    Each item is ``(truth boxes [T, 4], Prediction)``, XYWH_ABS in one pixel space per image. Every
    item becomes an image, those without truth boxes too, so their boxes count as false
    positives; an item listed twice is two images.
    """
    coco_images = [
        {"id": index + 1, "width": COCO_IMAGE_SIZE, "height": COCO_IMAGE_SIZE} for index in range(len(images))
    ]
    truth_annotations: list[dict[str, object]] = []
    detections: list[dict[str, object]] = []
    for index, (truth_boxes, prediction) in enumerate(images):
        for box in as_box_array(truth_boxes).tolist():
            # Ids start at 1: COCOeval stores the matched id in dtMatches, where 0 means "unmatched".
            truth_annotations.append(_annotation(len(truth_annotations) + 1, index + 1, box))
        for score, box in zip(prediction.scores.tolist(), prediction.boxes.tolist(), strict=True):
            detections.append({**_annotation(len(detections) + 1, index + 1, box), "score": score})
    categories = [{"id": COCO_CATEGORY_ID, "name": "lung opacity"}]
    truth, predicted = COCO(), COCO()
    truth.dataset = {"images": coco_images, "annotations": truth_annotations, "categories": categories}
    # Not COCO.loadRes: it fails on an empty list, and a submission may have no box at all.
    predicted.dataset = {"images": coco_images, "annotations": detections, "categories": categories}
    with contextlib.redirect_stdout(io.StringIO()):  # createIndex prints its progress
        truth.createIndex()
        predicted.createIndex()
    return truth, predicted


def _annotation(annotation_id: int, image_id: int, box: list[float]) -> dict[str, object]:
    return {
        "id": annotation_id,
        "image_id": image_id,
        "category_id": COCO_CATEGORY_ID,
        "bbox": box,
        "area": box[2] * box[3],
        "iscrowd": 0,
    }


def evaluate_coco(images: Sequence[tuple[np.ndarray, Prediction]]) -> COCOeval:
    """COCOeval (bbox) of ``images`` (see :func:`build_coco`), evaluated and accumulated, silently.

    Thresholds :data:`COCO_IOU_THRESHOLDS`; area range 'all' only (the others are not reported);
    ``maxDets`` ``[1, 10, M]``, ``M`` = max(100, most boxes on one image).
    """
    truth, predicted = build_coco(images)
    most_boxes = max((len(prediction.scores) for _, prediction in images), default=0)
    evaluation = COCOeval(truth, predicted, iouType="bbox")
    evaluation.params.iouThrs = COCO_IOU_THRESHOLDS.copy()
    evaluation.params.areaRng = evaluation.params.areaRng[:1]  # [0, 1e10]: 'all'
    evaluation.params.areaRngLbl = ["all"]
    evaluation.params.maxDets = [1, 10, max(COCO_MAX_DETECTIONS, most_boxes)]
    with contextlib.redirect_stdout(io.StringIO()):  # evaluate and accumulate print their progress
        evaluation.evaluate()
        evaluation.accumulate()
    return evaluation


def average_precisions(precision: np.ndarray) -> tuple[float, float, float] | None:
    """``(AP@[.50:.95], AP50, AP40)`` from a ``[11, 101]`` precision array (thresholds x recall points).

    Each is the mean of the threshold rows' entries above -1, as ``COCOeval.summarize``; None when
    every entry is -1 (no truth box).
    """

    def mean(rows: np.ndarray) -> float | None:
        values = rows[rows > -1]  # C order, as summarize: the same sum, bit for bit
        return float(np.mean(values)) if values.size else None

    ap, ap50, ap40 = mean(precision[COCO_AP_ROWS]), mean(precision[COCO_AP50_ROW]), mean(precision[COCO_AP40_ROW])
    if ap is None or ap50 is None or ap40 is None:
        return None
    return ap, ap50, ap40


def coco_precision(evaluation: COCOeval) -> np.ndarray:
    """COCOeval's ``[11, 101]`` precision (thresholds x recall points) for the one category, area 'all', the largest maxDets."""
    return evaluation.eval["precision"][:, :, 0, 0, -1]


@dataclass(frozen=True)
class CocoMatches:
    """COCOeval's per-image matches (``evalImgs``), flattened for re-accumulation.

    ``scores`` ``[D]`` and ``matched``/``ignored`` ``[T, D]`` (T = IoU thresholds) hold every image's
    detections, image by image, each image's in descending confidence; image ``i`` owns
    ``first[i] : first[i] + counts[i]``. ``truth`` ``[N]`` counts each image's non-ignored truth boxes.
    """

    scores: np.ndarray
    matched: np.ndarray
    ignored: np.ndarray
    first: np.ndarray
    counts: np.ndarray
    truth: np.ndarray
    recall_points: np.ndarray  # COCOeval's 101 recall thresholds 0, 0.01, ..., 1


def coco_matches(evaluation: COCOeval) -> CocoMatches:
    """Flatten an evaluated COCOeval's ``evalImgs`` (one category, one area range) into :class:`CocoMatches`."""
    params = evaluation.params
    thresholds = len(params.iouThrs)
    records = evaluation.evalImgs[: len(params.imgIds)]  # the first area range: 'all'
    scores, matched, ignored, counts, truth = [], [], [], [], []
    for record in records:
        if record is None:  # neither truth nor detections
            counts.append(0)
            truth.append(0)
            continue
        scores.append(np.asarray(record["dtScores"], dtype=np.float64))
        matched.append(np.asarray(record["dtMatches"]).reshape(thresholds, -1) > 0)
        ignored.append(np.asarray(record["dtIgnore"], dtype=bool).reshape(thresholds, -1))
        counts.append(len(record["dtScores"]))
        truth.append(int(np.count_nonzero(np.asarray(record["gtIgnore"]) == 0)))
    counts_array = np.asarray(counts, dtype=np.int64)
    return CocoMatches(
        scores=np.concatenate(scores) if scores else np.zeros(0),
        matched=np.concatenate(matched, axis=1) if matched else np.zeros((thresholds, 0), dtype=bool),
        ignored=np.concatenate(ignored, axis=1) if ignored else np.zeros((thresholds, 0), dtype=bool),
        first=np.cumsum(counts_array) - counts_array,
        counts=counts_array,
        truth=np.asarray(truth, dtype=np.int64),
        recall_points=np.asarray(params.recThrs, dtype=np.float64),
    )


def _gather(first: np.ndarray, counts: np.ndarray, images: np.ndarray) -> np.ndarray:
    """Positions of the items of ``images`` (with repeats, in that order) in arrays laid out by ``first``/``counts``."""
    lengths = counts[images]
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    offsets = np.cumsum(lengths) - lengths  # where each drawn image starts in the gathered array
    return np.repeat(first[images] - offsets, lengths) + np.arange(total)


def accumulate_precision(matches: CocoMatches, images: np.ndarray) -> np.ndarray | None:
    """``COCOeval.accumulate`` for the images ``images`` (indices, repeats allowed, in that order): ``[T, 101]`` precision.

    The same operations in the same order: detections concatenated image by image, a stable sort
    by descending score (mergesort), cumulative TP and FP, precision TP / (TP + FP + eps) made
    non-increasing from the right, read at the first detection whose recall reaches each recall
    point (0 beyond the last). None when the images have no truth box (COCOeval leaves -1).
    """
    images = np.asarray(images, dtype=np.int64)
    truth_boxes = int(matches.truth[images].sum())
    if truth_boxes == 0:
        return None
    positions = _gather(matches.first, matches.counts, images)
    order = np.argsort(-matches.scores[positions], kind="mergesort")
    matched = matches.matched[:, positions][:, order]
    ignored = matches.ignored[:, positions][:, order]
    true_positives = np.cumsum(matched & ~ignored, axis=1).astype(float)
    false_positives = np.cumsum(~matched & ~ignored, axis=1).astype(float)
    recall = true_positives / truth_boxes
    precision = true_positives / (false_positives + true_positives + np.spacing(1))
    precision = np.maximum.accumulate(precision[:, ::-1], axis=1)[:, ::-1]  # the envelope
    detections = precision.shape[1]
    result = np.zeros((precision.shape[0], matches.recall_points.size))
    for row in range(precision.shape[0]):
        first_reaching = np.searchsorted(recall[row], matches.recall_points, side="left")
        reached = first_reaching < detections
        result[row, reached] = precision[row, first_reaching[reached]]
    return result


# --- FROC -----------------------------------------------------------------------------------------


def froc_matches(
    truth_boxes: np.ndarray, prediction: Prediction, *, iou_threshold: float = FROC_IOU_THRESHOLD
) -> np.ndarray:
    """``[P]`` bool: which of ``prediction``'s boxes (as given) hit a truth box at IoU > ``iou_threshold``.

    Greedy by confidence with the RSNA rule, so each truth box (``[T, 4]`` XYWH_ABS, the
    prediction's pixel space) is hit at most once and a second box on it is a false positive.
    """
    hits = np.zeros(len(prediction.scores), dtype=bool)
    for match in match_predictions(truth_boxes, prediction, iou_threshold=iou_threshold):
        hits[match.prediction_index] = True
    return hits


def froc_curve(scores: np.ndarray, hits: np.ndarray, *, truth_boxes: int, images: int) -> tuple[np.ndarray, np.ndarray]:
    """``(false positives per image, sensitivity)``, from (0, 0), one point per distinct confidence, descending.

    ``scores`` and ``hits`` ``[P]`` are every predicted box's confidence and whether it hit a truth
    box; a point counts the boxes at or above its confidence. ``truth_boxes`` and ``images`` must
    be > 0.
    """
    if truth_boxes <= 0 or images <= 0:
        raise ValueError(f"the FROC needs truth boxes and images, got {truth_boxes} truth boxes on {images} images")
    order = np.argsort(-scores, kind="stable")
    sorted_scores, sorted_hits = scores[order], hits[order]
    last_of_each = (
        np.r_[np.nonzero(np.diff(sorted_scores))[0], len(sorted_scores) - 1]
        if len(sorted_scores)
        else np.zeros(0, dtype=int)
    )
    true_positives = np.cumsum(sorted_hits)[last_of_each]
    false_positives = np.cumsum(~sorted_hits)[last_of_each]
    return np.r_[0.0, false_positives / images], np.r_[0.0, true_positives / truth_boxes]


def froc_sensitivities(
    fp_per_image: np.ndarray, sensitivity: np.ndarray, fp_rates: Sequence[float] = FROC_FP_RATES
) -> np.ndarray:
    """Sensitivity at each of ``fp_rates``: ``np.interp`` on the curve, as MONAI's ``compute_froc_score``.

    Linear between the curve's points; where several points share a FP rate, the last (highest
    sensitivity) counts at that rate; beyond the curve's last point, its sensitivity.
    """
    return np.interp(np.asarray(fp_rates, dtype=np.float64), fp_per_image, sensitivity)


# --- image-level probabilities ----------------------------------------------------------------------


def calibration_bins(
    labels: Sequence[bool], probabilities: Sequence[float], *, bins: int = CALIBRATION_BINS
) -> list[tuple[float, float, int]]:
    """``(mean probability, share of positive images, images)`` per non-empty bin; bin ``b`` is ``[b/bins, (b+1)/bins)``, 1.0 in the last."""
    truth = np.asarray(labels, dtype=np.float64)
    values = np.asarray(probabilities, dtype=np.float64)
    which = np.minimum((values * bins).astype(int), bins - 1)
    return [
        (float(values[which == b].mean()), float(truth[which == b].mean()), int((which == b).sum()))
        for b in range(bins)
        if (which == b).any()
    ]


def expected_calibration_error(
    labels: Sequence[bool], probabilities: Sequence[float], *, bins: int = CALIBRATION_BINS
) -> float | None:
    """Sum over :func:`calibration_bins` of (images in bin / images) * |share positive - mean probability|; None without images."""
    total = len(labels)
    if total == 0:
        return None
    return float(
        sum(
            count / total * abs(observed - predicted)
            for predicted, observed, count in calibration_bins(labels, probabilities, bins=bins)
        )
    )


# --- bootstrap --------------------------------------------------------------------------------------


def patient_draws(patients: int, *, draws: int, seed: int) -> Iterator[np.ndarray]:
    """``draws`` resamples of ``range(patients)`` with replacement, each ``[patients]``; seeded, so metrics can share draws."""
    generator = np.random.default_rng(seed)
    for _ in range(draws):
        yield generator.integers(0, patients, size=patients)


def percentile_interval(values: Sequence[float], *, level: float = INTERVAL_LEVEL) -> tuple[float, float] | None:
    """The percentile interval of the draws' values, NaN (undefined draws) left out; None when none is defined."""
    finite = np.asarray(values, dtype=np.float64)
    finite = finite[~np.isnan(finite)]
    if finite.size == 0:
        return None
    tail = (1.0 - level) / 2 * 100
    low, high = np.percentile(finite, [tail, 100 - tail])
    return float(low), float(high)


# --- the reports ------------------------------------------------------------------------------------

Interval = tuple[float, float] | None


@dataclass(frozen=True)
class CocoReport:
    """COCO AP@[.50:.95], AP50 and AP40 (COCOeval, bbox); None with ``reason`` when undefined."""

    ap: float | None
    ap50: float | None
    ap40: float | None
    ap_interval: Interval
    ap50_interval: Interval
    ap40_interval: Interval
    max_detections: int  # COCOeval's largest maxDets, where AP is read
    reason: str | None  # why the values are None


@dataclass(frozen=True)
class FrocReport:
    """Sensitivity at :data:`FROC_FP_RATES` false positives per image and its mean (the FROC score)."""

    iou_threshold: float
    fp_rates: tuple[float, ...]
    sensitivities: tuple[float, ...] | None
    sensitivity_intervals: tuple[Interval, ...] | None
    score: float | None  # mean of sensitivities
    score_interval: Interval
    n_truth_boxes: int
    reason: str | None
    # The whole curve, for the page's figure; not in the JSON (a point per distinct confidence).
    curve: tuple[np.ndarray, np.ndarray] | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class ProbabilityReport:
    """The image-level head: AUC and ECE of the probabilities over the labelled patients that have one."""

    auc: float | None
    auc_interval: Interval
    auc_reason: str | None
    ece: float | None
    ece_interval: Interval
    bins: int
    n_images: int  # labelled patients with a probability
    n_positive: int


@dataclass(frozen=True)
class DetectionMetrics:
    """Everything reported beside the RSNA mAP; ``probabilities`` is None when none were given."""

    n_images: int
    n_truth_boxes: int
    n_predicted_boxes: int
    coco: CocoReport
    froc: FrocReport
    probabilities: ProbabilityReport | None

    def to_dict(self) -> dict[str, object]:
        """JSON keys: ``coco``, ``froc``, ``image_auc`` and ``ece`` (the last two None without probabilities)."""
        froc = self.froc
        result: dict[str, object] = {
            "coco": {
                **asdict(self.coco),
                "n_images": self.n_images,
                "n_truth_boxes": self.n_truth_boxes,
                "n_predicted_boxes": self.n_predicted_boxes,
            },
            "froc": {
                "score": froc.score,
                "score_interval": froc.score_interval,
                "fp_per_image": list(froc.fp_rates),
                "sensitivities": None if froc.sensitivities is None else list(froc.sensitivities),
                "sensitivity_intervals": None
                if froc.sensitivity_intervals is None
                else list(froc.sensitivity_intervals),
                "iou_threshold": froc.iou_threshold,
                "n_truth_boxes": froc.n_truth_boxes,
                "reason": froc.reason,
            },
            "image_auc": None,
            "ece": None,
        }
        if self.probabilities is not None:
            report = self.probabilities
            counts = {"n_images": report.n_images, "n_positive": report.n_positive}
            result["image_auc"] = {
                "value": report.auc,
                "interval": report.auc_interval,
                "reason": report.auc_reason,
                **counts,
            }
            result["ece"] = {"value": report.ece, "interval": report.ece_interval, "bins": report.bins, **counts}
        return result


def score_coco(
    images: Sequence[tuple[np.ndarray, Prediction]], *, bootstrap_draws: int = 0, seed: int = 0
) -> CocoReport:
    """COCO AP@[.50:.95], AP50 and AP40 of ``images`` (``(truth [T, 4], Prediction)`` per patient, XYWH_ABS), with intervals."""
    evaluation = evaluate_coco(images)
    max_detections = int(evaluation.params.maxDets[-1])
    values = average_precisions(coco_precision(evaluation))
    if values is None:
        reason = "no labelled image" if not images else "no truth box: COCO AP is undefined (pycocotools reports -1)"
        return CocoReport(None, None, None, None, None, None, max_detections, reason)
    intervals: list[Interval] = [None, None, None]
    if bootstrap_draws:
        matches = coco_matches(evaluation)
        per_draw = np.full((bootstrap_draws, 3), np.nan)
        for row, drawn in enumerate(patient_draws(len(images), draws=bootstrap_draws, seed=seed)):
            precision = accumulate_precision(matches, drawn)
            aps = average_precisions(precision) if precision is not None else None
            if aps is not None:
                per_draw[row] = aps
        intervals = [percentile_interval(per_draw[:, column]) for column in range(3)]
    return CocoReport(*values, *intervals, max_detections=max_detections, reason=None)


def score_froc(
    images: Sequence[tuple[np.ndarray, Prediction]],
    *,
    iou_threshold: float = FROC_IOU_THRESHOLD,
    fp_rates: Sequence[float] = FROC_FP_RATES,
    bootstrap_draws: int = 0,
    seed: int = 0,
) -> FrocReport:
    """FROC of ``images`` (``(truth [T, 4], Prediction)`` per patient, XYWH_ABS): sensitivity at ``fp_rates`` and their mean."""
    truth_counts = np.array([len(as_box_array(truth)) for truth, _ in images], dtype=np.int64)
    n_truth = int(truth_counts.sum())
    fp_rates = tuple(float(rate) for rate in fp_rates)
    if n_truth == 0:
        reason = "no labelled image" if not images else "no truth box: lesion-level sensitivity is undefined"
        return FrocReport(iou_threshold, fp_rates, None, None, None, None, 0, reason)
    scores = [prediction.scores for _, prediction in images]
    hits = [froc_matches(truth, prediction, iou_threshold=iou_threshold) for truth, prediction in images]
    all_scores, all_hits = np.concatenate(scores), np.concatenate(hits)
    curve = froc_curve(all_scores, all_hits, truth_boxes=n_truth, images=len(images))
    sensitivities = froc_sensitivities(*curve, fp_rates)
    point_intervals: tuple[Interval, ...] | None = None
    score_interval: Interval = None
    if bootstrap_draws:
        counts = np.array([len(values) for values in scores], dtype=np.int64)
        first = np.cumsum(counts) - counts
        per_draw = np.full((bootstrap_draws, len(fp_rates)), np.nan)
        for row, drawn in enumerate(patient_draws(len(images), draws=bootstrap_draws, seed=seed)):
            drawn_truth = int(truth_counts[drawn].sum())
            if drawn_truth:
                positions = _gather(first, counts, drawn)
                draw_curve = froc_curve(
                    all_scores[positions], all_hits[positions], truth_boxes=drawn_truth, images=len(drawn)
                )
                per_draw[row] = froc_sensitivities(*draw_curve, fp_rates)
        point_intervals = tuple(percentile_interval(per_draw[:, column]) for column in range(len(fp_rates)))
        score_interval = percentile_interval(per_draw.mean(axis=1))
    return FrocReport(
        iou_threshold=iou_threshold,
        fp_rates=fp_rates,
        sensitivities=tuple(float(value) for value in sensitivities),
        sensitivity_intervals=point_intervals,
        score=float(np.mean(sensitivities)),
        score_interval=score_interval,
        n_truth_boxes=n_truth,
        reason=None,
        curve=curve,
    )


def score_probabilities(
    labels: Sequence[bool], probabilities: Sequence[float], *, bootstrap_draws: int = 0, seed: int = 0
) -> ProbabilityReport:
    """Image-level AUC and ECE of ``probabilities`` (one per image, in [0, 1]) against ``labels`` (image has a truth box)."""
    truth = np.asarray(labels, dtype=bool)
    values = np.asarray(probabilities, dtype=np.float64)
    auc = roc_auc(truth, values)
    auc_reason = None if auc is not None else "the AUC needs images with and without an opacity"
    ece = expected_calibration_error(truth, values)
    auc_interval: Interval = None
    ece_interval: Interval = None
    if bootstrap_draws and truth.size:
        aucs, eces = np.full(bootstrap_draws, np.nan), np.full(bootstrap_draws, np.nan)
        for row, drawn in enumerate(patient_draws(truth.size, draws=bootstrap_draws, seed=seed)):
            draw_auc = roc_auc(truth[drawn], values[drawn])
            aucs[row] = np.nan if draw_auc is None else draw_auc
            eces[row] = expected_calibration_error(truth[drawn], values[drawn])
        auc_interval = percentile_interval(aucs) if auc is not None else None
        ece_interval = percentile_interval(eces)
    return ProbabilityReport(
        auc, auc_interval, auc_reason, ece, ece_interval, CALIBRATION_BINS, int(truth.size), int(truth.sum())
    )


def score_detection_metrics(
    truth: Mapping[str, np.ndarray],
    predictions: Mapping[str, Prediction],
    *,
    probabilities: Mapping[str, float] | None = None,
    min_confidence: float = 0.0,
    bootstrap_draws: int = 0,
    seed: int = 0,
) -> DetectionMetrics:
    """COCO AP, FROC and, with ``probabilities``, image AUC and ECE over every patient in ``truth``.

    ``truth`` maps patientId to ``[T, 4]`` XYWH_ABS truth boxes (``T`` 0 for negatives),
    ``predictions`` patientId to a :class:`Prediction` in the same pixel space; a patient missing
    from ``predictions`` has no boxes, boxes below ``min_confidence`` are dropped first, as
    :func:`~lungdet.submission.score.score_dataset` does. ``probabilities`` maps patientId to its
    image probability; patients without one are left out of the AUC and ECE. With
    ``bootstrap_draws`` (``lungdet score`` passes 1,000) each figure gets its 95% interval; COCO
    and FROC share their draws (the same ``seed``).
    """
    if not 0.0 <= min_confidence <= 1.0:
        raise ValueError(f"min_confidence must be in [0, 1], got {min_confidence}")
    images = [
        (
            as_box_array(boxes),
            keep_confident(predictions.get(patient_id, Prediction.empty()), min_confidence=min_confidence),
        )
        for patient_id, boxes in truth.items()
    ]
    probability_report = None
    if probabilities is not None:
        known = [patient_id for patient_id in truth if patient_id in probabilities]
        probability_report = score_probabilities(
            [len(truth[patient_id]) > 0 for patient_id in known],
            [probabilities[patient_id] for patient_id in known],
            bootstrap_draws=bootstrap_draws,
            seed=seed,
        )
    return DetectionMetrics(
        n_images=len(images),
        n_truth_boxes=sum(len(boxes) for boxes, _ in images),
        n_predicted_boxes=sum(len(prediction.scores) for _, prediction in images),
        coco=score_coco(images, bootstrap_draws=bootstrap_draws, seed=seed),
        froc=score_froc(images, bootstrap_draws=bootstrap_draws, seed=seed),
        probabilities=probability_report,
    )
